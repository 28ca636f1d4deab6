"""Backbone registry and loader: slugs, local checkpoints of both CLIP families, offline failures."""

from __future__ import annotations

import hashlib
import re
import socket
import urllib.request
from pathlib import Path

import pytest
import torch

from newsclip.names import slug
from newsclip.retrieval import backbones
from newsclip.retrieval.backbones import BACKBONES, checkpoint_id, load_backbone

clip = pytest.importorskip("clip")
from clip.model import CLIP  # noqa: E402

# Shrunk OpenAI architectures; widths follow build_model's inference (ResNet heads = width * 32 // 64, text and
# ViT heads = width // 64), so the reloaded model has the same shape. A small vocabulary keeps the files small.
VOCAB, CONTEXT = 500, 16


def tiny_clip(family: str, vocab: int = VOCAB) -> CLIP:
    """A random-weight CLIP; `vocab=49408` (clip's tokenizer) makes one that can encode real text in a job."""
    torch.manual_seed(0 if family == "resnet" else 1)
    if family == "resnet":
        model = CLIP(32, 64, (1, 1, 1, 1), 8, None, CONTEXT, vocab, 64, 1, 1)
        for module in model.modules():  # non-trivial BatchNorm statistics, so that buffers must load too
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                torch.nn.init.uniform_(module.weight, 0.5, 1.5)
    else:
        model = CLIP(32, 32, 1, 64, 16, CONTEXT, vocab, 64, 1, 1)
    return model.eval()


def inputs(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(3, 3, resolution, resolution, generator=generator)
    text = torch.randint(1, VOCAB - 1, (3, CONTEXT), generator=generator)
    text[:, 9] = VOCAB - 1  # end-of-text is the highest id: encode_text pools there
    text[:, 10:] = 0
    return images, text


def test_registry_matches_clip_package():
    import clip.clip

    assert set(BACKBONES) == set(clip.available_models()) | {"demo-tiny"}
    assert backbones._OPENAI_URLS == clip.clip._MODELS
    assert BACKBONES["ViT-L/14@336px"].input_resolution == 336 and BACKBONES["RN50"].embed_dim == 1024
    assert {s.family for s in BACKBONES.values()} == {"resnet", "vit"}


def test_slugs_unique_and_safe():
    slugs = [slug(name) for name in BACKBONES]
    assert len(set(slugs)) == len(slugs)
    assert all(re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", s) for s in slugs)
    assert slug("ViT-L/14@336px") == "vit-l-14-336px"
    assert slug("RN50x4") == "rn50x4"
    assert slug("ViT-B/32") == "vit-b-32"
    assert slug("demo-tiny") == "demo-tiny"
    # a generically named checkpoint (what `newsclip finetune` writes) takes its folder's name too
    assert slug("/out/finetune/demo/model.pt") == "demo-model" and slug("/m/news-2024.pt") == "news-2024"


def test_backbones_whose_files_would_clash_are_a_config_error():
    from newsclip import config
    from newsclip.yaml_config import ConfigError

    with pytest.raises(ConfigError, match=r"backbones: \['a/x.pt', 'b/x.pt'\] would write the same files"):
        config.load(None, ["backbones=[a/x.pt, b/x.pt]"])
    assert config.load(None, ["backbones=[a/model.pt, b/model.pt]"]).backbones == ("a/model.pt", "b/model.pt")
    assert slug("/models/My_Clip.v2.pt") == "my-clip-v2"


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEWSCLIP_CACHE", str(tmp_path))
    assert backbones.cache_dir() == tmp_path
    monkeypatch.delenv("NEWSCLIP_CACHE")
    assert backbones.cache_dir() == Path.home() / ".cache" / "newsclip"


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_state_dict_roundtrip(family, tmp_path):
    model = tiny_clip(family)
    path = tmp_path / f"tiny-{family}.pt"
    torch.save(model.state_dict(), path)

    loaded, preprocess = load_backbone(str(path))
    assert not loaded.training
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    resolution = model.visual.input_resolution
    assert loaded.visual.input_resolution == resolution
    assert preprocess.transforms[1].size == (resolution, resolution)  # CenterCrop
    images, text = inputs(resolution)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.encode_text(text), model.encode_text(text), rtol=1e-5, atol=1e-5)
    assert checkpoint_id(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_fp32_weights_load_bit_for_bit(family, tmp_path):
    # a fine-tune's updates at lr 1e-5 are mostly under fp16's resolution: rounded through fp16 (clip's
    # build_model), they vanished or came back far off, and the model scored was partly the starting one
    model = tiny_clip(family)
    generator = torch.Generator().manual_seed(3)
    state = {k: v + 1e-6 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    path = tmp_path / "finetuned.pt"
    torch.save(state, path)
    loaded = load_backbone(str(path))[0].state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_an_fp16_archive_loads_as_clip_loads_it(tmp_path):
    # OpenAI's files: TorchScript archives of clip's mixed fp16 model (convert_weights)
    from clip.model import convert_weights

    model = tiny_clip("vit")
    convert_weights(model)
    images, text = inputs(32)
    path = tmp_path / "fp16.pt"
    with torch.no_grad():
        torch.jit.trace(model, (images.half(), text), check_trace=False).save(str(path))
    ours, theirs = load_backbone(str(path))[0].state_dict(), clip.load(str(path), "cpu", jit=False)[0].state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype == torch.float32 and torch.equal(ours[key], tensor), key


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_archive(tmp_path):
    # OpenAI's files are TorchScript archives; a traced tiny model has the same layout and goes through
    # clip.load(path, jit=False), which rebuilds a plain module from the archive's weights
    model = tiny_clip("vit")  # fp32: it loads bit for bit too
    images, text = inputs(32)
    path = tmp_path / "traced.pt"
    with torch.no_grad():
        torch.jit.trace(model, (images, text), check_trace=False).save(str(path))
    assert backbones._is_torchscript(path)
    loaded, preprocess = load_backbone(str(path))
    assert isinstance(loaded, CLIP)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), rtol=1e-5, atol=1e-5)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_missing_openai_weights_fail_offline(no_network, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_backbone("ViT-L/14@336px", download_root=tmp_path)
    message = str(error.value)
    assert "ViT-L-14-336px.pt" in message and str(tmp_path) in message and "download_root" in message
    # the cache key of a published checkpoint is its published checksum: no file needed
    assert checkpoint_id("ViT-L/14@336px") == "3035c92b35095992"


def test_corrupt_openai_weights_fail_offline(no_network, tmp_path):
    (tmp_path / "RN50.pt").write_bytes(b"partial download")
    with pytest.raises(ValueError, match="sha256"):
        load_backbone("RN50", download_root=tmp_path)


def test_missing_demo_tiny(monkeypatch, tmp_path):
    monkeypatch.setenv("NEWSCLIP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="newsclip demo-model"):
        load_backbone("demo-tiny")
    with pytest.raises(FileNotFoundError, match="newsclip demo-model"):
        checkpoint_id("demo-tiny")


def test_bad_paths(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_backbone(str(missing))
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_backbone(str(tmp_path))
    not_clip = tmp_path / "not-clip.pt"
    torch.save({"weight": torch.zeros(2)}, not_clip)
    with pytest.raises(ValueError, match="not an OpenAI-CLIP state dict"):
        load_backbone(str(not_clip))


class Payload:
    """An arbitrary pickled object: weights_only loading must refuse it rather than run its code."""


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match="cannot read"):
        load_backbone(str(path))
