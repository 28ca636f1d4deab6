"""The values a backbone is resolved into once per job: its job entry, its tokenizer, its preprocess, and the whole."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

Text = Literal["original", "translated"]
ORIGINAL, TRANSLATED = "original", "translated"  # a backbone's texts (a choice, not a folder)


@dataclass(frozen=True)
class PreprocessSettings:
    """An image preprocess given in a job (`backbones: [{open_clip: ..., preprocess: {...}}]`): unset keys follow the
    architecture's published tags."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize_mode: Literal["shortest", "longest", "squash"] | None = None
    interpolation: Literal["bicubic", "bilinear"] | None = None
    fill_color: int | None = None


@dataclass(frozen=True)
class BackboneEntry:
    """A backbone entry of a job written as a mapping: `{open_clip: ARCH, pretrained: TAG_OR_FILE}` (open_clip's
    names), or `{backbone: NAME_OR_FILE}` (a registry name or a CLIP checkpoint), with its own options."""

    open_clip: str | None = None  # an open_clip architecture, e.g. ViT-SO400M-16-SigLIP2-384
    pretrained: str | None = None  # its pretrained tag (webli) or a weights file or folder
    backbone: str | None = None  # or a name of the OpenAI registry, demo-tiny or a CLIP checkpoint file
    name: str | None = None  # what the job calls it (reports, fusion, per_backbone); default from the above
    text: Text = TRANSLATED  # which text it reads: translated (English) or the original (multilingual models)
    tokenizer: str | None = None  # a local tokenizer folder, for tokenizers open_clip takes from the Hub
    text_model: str | None = None  # a local folder of the Hugging Face text tower's config (XLM-R)
    preprocess: PreprocessSettings | None = None

    def __post_init__(self) -> None:
        if (self.open_clip is None) == (self.backbone is None):
            raise ValueError("expected either open_clip: ARCH (with pretrained: TAG_OR_FILE) or backbone: NAME")
        if self.open_clip is not None and not self.pretrained:
            raise ValueError(f"open_clip: {self.open_clip} needs pretrained: a tag of open_clip's or a weights file")
        if self.backbone is not None and (self.pretrained or self.tokenizer or self.text_model or self.preprocess):
            raise ValueError("backbone: takes only name and text; pretrained, tokenizer, text_model and preprocess "
                             "are for open_clip entries")


@dataclass(frozen=True)
class TokenizerSpec:
    """How texts become tokens: clip's own tokenize (clip), open_clip's SimpleTokenizer (simple) or a Hugging Face
    tokenizer read from a local folder (hf), with open_clip's arguments for it."""

    kind: Literal["clip", "simple", "hf"]
    context_length: int
    folder: str | None = None
    mode: str | None = None  # open_clip's tokenizer_mode
    kwargs_json: str = "{}"  # open_clip's tokenizer_kwargs (JSON: the spec stays hashable)

    @property
    def kwargs(self) -> dict:
        return json.loads(self.kwargs_json)

    def describe(self) -> str:
        return {"clip": "clip.tokenize", "simple": "open_clip SimpleTokenizer"}.get(self.kind, f"HF {self.folder}")


@dataclass(frozen=True)
class PreprocessSpec:
    """The image preprocess a model was trained with: resize mode, interpolation, mean and std, output size."""

    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    fill_color: int = 0

    def describe(self) -> str:
        return (f"{self.resize_mode} resize to {self.size[0]}x{self.size[1]} ({self.interpolation}), mean "
                f"{_short(self.mean)}, std {_short(self.std)}")


def _short(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


@dataclass(frozen=True)
class ResolvedBackbone:
    """One backbone, resolved once per job: what every stage and worker needs, so that none resolves its name again.

    `kind` clip: loaded by the clip package (the nine OpenAI names, demo-tiny, CLIP checkpoint files); open_clip: an
    open_clip architecture with local weights (`arch`, `model_cfg_json`: its config as resolved, so that a worker
    builds it without the driver's registry)."""

    name: str
    slug: str
    kind: Literal["clip", "open_clip"]
    weights: str  # the local file that holds the weights
    checkpoint_id: str  # first 16 hex digits of its sha256: the store's key
    image_size: tuple[int, int]
    context_length: int
    embed_dim: int
    tokenizer: TokenizerSpec
    preprocess: PreprocessSpec
    image_gflops: float  # the cost of one image: sets the default GPU batch and GPU share
    text: Text = TRANSLATED
    source: str = ""  # clip: the name or path clip loads; open_clip: the pretrained tag or file as the job gave it
    download_root: str | None = None
    arch: str | None = None
    model_cfg_json: str | None = None
    text_model: str | None = None  # open_clip: the local folder of a Hugging Face text tower's config
    loss: Literal["infonce", "sigmoid"] = "infonce"  # the loss it was trained with (fine-tuning uses it)

    @property
    def model_cfg(self) -> dict:
        return json.loads(self.model_cfg_json or "{}")

    def describe(self) -> str:
        """One line for the report: where it comes from and its preprocessing."""
        origin = "clip" if self.kind == "clip" else f"open_clip {self.arch}"
        return f"{origin}; {self.preprocess.describe()}; tokenizer {self.tokenizer.describe()}; text {self.text}"
