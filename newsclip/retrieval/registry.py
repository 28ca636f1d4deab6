"""One registry for every backbone: a job's name or mapping entry resolved once into a ResolvedBackbone (the clip
package's nine OpenAI names, demo-tiny and CLIP checkpoints; open_clip's architectures and tags), and its model."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from newsclip.names import checkpoint_label, slug
from newsclip.retrieval.backbone_values import (
    TRANSLATED,
    BackboneEntry,
    PreprocessSpec,
    ResolvedBackbone,
    TokenizerSpec,
)
from newsclip.retrieval.backbones import (
    BACKBONES,
    CONTEXT_LENGTH,
    _file_sha256,
    checkpoint_id,
    checkpoint_shapes,
    missing_weights,
    resolve_weights,
)
from newsclip.retrieval.open_clip_models import MissingFiles, is_open_clip_name, resolve_open_clip

if TYPE_CHECKING:
    import torch

# clip's preprocess (clip.clip._transform): bicubic on the short side, centre crop, these mean and std
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MID_GFLOPS = 50.0  # a checkpoint of unknown cost: a mid-sized model


def entry_name(entry: BackboneEntry) -> str:
    """The name a job gives a mapping entry: `name`, else the registry name, else `ARCH/TAG` or `ARCH/FILE_LABEL`."""
    if entry.name:
        return entry.name
    if entry.backbone is not None:
        return entry.backbone
    path = Path(entry.pretrained).expanduser()
    label = checkpoint_label(entry.pretrained) if ("/" in entry.pretrained or path.exists()) else entry.pretrained
    return f"{entry.open_clip}/{label}"


def weights_id(path: Path) -> str:
    """A weights file's checkpoint id: the first 16 hex digits of its sha256. A file in a Hugging Face cache is a
    link to `blobs/<its sha256>`: the name gives it without reading gigabytes."""
    real = Path(path).resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name[:16]
    return _file_sha256(Path(path))[:16]


def _resolve_clip(name: str, download_root: str | None, text: str) -> ResolvedBackbone:
    try:
        weights = resolve_weights(name, download_root)
    except FileNotFoundError:
        raise MissingFiles(missing_weights([name], download_root)) from None
    spec = BACKBONES.get(name)
    if spec is not None:
        side, context, embed, gflops = spec.input_resolution, CONTEXT_LENGTH, spec.embed_dim, spec.image_gflops
    else:
        (side, context, embed), gflops = checkpoint_shapes(weights), MID_GFLOPS
    return ResolvedBackbone(
        name=name, slug=slug(name), kind="clip", weights=str(weights), checkpoint_id=checkpoint_id(name, download_root),
        image_size=(side, side), context_length=context, embed_dim=embed, tokenizer=TokenizerSpec("clip", context),
        preprocess=PreprocessSpec((side, side), CLIP_MEAN, CLIP_STD), image_gflops=gflops, text=text, source=name,
        download_root=download_root)


def resolve_backbone(name: str, entry: BackboneEntry | None = None, download_root: str | None = None,
                     hf_cache: str | None = None) -> ResolvedBackbone:
    """Resolve a backbone from local files; MissingFiles (a FileNotFoundError) names each file that is missing, where
    it was looked for and how to fetch it. OpenAI names and CLIP checkpoints go to clip; `ARCH/TAG` and
    `{open_clip: ...}` entries to open_clip."""
    text = entry.text if entry else TRANSLATED
    if entry is not None and entry.backbone is not None:
        resolved = _resolve_clip(entry.backbone, download_root, text)
        return resolved if resolved.name == name else _renamed(resolved, name)
    if entry is not None:
        return resolve_open_clip(name, entry, download_root, hf_cache, slug(name), text, weights_id)
    if not is_open_clip(name):
        return _resolve_clip(name, download_root, text)
    return resolve_open_clip(name, None, download_root, hf_cache, slug(name), text, weights_id)


def _renamed(resolved: ResolvedBackbone, name: str) -> ResolvedBackbone:
    from dataclasses import replace

    return replace(resolved, name=name, slug=slug(name))


def as_resolved(backbone: ResolvedBackbone | str, download_root: str | None = None) -> ResolvedBackbone:
    """A resolved backbone as it is, or a name resolved (for callers that hold a name alone: tests, benchmarks)."""
    return backbone if isinstance(backbone, ResolvedBackbone) else resolve_backbone(backbone, None, download_root)


def missing_files(names: list[str], entries: dict[str, BackboneEntry], download_root: str | None,
                  hf_cache: str | None) -> list[str]:
    """What resolving `names` would not find, one message per file (the OpenAI names' together, as before)."""
    clip_names = [n for n in names if not is_open_clip(n, entries.get(n))]
    messages = missing_weights([entries[n].backbone if n in entries else n for n in clip_names], download_root)
    for name in names:
        if name in clip_names:
            continue
        try:
            resolve_backbone(name, entries.get(name), download_root, hf_cache)
        except MissingFiles as e:
            messages += e.messages
    return messages


def _open_clip_like(name: str) -> bool:
    return not Path(name).expanduser().exists() and is_open_clip_name(name)


def is_open_clip(name: str, entry: BackboneEntry | None = None) -> bool:
    """Whether a job's backbone is loaded by open_clip (an `{open_clip: ...}` entry or an `ARCH/TAG` name), without
    resolving it (nothing is read)."""
    if entry is not None:
        return entry.open_clip is not None
    return name not in BACKBONES and _open_clip_like(name)


def load_model(backbone: ResolvedBackbone) -> torch.nn.Module:
    """The backbone's model on the CPU in fp32 and eval mode (clip's build for kind clip, open_clip's for open_clip)."""
    if backbone.kind == "clip":
        from newsclip.retrieval.backbones import load_backbone

        return load_backbone(backbone.source, "cpu", backbone.download_root)[0]
    from newsclip.retrieval.open_clip_models import load_open_clip

    return load_open_clip(backbone)
