"""The job configuration: one frozen dataclass per section, built from YAML by yaml_config, checked as a whole."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml

from newsclip.names import parse_fusion_name, slug
from newsclip.retrieval.backbone_values import TRANSLATED, BackboneEntry, ResolvedBackbone
from newsclip.retrieval.search import KnnConfig
from newsclip.runtime.layout import Layout
from newsclip.translate.translator import TranslateConfig
from newsclip.yaml_config import ConfigError, build, read_yaml, to_dict


@dataclass(frozen=True)
class InputConfig:
    articles: str = "newsclip-demo/data/articles"  # a folder or glob of Parquet shards
    images: str = "newsclip-demo/data/images"


@dataclass(frozen=True)
class PrepareConfig:
    text: Literal["title_body", "title", "body"] = "title_body"  # what the text encoder reads


@dataclass(frozen=True)
class EvalConfig:
    sample_size: int | None = 2000  # pairs sampled for evaluation (the paper's 2,000); null = all pairs
    seed: int = 0
    candidates: Literal["sample", "all"] = "sample"  # sample: rank among sampled images (paper); all: every image
    k: int = 100
    # text_to_image is the task (which image belongs to this article); image_to_text asks which article an image is for
    directions: tuple[Literal["text_to_image", "image_to_text"], ...] = ("text_to_image", "image_to_text")
    bootstrap: int = 1000  # resamples (seeded by eval.seed) for the 95% intervals and paired comparisons
    # byte-identical images under other ids tie exactly with the true image: id (the lower id first, as the
    # rankings list them), optimistic (the truth first among its duplicates) or pessimistic (last)
    ties: Literal["id", "optimistic", "pessimistic"] = "id"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k: must be at least 1")
        if self.sample_size is not None and self.sample_size < 1:
            raise ValueError("sample_size: must be at least 1 or null")
        if self.bootstrap < 1:  # the intervals and paired comparisons need resamples
            raise ValueError(f"bootstrap: must be at least 1 (resamples for the intervals), got {self.bootstrap}")


def _at_least_one(section, keys: tuple[str, ...]) -> None:
    """Each of `keys` that is set must be 1 or more (the config loader prefixes the section to the message)."""
    for key in keys:
        if getattr(section, key) is not None and getattr(section, key) < 1:
            raise ValueError(f"{key}: must be at least 1")


# fp32: model.float(); fp16: clip's own mixed precision (what clip.load gives on CUDA: LayerNorms stay fp32);
# bf16: the fp32 model under bf16 autocast; auto: fp16 on GPUs, fp32 on CPUs (fp16 on this CPU was ~5x slower)
Precision = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass(frozen=True)
class BackboneEncode:
    """One backbone's own encode settings (`encode.per_backbone.<name>`); unset keys follow `encode`."""

    batch_size: int | None = None
    actors: int | None = None
    num_gpus_per_actor: float | None = None
    precision: Precision | None = None

    def __post_init__(self) -> None:
        _at_least_one(self, ("batch_size", "actors"))


CPU_BATCH = 64  # on CPUs the batch size barely matters for speed; 64 keeps memory small
GPU_BATCH_GFLOPS = 32_768  # on a GPU, a batch of about this much work: RN50 1024, ViT-L/14 128, RN50x64 32


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int | None = None  # null: 64 on CPUs; on GPUs from each backbone's cost (see for_backbone)
    actors: int = 1  # most model actors per backbone and side (the pool starts at one and grows with the work)
    # a model actor's CPUs (decoding and tokenising run as tasks on the others); null: 1 on GPUs (the core that
    # feeds its GPU), 0 on CPUs (Ray's own default for a running actor: decode tasks take every core and the model
    # shares them; with 1, a 2-core laptop decoded on one core and ran 2x slower)
    num_cpus_per_actor: float | None = None
    # GPUs per actor for the costliest backbones; lighter ones take a half or a quarter of it (see for_backbone)
    num_gpus_per_actor: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when the actors ask Ray for GPUs
    torch_threads: int = 1
    precision: Precision = "auto"
    # where images are decoded: cpu (CPU tasks, PIL: the paper's exact preprocess) | gpu (JPEGs with nvjpeg in the
    # model actor, resize and crop there; other formats on the CPU) | auto (gpu on GPUs, cpu on CPUs)
    decode: Literal["auto", "cpu", "gpu"] = "cpu"
    jpeg_draft: bool = False  # CPU decoding of JPEGs at a reduced DCT scale (2x faster on photos; other pixels)
    # transparent images: drop (left to clip's preprocess: resize, then convert("RGB")) | white (onto white)
    alpha: Literal["drop", "white"] = "drop"
    download_root: str | None = None  # where OpenAI weights are cached (clip's default: ~/.cache/clip)
    # the Hugging Face Hub cache that open_clip tags' weights and tokenizers are read from, offline (null: the Hub's
    # own default, HF_HUB_CACHE or ~/.cache/huggingface/hub)
    hf_cache: str | None = None
    max_image_pixels: int = 40_000_000  # decompression-bomb bound for image decoding
    commit_rows: int = 10_000  # new embeddings are committed to the store this often: a crash loses at most this
    parallel_backbones: int = 1  # backbones encoded at once: 1 on one GPU or a laptop; more on a cluster
    per_backbone: dict[str, BackboneEncode] = field(default_factory=dict)  # e.g. {RN50x64: {batch_size: 16}}

    def __post_init__(self) -> None:
        _at_least_one(self, ("batch_size", "actors", "torch_threads", "max_image_pixels", "commit_rows",
                             "parallel_backbones"))
        if self.device == "cuda" and self.num_gpus_per_actor == 0:
            raise ValueError("device: cuda needs num_gpus_per_actor above 0 (Ray gives GPUs only to actors that "
                             "ask for them)")

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda" or (self.device == "auto" and self.num_gpus_per_actor > 0)

    def for_backbone(self, name: str, image_gflops: float | None = None) -> EncodeConfig:
        """The settings one backbone's encoders run with, every `auto` resolved: its own keys, else defaults from
        its cost.

        On GPUs: device cuda, a batch of about GPU_BATCH_GFLOPS of work (a power of two, 32 to 1024), fp16, and a
        GPU share by cost (under 15 GFLOPs an image: a quarter, under 50: a half), so that light backbones running
        side by side share a GPU. On CPUs: device cpu, batches of 64, fp32, no GPU. `image_gflops`: the resolved
        backbone's cost (ResolvedBackbone.image_gflops); else the registry's, or a mid-sized model's."""
        from newsclip.retrieval.backbones import BACKBONES

        spec = BACKBONES.get(name)
        gflops = image_gflops if image_gflops is not None else spec.image_gflops if spec else 50.0
        if self.on_gpu:
            batch = int(min(1024, max(32, 2 ** math.floor(math.log2(GPU_BATCH_GFLOPS / gflops)))))
            gpus = self.num_gpus_per_actor * (0.25 if gflops < 15 else 0.5 if gflops < 50 else 1.0)
            device, precision, decode = "cuda", "fp16", "gpu"
        else:
            batch, gpus, device, precision, decode = CPU_BATCH, self.num_gpus_per_actor, "cpu", "fp32", "cpu"
        own = self.per_backbone.get(name, BackboneEncode())
        return replace(self, batch_size=_first(own.batch_size, self.batch_size, batch), device=device,
                       num_cpus_per_actor=_first(self.num_cpus_per_actor, 1.0 if self.on_gpu else 0.0),
                       precision=_first(*(p for p in (own.precision, self.precision) if p != "auto"), precision),
                       decode=decode if self.decode == "auto" else self.decode,
                       actors=_first(own.actors, self.actors),
                       num_gpus_per_actor=_first(own.num_gpus_per_actor, gpus), per_backbone={})


def _first(*values):
    return next(v for v in values if v is not None)


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray started on demand
    num_cpus: int | None = None  # local Ray only
    # An encoder or translator actor that dies (node lost, OOM kill) is restarted and its in-flight batches are
    # retried, a bounded number of times: Ray Data's default is forever, which loops on a batch that always kills
    # its worker. Bad rows never crash a batch (they go to rejects/), so a retry means the machine failed. A lost node
    # costs an in-flight batch about 7 retries before Ray declares the node dead (measured with Ray's default health
    # checks, tests/test_node_chaos.py), hence 10; a batch that kills its actor every time still stops after 3.
    max_actor_restarts: int = 3
    max_task_retries: int = 10
    # A stage's work of at most this many rows runs in the driver's own process, the same code on the same batches:
    # the image check, translation, and encoding when its actors would run on CPUs. A small night then starts no
    # Ray at all; starting a pool and loading its model cost seconds per stage and side. 0: always Ray.
    inline_rows: int = 1000
    # On a cluster that may grow (an address is given), an actor pool that no node can hold yet waits this long for
    # one (the autoscaler is asked for it), then the job stops, naming the setting. A local Ray never grows: a request
    # it can never meet stops the job before its first stage.
    wait_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.wait_timeout_s > 0:
            raise ValueError(f"wait_timeout_s: must be above 0 seconds, got {self.wait_timeout_s!r}")


@dataclass(frozen=True)
class JobConfig:
    name: str = "demo"
    input: InputConfig = field(default_factory=InputConfig)
    output_dir: str = "newsclip-demo/output"
    # embeddings by content hash, reused across runs (nightly: only new content is encoded); null: output_dir/store
    store_dir: str | None = None
    # names (OpenAI's nine, demo-tiny, a CLIP checkpoint file, open_clip's ARCH/TAG) or mappings ({open_clip: ARCH,
    # pretrained: TAG_OR_FILE, text: original, ...}: BackboneEntry); a mapping is kept under its name in
    # backbone_options, so that every other part of the job names a backbone by its name
    backbones: tuple[str, ...] = ("demo-tiny",)
    backbone_options: dict[str, BackboneEntry] = field(default_factory=dict)
    # fused rankings scored like a backbone: "fusion:A+B" (mean of z-normalised cosines), "fusion-rrf:A+B" (RRF)
    fusion: tuple[str, ...] = ()
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    translate: TranslateConfig = field(default_factory=TranslateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    knn: KnnConfig = field(default_factory=lambda: KnnConfig(shards=2))
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def output(self) -> Path:
        return Path(self.output_dir).expanduser()

    @property
    def layout(self) -> Layout:
        """Every path under `output_dir`."""
        return Layout(self.output)

    @cached_property
    def _resolved(self) -> dict[str, ResolvedBackbone]:
        return {}

    def resolved(self, name: str) -> ResolvedBackbone:
        """One backbone of this job resolved (weights, sizes, tokenizer, preprocess, cost), once per job: what the
        stages and workers take. Raises MissingFiles (FileNotFoundError) for files that are not here; the preflight
        says so first, with exit status 2."""
        if name not in self._resolved:
            from newsclip.retrieval.registry import resolve_backbone

            self._resolved[name] = resolve_backbone(name, self.backbone_options.get(name), self.encode.download_root,
                                                    self.encode.hf_cache)
        return self._resolved[name]

    @property
    def resolved_backbones(self) -> dict[str, ResolvedBackbone]:
        """Every backbone of the job resolved (see `resolved`)."""
        return {name: self.resolved(name) for name in self.backbones}

    def text_of(self, backbone: str) -> str:
        """original | translated: which texts a backbone reads."""
        entry = self.backbone_options.get(backbone)
        return entry.text if entry else TRANSLATED

    @property
    def store(self) -> Path:
        return Path(self.store_dir).expanduser() if self.store_dir else self.layout.store

    @property
    def query_texts(self) -> Path:
        """Where the encode and evaluate stages read the query texts (`query_text`, in English when translated)."""
        return self.layout.query_texts(self.translate.enabled)


def _validate(cfg: JobConfig) -> None:
    checks = [
        (len(cfg.backbones) > 0, "backbones", "expected a non-empty list of backbone names"),
        (len(cfg.eval.directions) > 0, "eval.directions", "expected text_to_image, image_to_text or both"),
        (cfg.knn.k == cfg.eval.k, "knn.k", f"must equal eval.k ({cfg.eval.k}); set eval.k only"),
        (len(set(cfg.backbones)) == len(cfg.backbones), "backbones", "lists a backbone twice"),
    ]
    for name in cfg.fusion:
        try:
            _, members = parse_fusion_name(name)
        except ValueError as e:
            raise ConfigError(f"fusion: {e}") from None
        missing = [m for m in members if m not in cfg.backbones]
        checks.append((not missing, "fusion", f"{name!r} fuses {missing} which are not in backbones"))
    stray = [name for name in cfg.backbone_options if name not in cfg.backbones]
    checks.append((not stray, "backbone_options", f"names {stray}, which are not in backbones"))
    unknown = [name for name in cfg.encode.per_backbone if name not in cfg.backbones]
    checks.append((not unknown, "encode.per_backbone", f"names {unknown}, which are not in backbones"))
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")
    slugs = [slug(b) for b in cfg.backbones]
    clash = [b for b, s in zip(cfg.backbones, slugs) if slugs.count(s) > 1]
    if clash:
        raise ConfigError(f"backbones: {clash} would write the same files (named {slug(clash[0])!r}); rename a file")


def _backbone_entries(raw: dict) -> None:
    """Mapping entries of `backbones` become their names, each mapping kept under its name in backbone_options."""
    from newsclip.retrieval.registry import entry_name
    from newsclip.yaml_config import check_value

    entries = raw.get("backbones")
    if not isinstance(entries, list | tuple) or not any(isinstance(e, dict) for e in entries):
        return
    options, names = dict(raw.get("backbone_options") or {}), []
    for i, item in enumerate(entries):
        if isinstance(item, dict):
            entry = check_value(f"backbones[{i}]", BackboneEntry, item)
            names.append(entry_name(entry))
            options[names[-1]] = item
        else:
            names.append(item)
    raw["backbones"], raw["backbone_options"] = names, options


def from_dict(raw: dict) -> JobConfig:
    raw = dict(raw)
    _backbone_entries(raw)
    # eval.k is the one k of the job; the knn section follows it (a section that is no mapping: build names it)
    knn, evaluation = raw.get("knn") or {}, raw.get("eval") or {}
    if isinstance(knn, dict) and isinstance(evaluation, dict):
        raw["knn"] = {"k": evaluation.get("k", EvalConfig.k), **knn}
    cfg = build(JobConfig, raw)
    _validate(cfg)
    return cfg


def require_input(raw: dict) -> None:
    """A job file must name its input: only the demo's own job (no file) reads the demo data by default."""
    given = raw.get("input") if isinstance(raw.get("input"), dict) else {}
    missing = [f"input.{key}" for key in ("articles", "images") if given.get(key) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)}: not given; name the folders (or globs) of the Parquet shards "
                          "in the job file (input: {articles: ..., images: ...}) or with --set "
                          f"{missing[0]}=...")


def load(path: str | Path | None, overrides: list[str] = ()) -> JobConfig:
    """Load a job file (or the embedded demo defaults when `path` is None) and apply `key=value` overrides."""
    raw = read_yaml(path, overrides)
    try:
        cfg = from_dict(raw)
        if path is not None:
            require_input(raw)
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None


def dump(cfg: JobConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
