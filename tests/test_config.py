"""Job config: YAML into frozen dataclasses, errors that name the key, overrides, the shipped job files."""

import re
from pathlib import Path

import pytest

from newsclip import config
from newsclip.config import JobConfig
from newsclip.yaml_config import ConfigError

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key", [
    ("encode:\n  batchsize: 3\n", "encode.batchsize: unknown key"),
    ("encode:\n  batch_size: many\n", "encode.batch_size: expected int"),
    ("encode:\n  batch_size: true\n", "encode.batch_size: expected int"),
    ("eval:\n  candidates: some\n", "eval.candidates: 'some' is not one of"),
    ("eval:\n  k: 0\n", "eval.k: must be at least 1"),
    ("encode: [1, 2]\n", "encode: expected a mapping"),
    ("backbones: []\n", "backbones: expected a non-empty list"),
    ("knn:\n  shards: -2\n", "knn.shards: must not be negative"),
    ("outputdir: x\n", "outputdir: unknown key"),
    ("encode:\n  device: cuda\n", "encode.device: cuda needs num_gpus_per_actor above 0"),
    ("encode:\n  precision: fp8\n", "encode.precision: 'fp8' is not one of"),
    ("encode:\n  fp16: true\n", "encode.fp16: unknown key; known keys of encode: actors, alpha, batch_size"),
    ("ray:\n  wait_timeout_s: 0\n", "ray.wait_timeout_s: must be above 0 seconds"),
])
def test_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")) as info:
        config.load(_write(tmp_path, text))
    assert str(tmp_path / "job.yaml") in str(info.value)


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(_write(tmp_path, "a: [1,\n"))
    with pytest.raises(ConfigError, match="job file not found"):
        config.load(tmp_path / "nope.yaml")


def test_overrides_and_frozen(tmp_path):
    cfg = config.load(JOBS / "demo.yaml", ["input.articles=/data/a", "eval.sample_size=null", "knn.shards=7",
                                           "backbones=[demo-tiny, RN50]"])
    assert cfg.input.articles == "/data/a" and cfg.eval.sample_size is None
    assert cfg.knn.shards == 7 and cfg.knn.k == cfg.eval.k == 100
    assert cfg.backbones == ("demo-tiny", "RN50")
    with pytest.raises(AttributeError):
        cfg.name = "other"
    with pytest.raises(ConfigError, match="expected key=value"):
        config.load(None, ["input.articles"])


def test_shipped_jobs_load_and_demo_matches_embedded_defaults():
    assert config.load(JOBS / "demo.yaml") == JobConfig()  # `newsclip demo` and jobs/demo.yaml cannot drift
    paper = config.load(JOBS / "newsimages2022.yaml")
    assert len(paper.backbones) == 9 and paper.eval.sample_size == 2000 and paper.eval.k == 100


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(JOBS / "newsimages2022.yaml", ["eval.seed=5"])
    path = _write(tmp_path, config.dump(cfg))
    assert config.load(path) == cfg


def test_encode_settings_per_backbone_follow_cost_on_gpus_and_stay_small_on_cpus():
    gpu = config.load(None, ["backbones=[RN50, ViT-L/14, RN50x64]", "encode.num_gpus_per_actor=1",
                             "encode.per_backbone={RN50x64: {batch_size: 16, precision: fp32}}"]).encode
    rn50, vit, big = (gpu.for_backbone(b) for b in ("RN50", "ViT-L/14", "RN50x64"))
    assert (rn50.batch_size, rn50.num_gpus_per_actor, rn50.precision) == (1024, 0.25, "fp16")  # light: a quarter GPU
    assert (vit.batch_size, vit.num_gpus_per_actor, vit.precision, vit.device) == (128, 1.0, "fp16", "cuda")
    assert (big.batch_size, big.num_gpus_per_actor, big.precision) == (16, 1.0, "fp32")  # its own keys win
    assert gpu.for_backbone("/models/finetuned.pt").batch_size == 512  # unknown cost: a mid-sized model
    cpu = config.load(None).encode.for_backbone("demo-tiny")
    assert (cpu.batch_size, cpu.num_gpus_per_actor, cpu.precision, cpu.device, cpu.decode) == (64, 0.0, "fp32", "cpu",
                                                                                                 "cpu")
    fixed = config.load(None, ["encode.batch_size=8", "encode.num_gpus_per_actor=1"]).encode
    assert fixed.for_backbone("RN50").batch_size == 8  # an explicit batch size holds for every backbone


@pytest.mark.parametrize("override, message", [
    ("encode.per_backbone={RN50: {batch_size: 4}}", "encode.per_backbone: names ['RN50'], which are not in backbones"),
    ("encode.per_backbone={demo-tiny: {batch_size: 0}}",
     "encode.per_backbone.demo-tiny.batch_size: must be at least 1"),
    ("encode.per_backbone={demo-tiny: {gpus: 1}}", "encode.per_backbone.demo-tiny.gpus: unknown key"),
    ("encode.per_backbone=[demo-tiny]", "encode.per_backbone: expected a mapping"),
])
def test_per_backbone_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config.load(None, [override])
