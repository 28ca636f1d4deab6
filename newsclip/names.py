"""Names: a backbone's slug, the fusion-name grammar, the rankings' file stems and the manifest's entry names."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from newsclip.retrieval.backbones import BACKBONES

METHODS = {"fusion": "zmean", "fusion-zmean": "zmean", "fusion-rrf": "rrf"}  # fusion name prefix -> method
PREFIX = {"zmean": "fusion", "rrf": "fusion-rrf"}
# direction -> (query side, query id, database side, database id); text_to_image is the NewsImages task
DIRECTIONS = {
    "text_to_image": ("texts", "article_id", "images", "image_id"),
    "image_to_text": ("images", "image_id", "texts", "article_id"),
}


GENERIC_STEMS = {"model", "checkpoint", "weights"}  # file names that say nothing: their folder names them too


def checkpoint_label(path: str) -> str:
    """A checkpoint's short name: its file name, with its folder's when the file is generically named
    (`out/finetune/demo/model.pt` -> `demo/model.pt`, what `newsclip finetune` writes)."""
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.stem.lower() in GENERIC_STEMS and p.parent.name else p.name


def slug(name: str) -> str:
    """A filesystem-safe lower-case name: "ViT-L/14@336px" -> "vit-l-14-336px"; a file path -> its stem's slug,
    or its folder's and stem's for a generic stem ("out/finetune/demo/model.pt" -> "demo-model"); a fusion name ->
    its prefix and its members' slugs ("fusion:demo-tiny+/m/x.pt" -> "fusion-demo-tiny-x")."""
    if is_fusion(name):
        # slugged member by member: a checkpoint path as the last member would otherwise slug the whole name to
        # that file's stem, and the fused rankings would overwrite the member's own
        return "-".join([slug(name.partition(":")[0]), *(slug(m) for m in parse_fusion_name(name)[1])])
    base = name if name in BACKBONES else Path(checkpoint_label(name)).with_suffix("").as_posix() \
        if looks_like_path(name) else name
    out = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if not out:
        raise ValueError(f"cannot make a slug from backbone name {name!r}")
    return out


def looks_like_path(name: str) -> bool:
    """A checkpoint-like suffix or an existing file; other unknown names ("ViT-H/14") are slugged whole."""
    return Path(name).suffix.lower() in {".pt", ".pth", ".bin", ".ckpt", ".jit"} or Path(name).expanduser().is_file()


def fusion_name(members: Sequence[str], method: str = "zmean") -> str:
    """`fusion:RN50x64+ViT-L/14` (z-mean) or `fusion-rrf:RN50x64+ViT-L/14`."""
    if method not in PREFIX:
        raise ValueError(f"fusion method must be one of {sorted(PREFIX)}; got {method!r}")
    if len(members) < 2:
        raise ValueError(f"a fusion needs two or more backbones; got {list(members)}")
    return f"{PREFIX[method]}:{'+'.join(members)}"


def is_fusion(name: str) -> bool:
    return name.split(":", 1)[0] in METHODS and ":" in name


def parse_fusion_name(name: str) -> tuple[str, list[str]]:
    """(method, member backbones) of a fusion name; members are separated by `+` (so a member name cannot hold one)."""
    prefix, _, rest = name.partition(":")
    if prefix not in METHODS or not rest:
        raise ValueError(f"{name!r} is not a fusion name: expected e.g. 'fusion:RN50x64+ViT-L/14' or "
                         f"'fusion-rrf:RN50x64+ViT-L/14'")
    members = [m.strip() for m in rest.split("+")]
    if len(members) < 2 or not all(members):
        raise ValueError(f"{name!r}: a fusion needs two or more backbones separated by '+'")
    return METHODS[prefix], members


def fusion_slug(name: str) -> str:
    """The file stem of a fused backbone: the slug of its name (`fusion-rrf-rn50x64-vit-l-14`)."""
    parse_fusion_name(name)
    return slug(name)


def rankings_stem(backbone: str, direction: str) -> str:
    """`rankings/<slug>` for the task's direction (the official file names), `<slug>.image_to_text` for the other."""
    return slug(backbone) if direction == "text_to_image" else f"{slug(backbone)}.{direction}"


def encode_entry(backbone: str, side: str) -> str:
    """The manifest entry of one backbone's encoded side: `encode:<slug>:texts`."""
    return f"encode:{slug(backbone)}:{side}"


def knn_entry(backbone: str, direction: str) -> str:
    """The manifest entry of one backbone's rankings in one direction: `knn:<slug>:text_to_image`."""
    return f"knn:{slug(backbone)}:{direction}"
