"""demo-tiny: a short training run learns, is deterministic, and reloads through the backbone loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from newsclip.demo import model as dm
from newsclip.retrieval.backbones import BACKBONES, load_backbone


@pytest.mark.slow
def test_short_run_learns(demo_tiny):
    # demo_tiny (conftest) is the test variant: seed 0, TEST_STEPS steps, shared with the end-to-end tests
    metrics = dm.evaluate_demo_model(demo_tiny, n=300, texts="article")
    # TEST_BAR_MRR sits well under the measured value (see model.py); a random ranking scores ~0.02
    assert metrics["mrr@100"] >= dm.TEST_BAR_MRR, metrics
    assert 0.9 < metrics["mrr_ceiling"] <= 1.0


@pytest.mark.slow
def test_reload_matches_trained_model(demo_tiny):
    path = demo_tiny
    # the file holds the trained fp32 weights as they were in memory
    original = dm.build_demo_clip()
    original.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    original.eval()
    loaded, preprocess = load_backbone(str(path))  # build_model re-infers the shapes; the weights load bit for bit
    spec = BACKBONES["demo-tiny"]
    assert loaded.visual.input_resolution == spec.input_resolution == dm.IMAGE_RESOLUTION
    assert loaded.text_projection.shape == (dm.TEXT_WIDTH, spec.embed_dim)
    assert loaded.visual.attnpool.num_heads == original.visual.attnpool.num_heads
    assert [b.attn.num_heads for b in loaded.transformer.resblocks] == [dm.TEXT_HEADS] * dm.TEXT_LAYERS
    assert loaded.state_dict().keys() == original.state_dict().keys()

    _, images, articles, _ = dm.eval_pairs(32, seed=7)
    pixels = torch.stack([preprocess(im) for im in images])
    tokens = dm.tokenize(articles)
    with torch.no_grad():
        for a, b in ((loaded.encode_image(pixels), original.encode_image(pixels)),
                     (loaded.encode_text(tokens), original.encode_text(tokens))):
            assert torch.nn.functional.cosine_similarity(a, b).min() >= 0.9999


def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a.pt", tmp_path / "sub" / "b.pt", tmp_path / "c.pt"
    dm.train_demo_model(a, seed=3, steps=2, batch_size=16, log=lambda _: None)
    dm.train_demo_model(b, seed=3, steps=2, batch_size=16, log=lambda _: None)
    dm.train_demo_model(c, seed=4, steps=2, batch_size=16, log=lambda _: None)
    assert a.read_bytes() == b.read_bytes()  # same bytes whatever the file name
    assert a.read_bytes() != c.read_bytes()
    assert not list(tmp_path.rglob(".*tmp*"))  # the atomic write left nothing behind


def test_training_inputs_match_inference_path():
    import clip
    from clip.clip import _transform

    _, images, articles, captions = dm.eval_pairs(64, seed=1)
    expected = torch.stack([_transform(dm.IMAGE_RESOLUTION)(im) for im in images])
    assert torch.equal(dm.images_to_tensor(images), expected)
    texts = articles + captions + [" ".join(articles[:4])]  # the last one is cut at 77 tokens
    assert torch.equal(dm.tokenize(texts), clip.tokenize(texts, truncate=True))


def test_trimmed_text_encoder_is_encode_text():
    torch.manual_seed(0)
    model = dm.build_demo_clip().eval()
    _, _, articles, captions = dm.eval_pairs(16, seed=2)
    tokens = dm.tokenize(articles + captions)
    with torch.no_grad():
        torch.testing.assert_close(dm._encode_text_trimmed(model, tokens), model.encode_text(tokens),
                                   rtol=1e-4, atol=1e-5)


def test_eval_and_train_streams_differ():
    train_scenes = [s for _, _, ids in [next(dm._training_batches(0, 64, 10))] for s in ids]
    assert len(train_scenes) == 64
    first_eval = dm.eval_pairs(4, seed=0)[3]
    again = dm.eval_pairs(4, seed=0)[3]
    assert first_eval == again and first_eval != dm.eval_pairs(4, seed=1)[3]


def test_retrieval_metrics_hand_computed():
    # text 0: its image ranks 1st; text 1: 2nd; text 2: 3rd (all three images beat... see rows)
    similarity = np.array([[0.9, 0.1, 0.2],
                           [0.8, 0.5, 0.1],
                           [0.7, 0.6, 0.3]])
    out = dm.retrieval_metrics(similarity, groups=["a", "b", "b"], k=2)
    assert out["mrr@2"] == pytest.approx((1 + 1 / 2 + 0) / 3)  # rank 3 is outside the top 2
    assert out["r@1"] == pytest.approx(1 / 3) and out["r@5"] == 1.0
    # "b" is shared by two items: each at best ties at rank 1 or 2 -> (1 + 1/2) / 2
    assert out["mrr_ceiling"] == pytest.approx((1 + 0.75 + 0.75) / 3)
    assert out["shared_descriptions"] == 2


def test_ensure_demo_model_keeps_an_existing_file(tmp_path):
    (tmp_path / "demo-tiny.pt").write_bytes(b"already there")
    assert dm.ensure_demo_model(tmp_path) == tmp_path / "demo-tiny.pt"
    assert (tmp_path / "demo-tiny.pt").read_bytes() == b"already there"
