"""open_clip backbones: each family's stored embeddings equal open_clip's own (split decode path and in process), the
registry resolves names and mappings once from local files, and a missing file stops the job with exit status 2."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from newsclip import config
from newsclip.config import EncodeConfig
from newsclip.encoding import IMAGES, TEXTS, encode_here
from newsclip.retrieval.backbone_values import BackboneEntry
from newsclip.retrieval.registry import entry_name, resolve_backbone
from newsclip.runtime.embedding_store import content_keys
from newsclip.serve.index import BackboneIndex, Side
from newsclip.serve.query import QueryEncoders
from newsclip.workers.encoders import ImageEncoder, TextEncoder, decode_images, tokenize_texts
from newsclip.yaml_config import check_value

open_clip_tiny = pytest.importorskip("open_clip_tiny")
FAMILIES = ["clip-vit", "clip-vit-quickgelu", "siglip", "siglip2", "pe-core", "convnext", "xlm-roberta"]
TEXTS_ = open_clip_tiny.SENTENCES[:4]


def _images() -> list[Image.Image]:
    """Photos of other shapes than the model's square (so resize modes differ), one grey and one with alpha."""
    rng = np.random.default_rng(0)
    shapes = [(48, 80, "RGB"), (90, 40, "RGB"), (33, 33, "L"), (60, 50, "RGBA")]
    return [Image.fromarray(rng.integers(0, 255, (h, w, len(mode)), dtype=np.uint8).squeeze(), mode)
            for h, w, mode in shapes]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return open_clip_tiny.build(tmp_path_factory.mktemp("open_clip"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """One image shard and one text shard, for the in-process path (it reads its rows from shards)."""
    folder = tmp_path_factory.mktemp("shards")
    images, texts = folder / "images.parquet", folder / "texts.parquet"
    datas = [_png(i) for i in _images()]
    pq.write_table(pa.table({"image_id": [f"i{n}" for n in range(len(datas))], "image": datas}), images)
    pq.write_table(pa.table({"article_id": [f"a{n}" for n in range(len(TEXTS_))], "query_text": TEXTS_}), texts)
    image_rows = pa.table({"image_id": [f"i{n}" for n in range(len(datas))], "file": [str(images)] * len(datas),
                           "hash": content_keys(datas)})
    text_rows = pa.table({"article_id": [f"a{n}" for n in range(len(TEXTS_))], "file": [str(texts)] * len(TEXTS_),
                          "hash": content_keys(TEXTS_)})
    return image_rows, text_rows


def _vectors(table: pa.Table) -> np.ndarray:
    assert table.column("error").null_count == len(table)
    return np.stack(table.column("embedding").to_pylist()).astype(np.float32)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_stored_embeddings_equal_open_clips_own(tiny, shards, family):
    fam = tiny[family]
    entry = check_value("backbones[0]", BackboneEntry, fam.entry)
    resolved = resolve_backbone(entry_name(entry), entry)
    assert resolved.kind == "open_clip" and resolved.arch == fam.arch
    text_ref, image_ref = open_clip_tiny.reference(fam, TEXTS_, _images())
    enc = EncodeConfig(batch_size=3).for_backbone(resolved.name, resolved.image_gflops)
    # the split path: a CPU task decodes to uint8 pixels with the model's resize, the actor normalises and encodes
    decoded = decode_images(pa.table({"image": [_png(i) for i in _images()]}), resolved.image_size[0], 10**8,
                            False, False, preprocess=resolved.preprocess)
    images = _vectors(ImageEncoder(resolved, enc)(decoded))
    tokens = tokenize_texts(pa.table({"hash": list("abcd"), "query_text": TEXTS_}), resolved.context_length,
                            resolved.tokenizer)
    texts = _vectors(TextEncoder(resolved, enc)(tokens))
    assert _cosines(images, image_ref).min() >= 0.99999
    assert _cosines(texts, text_ref).min() >= 0.99999
    # in process: the stage's own path, reading the rows from their shards
    image_rows, text_rows = shards
    assert np.array_equal(_vectors(encode_here(enc, resolved, IMAGES, image_rows)), images)
    assert np.array_equal(_vectors(encode_here(enc, resolved, TEXTS, text_rows)), texts)
    # a search query: the job's entry resolved by the job, the model's own tokenizer and resize (in batches of
    # QUERY_BATCH, not 3: equal up to float rounding)
    cfg = config.from_dict({"backbones": [fam.entry], "encode": {"batch_size": 3}})
    index = BackboneIndex(entry_name(entry), Side.from_arrays(np.array(["i0"], object), images[:1]), None, None)
    queries = QueryEncoders(cfg)
    query_images, errors = queries.images(index, [_png(i) for i in _images()])
    assert errors == [None] * len(images) and _cosines(query_images, images).min() >= 0.99999
    assert _cosines(queries.texts(index, TEXTS_), texts).min() >= 0.99999


def test_device_resize_follows_each_resize_mode():
    """The nvjpeg path's resize on the device: the size and crop of open_clip's transform for each mode."""
    import torch

    from newsclip.retrieval.backbone_values import PreprocessSpec
    from newsclip.workers.encoders import device_resize

    image = torch.randint(0, 255, (3, 40, 90), dtype=torch.uint8)
    for mode in ("shortest", "squash", "longest"):
        spec = PreprocessSpec((32, 48), (0.5,) * 3, (0.5,) * 3, mode, "bilinear")
        assert device_resize(image, spec).shape == (3, 32, 48)
    # squash keeps every column: the left edge of the result is the left edge of the photo, resized
    left = torch.zeros((3, 40, 90), dtype=torch.uint8)
    left[:, :, :10] = 255
    squashed = device_resize(left, PreprocessSpec((32, 32), (0.5,) * 3, (0.5,) * 3, "squash", "bilinear"))
    assert squashed[:, :, 0].float().mean() > 200


def test_missing_weights_and_tokenizer_name_file_place_and_fetch(tmp_path, tiny):
    from newsclip.retrieval.open_clip_models import MissingFiles

    with pytest.raises(MissingFiles) as e:
        resolve_backbone("ViT-B-32/laion2b_s34b_b79k", hf_cache=str(tmp_path / "hub"))
    message = str(e.value)
    assert "open_clip_model.safetensors" in message and str(tmp_path / "hub") in message
    assert "hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message
    entry = check_value("b", BackboneEntry, {**tiny["siglip2"].entry, "tokenizer": None})
    with pytest.raises(MissingFiles) as e:
        resolve_backbone("x", entry, hf_cache=str(tmp_path / "hub"))
    assert "timm/not-cached-siglip2-tokenizer" in str(e.value) and "tokenizer" in str(e.value)


def test_a_tag_resolves_from_a_local_hub_cache(tmp_path, tiny):
    """`ARCH/TAG` finds its weights in a Hugging Face cache folder, offline; the blob's name is its checkpoint id."""
    import hashlib

    data = tiny["clip-vit"].weights.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    repo = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / digest).write_bytes(data)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "snapshots" / "abc123" / "open_clip_model.safetensors").symlink_to(repo / "blobs" / digest)
    resolved = resolve_backbone("ViT-B-32/laion2b_s34b_b79k", hf_cache=str(tmp_path / "hub"))
    assert resolved.checkpoint_id == digest[:16] and resolved.slug == "vit-b-32-laion2b-s34b-b79k"
    assert (resolved.image_size, resolved.context_length, resolved.embed_dim) == ((224, 224), 77, 512)
    assert resolved.preprocess.resize_mode == "shortest" and resolved.tokenizer.kind == "simple"


def test_openai_names_still_load_through_clip(tmp_path):
    (tmp_path / "ViT-L-14-336px.pt").touch()  # found, not read: its checksum is in its URL
    resolved = resolve_backbone("ViT-L/14@336px", download_root=str(tmp_path))
    assert resolved.kind == "clip" and resolved.checkpoint_id == "3035c92b35095992"
    assert resolved.image_size == (336, 336) and resolved.tokenizer.kind == "clip"


def test_job_entries_become_names_with_their_options(tiny):
    from newsclip import config

    cfg = config.from_dict({"backbones": ["demo-tiny", tiny["xlm-roberta"].entry,
                                          {"backbone": "ViT-B/32", "name": "b32-de", "text": "original"}]})
    assert cfg.backbones == ("demo-tiny", f"{tiny['xlm-roberta'].arch}/{tiny['xlm-roberta'].weights.name}", "b32-de")
    assert cfg.text_of(cfg.backbones[1]) == "original" and cfg.text_of("demo-tiny") == "translated"
    again = config.from_dict(__import__("yaml").safe_load(config.dump(cfg)))  # config.resolved.yaml loads back
    assert again.backbones == cfg.backbones and again.backbone_options == cfg.backbone_options
    with pytest.raises(config.ConfigError, match=r"backbones\[1\]"):
        config.from_dict({"backbones": ["demo-tiny", {"open_clip": "ViT-B-32"}]})


def test_a_job_with_demo_tiny_and_an_open_clip_file_runs_end_to_end(tmp_path, tiny, demo_tiny, packages_dir, capsys):
    """`backbones: [demo-tiny, {open_clip: ARCH, pretrained: FILE}]` (a tiny registered ViT config with random weights
    saved to a file: the real ViT-B-32 is too slow for the suite on 2 CPU cores), the open_clip one on the original
    German texts and the fine-tune-free demo-tiny on the translated ones; the report names both preprocesses."""
    import json

    import yaml

    from newsclip.cli import main
    from newsclip.demo.data import write_demo_data
    from newsclip.names import encode_entry

    write_demo_data(tmp_path / "data", 60, seed=3)
    entry = {"open_clip": tiny["clip-vit"].arch, "pretrained": str(tiny["clip-vit"].weights), "text": "original"}
    job = {"name": "open-clip", "input": {"articles": str(tmp_path / "data" / "articles"),
                                          "images": str(tmp_path / "data" / "images")},
           "output_dir": str(tmp_path / "out"), "backbones": ["demo-tiny", entry],
           "translate": {"packages_dir": str(packages_dir)}, "eval": {"bootstrap": 20}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    assert main(["run", str(tmp_path / "job.yaml")]) == 0
    name = f"{tiny['clip-vit'].arch}/{tiny['clip-vit'].weights.name}"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert {r["backbone"] for r in metrics["rows"]} >= {"demo-tiny", name}
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"- {name}: open_clip {tiny['clip-vit'].arch}; shortest resize to 32x32 (bicubic)" in report
    assert "- demo-tiny: clip; shortest resize to 64x64 (bicubic)" in report and "text original" in report
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]
    assert manifest[encode_entry(name, "texts")]["text"] == "original"
    # `newsclip backbones JOB`: each of the job's backbones as the run resolved it, with its weights file
    capsys.readouterr()
    assert main(["backbones", str(tmp_path / "job.yaml")]) == 0
    listed = capsys.readouterr().out
    assert f"{name}: open_clip {tiny['clip-vit'].arch}, 32 px" in listed and str(tiny["clip-vit"].weights) in listed
    assert "demo-tiny: clip, 64 px, 64-d, texts translated" in listed
    # `newsclip search` with the open_clip backbone: the query is a new text, encoded by the entry's model
    capsys.readouterr()
    assert main(["search", str(tmp_path / "job.yaml"), "Ein Hund spielt im Schnee", "--backbone", name, "--k", "3",
                 "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["backbone"] == name and len(answer["results"]) == 3
    # a missing weights file stops the job before anything starts: exit status 2, naming the file
    job["backbones"] = ["demo-tiny", {**entry, "pretrained": str(tmp_path / "gone.safetensors")}]
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    capsys.readouterr()
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    assert str(tmp_path / "gone.safetensors") in capsys.readouterr().err
    assert main(["backbones", str(tmp_path / "job.yaml")]) == 2  # the check before a run says the same
    listed = capsys.readouterr().out
    assert "demo-tiny: clip" in listed and ": missing\n  " in listed and str(tmp_path / "gone.safetensors") in listed


def test_sigmoid_loss_is_open_clips_siglip_loss():
    import torch
    from open_clip.loss import SigLipLoss

    from newsclip.finetune.loop import sigmoid_loss

    torch.manual_seed(0)
    image, text = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1), torch.nn.functional.normalize(
        torch.randn(6, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    ours = sigmoid_loss(image, text, scale, bias)
    assert ours.item() == pytest.approx(SigLipLoss()(image, text, scale, bias).item(), rel=1e-6)


@pytest.mark.parametrize("family", ["siglip", "clip-vit"])
def test_an_open_clip_fine_tune_step_and_its_result_load_as_a_backbone(tmp_path, tiny, family):
    """A training step through the fine-tune's towers (SigLIP: the sigmoid loss, whose logit bias gets a gradient),
    then the saved weights with their training record load as a backbone of the mapping form, carrying the split."""
    import torch

    from newsclip.finetune.loop import forward_loss, towers
    from newsclip.finetune.run import tuned_entry
    from newsclip.retrieval.registry import load_model
    from newsclip.retrieval.trained import is_checkpoint_file, read_training_record, save_checkpoint

    entry = check_value("b", BackboneEntry, tiny[family].entry)
    start = resolve_backbone(entry_name(entry), entry)
    model = load_model(start)
    pixels = torch.from_numpy(np.stack([np.asarray(i.convert("RGB").resize((32, 32))).transpose(2, 0, 1)
                                        for i in _images()]))
    tokens = torch.from_numpy(tokenize_texts(pa.table({"hash": list("abcd"), "query_text": TEXTS_}),
                                             start.context_length, start.tokenizer).column("tokens")
                              .combine_chunks().flatten().to_numpy().reshape(4, -1).copy())
    loss = forward_loss(towers(model, start), pixels, tokens, "fp32")
    loss.backward()
    assert (getattr(model.logit_bias, "grad", None) is not None) == (family == "siglip") and torch.isfinite(loss)
    assert model.logit_scale.grad is not None
    record = {"version": 1, "train": {"articles": ["a1"], "image_hashes": []}, "validation": {}}
    with open(tmp_path / "model.pt", "wb") as f:
        save_checkpoint(f, {k: v.detach() for k, v in model.state_dict().items()}, record)
    _, tuned = tuned_entry(start, tmp_path / "model.pt")
    resolved = resolve_backbone(entry_name(tuned), tuned)
    assert resolved.preprocess == start.preprocess and resolved.tokenizer == start.tokenizer
    assert is_checkpoint_file(resolved) and read_training_record(resolved.weights) == record
    loaded = load_model(resolved)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
