"""The fine-tune settings: a frozen dataclass read from the job file's `finetune:` mapping, checked at load."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from newsclip.config import JobConfig, from_dict, require_input
from newsclip.yaml_config import ConfigError, build, read_yaml

SECTION = "finetune"


@dataclass(frozen=True)
class FinetuneConfig:
    backbone: str = "demo-tiny"  # the starting point: an OpenAI name, demo-tiny or a checkpoint path
    run: str = "default"  # the run's folder: output_dir/finetune/<run>/
    lock_image: bool = False  # LiT: the image tower keeps its weights (and its BatchNorm statistics)
    freeze_text: bool = False  # the text tower keeps its weights
    lr: float = 1e-5  # peak learning rate (AdamW); 1e-5 is the usual scale for fine-tuning OpenAI CLIP
    warmup_share: float = 0.05  # linear warm-up over this share of the steps, then cosine decay
    min_lr_share: float = 0.0  # the cosine ends at lr * min_lr_share
    weight_decay: float = 0.1  # on weight matrices only (not gains, biases, embeddings, the temperature)
    epochs: int | None = 1  # passes over the train split; ignored when `steps` is set
    steps: int | None = None  # optimizer steps (each of batch_size * workers * grad_accum pairs)
    batch_size: int = 32  # pairs per worker and micro-batch: the negatives each text and image sees
    grad_accum: int = 1  # micro-batches per optimizer step
    # fp32 | bf16 (autocast, GPU) | fp16 (autocast with a GradScaler, GPU) | auto: bf16 on GPUs, fp32 on CPUs
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: int = 1  # Ray Train workers (DDP ranks)
    gpus_per_worker: float = 0.0  # 0: CPU workers (a laptop)
    cpus_per_worker: float = 1.0
    validation_share: float = 0.1  # of the usable non-eval pairs, held out (by image) for early stopping
    seed: int = 0  # the split, the initial shuffle and torch's RNG
    eval_every: int | None = None  # validate (and checkpoint) every this many steps; null: once an epoch
    patience: int | None = None  # stop after this many validations without a better loss; null: never stop early
    max_failures: int = 2  # a failed worker group is restarted from the last checkpoint this often
    keep_checkpoints: int = 2  # checkpoints kept under finetune/<run>/ray/
    evaluate: bool = True  # then run the job's stages on [backbone, the fine-tuned model]: metrics, report, curve

    def __post_init__(self) -> None:
        for key in ("epochs", "steps", "batch_size", "grad_accum", "workers", "eval_every", "patience",
                    "keep_checkpoints"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be at least 1")
        if self.epochs is None and self.steps is None:
            raise ValueError("epochs: set epochs or steps")
        if not self.run or "/" in self.run or self.run.startswith("."):
            raise ValueError(f"run: {self.run!r} is not a folder name")
        if self.lr <= 0:
            raise ValueError("lr: must be above 0")
        if not 0 <= self.warmup_share < 1:
            raise ValueError("warmup_share: must be in [0, 1)")
        if not 0 <= self.min_lr_share <= 1:
            raise ValueError("min_lr_share: must be in [0, 1]")
        if not 0 <= self.validation_share < 1:
            raise ValueError("validation_share: must be in [0, 1)")
        if self.lock_image and self.freeze_text:
            raise ValueError("freeze_text: with lock_image too, only the temperature would train")
        if self.precision in ("bf16", "fp16") and self.gpus_per_worker == 0:
            raise ValueError(f"precision: {self.precision} needs GPU workers (gpus_per_worker above 0); CPUs "
                             f"train in fp32")
        if self.patience is not None and self.validation_share == 0:
            raise ValueError("patience: early stopping needs a validation split (validation_share above 0)")

    @property
    def on_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.on_gpu else "fp32"
        return self.precision


def load(path: str | Path | None, overrides: list[str] = ()) -> tuple[JobConfig, FinetuneConfig]:
    """The job (everything but `finetune:`, exactly as `newsclip run` reads it) and the fine-tune settings, from one
    job file with `--set` overrides (`--set finetune.lr=1e-4` too)."""
    raw = read_yaml(path, overrides)
    section = raw.pop(SECTION, None)  # the job schema has no `finetune` key: it is this package's own section
    try:
        job, finetune = from_dict(raw), build(FinetuneConfig, section, SECTION)
        if path is not None:
            require_input(raw)
        return job, finetune
    except ConfigError as e:
        raise ConfigError(f"{path or 'config'}: {e}") from None
