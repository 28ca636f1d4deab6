"""What the reports show, read from an output folder: metrics, manifest facts, queries, images, display names."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from newsclip.names import checkpoint_label, encode_entry, is_fusion, looks_like_path, parse_fusion_name
from newsclip.retrieval.backbones import BACKBONES
from newsclip.retrieval.metrics import metric_names
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import parquet_files, read_manifest

GPU_MEMORY_KEYS = ("gpu_memory_bytes", "gpu_peak_memory_bytes", "gpu_memory_mb")  # manifest encode entry facts


def read_json(path: Path) -> dict:
    """The file's object, or {} when it is not there (report.html renders from a partial run too)."""
    return json.loads(path.read_text()) if path.exists() else {}


def metric_keys(rows: list[dict], k: int) -> list[str]:
    """The metrics these rows hold, in table order (rows of an older run may lack the newer ones)."""
    return [m for m in metric_names(k) if any(m in r for r in rows)]


def display_names(names: Sequence[str]) -> dict[str, str]:
    """Short labels for tables and plots: a checkpoint path shows as its file name, also inside a fusion name
    (`fusion:demo-tiny+/models/x.pt` -> `fusion:demo-tiny+x.pt`); names whose labels would coincide stay whole."""

    def short(name: str) -> str:
        if name in BACKBONES or not looks_like_path(name) or Path(name).name in BACKBONES:
            return name  # a file called like a published backbone must not get that backbone's paper row
        return checkpoint_label(name)

    labels = {}
    for name in names:
        if is_fusion(name):
            labels[name] = f"{name.partition(':')[0]}:{'+'.join(short(m) for m in parse_fusion_name(name)[1])}"
        else:
            labels[name] = short(name)
    taken = list(labels.values())
    return {n: label if taken.count(label) == 1 else n for n, label in labels.items()}


def relabel(rows: list[dict], labels: dict[str, str], *keys: str) -> list[dict]:
    """The rows with the backbone names under `keys` replaced by their labels."""
    return [{**row, **{key: labels.get(row[key], row[key]) for key in keys}} for row in rows]


def _gpu_gib(entry: dict) -> float | None:
    """The GPU memory an encode entry records, in GiB, under whichever key the encoder wrote it."""
    for key in GPU_MEMORY_KEYS:
        if entry.get(key) is not None:
            return entry[key] / 2**30 if key.endswith("bytes") else entry[key] / 1024
    return None


def cost_rows(stages: dict, backbones: list[str]) -> list[dict]:
    """Encode cost per backbone from manifest encode entries; a fusion costs the sum of its members."""
    rows = []
    for name in backbones:
        members = parse_fusion_name(name)[1] if is_fusion(name) else [name]
        images = [stages.get(encode_entry(m, "images"), {}) for m in members]
        texts = [stages.get(encode_entry(m, "texts"), {}) for m in members]
        if not any(images) and not any(texts):
            continue
        img_s = sum(e.get("seconds", 0) or 0 for e in images)
        txt_s = sum(e.get("seconds", 0) or 0 for e in texts)
        n_img = images[0].get("rows") if images[0] else None
        n_txt = texts[0].get("rows") if texts[0] else None
        memories = [m for m in (_gpu_gib(e) for e in images + texts) if m is not None]
        rows.append({"backbone": name, "image_seconds": img_s, "text_seconds": txt_s, "images": n_img, "texts": n_txt,
                     "images_per_s": n_img / img_s if n_img and img_s else None,
                     "texts_per_s": n_txt / txt_s if n_txt and txt_s else None,
                     "gpu_gib": max(memories) if memories else None,
                     "device": next((e.get("device") for e in images + texts if e.get("device")), None),
                     # where the model comes from, its preprocess, tokenizer and texts (the encode stage records it)
                     "model": "; ".join(e["model"] for e in images[:1] if e.get("model")) if len(members) == 1
                     else None})
    return rows


@dataclass(frozen=True)
class ReportData:
    """What report.html shows. Every backbone here is named by its display label; `labels` maps full names to them."""

    output_dir: Path
    name: str  # the job's
    images_spec: str | None  # input.images, where thumbnails are found when the shards have moved
    metrics: dict
    stages: dict  # manifest.json's committed stages
    labels: dict[str, str]
    backbones: list[str]  # the config's order, then metrics.json's
    t2i: list[dict]  # metric rows, text to image
    i2t: list[dict]  # metric rows, image to text
    paired: list[dict]  # paired comparisons, text to image
    paired_i2t: list[dict]  # paired comparisons, image to text (the same Holm family)
    costs: list[dict]
    training: dict[str, dict]  # a fine-tuned backbone's losses.json (`newsclip finetune` writes it beside model.pt)

    @property
    def k(self) -> int:
        return self.metrics.get("k", 100)

    @property
    def prep(self) -> dict:
        return self.stages.get("prepare", {})

    @property
    def overall(self) -> list[dict]:
        """Each backbone's text-to-image row over all sources, in backbone order."""
        return sorted([r for r in self.t2i if r["source"] == "all"], key=lambda r: self.backbones.index(r["backbone"]))

    @property
    def quality(self) -> dict[str, dict]:
        return {r["backbone"]: r for r in self.overall}


def read_report_data(output_dir: Path, cfg=None) -> ReportData:
    """Read metrics.json and manifest.json; `cfg` (anything with `name`, `backbones`, `input.images`) is optional:
    without it the backbones come from metrics.json in its order."""
    output_dir = Path(output_dir)
    metrics = read_json(Layout(output_dir).metrics_json)
    stages = read_manifest(output_dir).get("stages", {})
    rows = metrics.get("rows", [])
    ordered = list(dict.fromkeys(r["backbone"] for r in rows))
    wanted = list(getattr(cfg, "backbones", None) or [])
    names = [b for b in wanted if b in ordered] + [b for b in ordered if b not in wanted]
    labels = display_names(names)
    t2i = [r for r in rows if r.get("direction", "text_to_image") == "text_to_image"]
    i2t = [r for r in rows if r.get("direction") == "image_to_text"]
    paired = [p for p in metrics.get("paired", []) if p.get("direction", "text_to_image") == "text_to_image"]
    paired_i2t = [p for p in metrics.get("paired", []) if p.get("direction") == "image_to_text"]
    return ReportData(output_dir=output_dir, name=getattr(cfg, "name", None) or output_dir.name,
                      images_spec=getattr(getattr(cfg, "input", None), "images", None), metrics=metrics,
                      stages=stages, labels=labels, backbones=[labels[b] for b in names],
                      t2i=relabel(t2i, labels, "backbone"), i2t=relabel(i2t, labels, "backbone"),
                      paired=relabel(paired, labels, "a", "b"), paired_i2t=relabel(paired_i2t, labels, "a", "b"),
                      costs=relabel(cost_rows(stages, names), labels, "backbone"),
                      training={labels[b]: losses for b in names if (losses := read_training(b))})


def read_training(backbone: str) -> dict:
    """The losses.json beside a checkpoint that `newsclip finetune` wrote, with the run's starting backbone from the
    config.yaml beside it; {} for any other backbone."""
    if not looks_like_path(backbone) or is_fusion(backbone):
        return {}
    folder = Path(backbone).expanduser().parent
    losses = read_json(folder / "losses.json")
    if losses and (folder / "config.yaml").is_file():
        import yaml

        losses["start"] = (yaml.safe_load((folder / "config.yaml").read_text()).get("finetune") or {}).get("backbone")
    return losses


def read_queries(output_dir: Path) -> pl.DataFrame:
    """The prepared queries with the columns an example shows (those an older prepare did not write are null)."""
    files = parquet_files(Layout(output_dir).prepared.queries, "prepared queries")
    frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    for column in ("title", "body", "lang", "source"):
        if column not in frame.columns:
            frame = frame.with_columns(pl.lit(None, pl.String).alias(column))
    return frame.select("article_id", "image_id", "title", "body", "lang", "source")


def read_translated(output_dir: Path) -> pl.DataFrame | None:
    """The translate stage's English query texts, or None when there are none (or they cannot be read)."""
    folder = Layout(output_dir).translated
    files = sorted(folder.rglob("*.parquet")) if folder.is_dir() else []
    if not files:
        return None
    try:
        return pl.concat([pl.read_parquet(f, columns=["article_id", "query_text"]) for f in files])
    except (pl.exceptions.PolarsError, OSError):
        return None


def _image_shards(output_dir: Path, image_ids: set[str]) -> dict[str, list[str]]:
    """shard file -> the wanted image ids that `prepared/candidates.parquet` says it holds."""
    candidates = Layout(output_dir).prepared.candidates
    if not candidates.exists():
        return {}
    where = pl.read_parquet(candidates, columns=["image_id", "file"]).filter(pl.col("image_id").is_in(list(image_ids)))
    return dict(where.group_by("file").agg("image_id").iter_rows())


def load_images(output_dir: Path, image_ids: set[str], images_spec: str | None) -> dict[str, bytes]:
    """Encoded bytes of the wanted images, read only from the shards `prepared/candidates.parquet` names for them."""
    shards = [(Path(f), ids) for f, ids in sorted(_image_shards(output_dir, image_ids).items()) if Path(f).exists()]
    missing = set(image_ids) - {i for _, ids in shards for i in ids}
    if missing and images_spec:  # shards moved since prepare (or a relative path from another cwd): scan the input
        with contextlib.suppress(FileNotFoundError):
            shards += [(p, sorted(missing)) for p in parquet_files(images_spec, "input.images")]
    found: dict[str, bytes] = {}
    for path, ids in shards:
        wanted = [i for i in ids if i not in found]
        if not wanted:
            continue
        table = pq.read_table(path, columns=["image_id", "image"], filters=[("image_id", "in", wanted)])
        for image_id, data in zip(table.column("image_id").to_pylist(), table.column("image").to_pylist()):
            found.setdefault(str(image_id), data)
    return found
