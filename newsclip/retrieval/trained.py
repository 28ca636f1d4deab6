"""What a fine-tuned checkpoint was trained on (the record `newsclip finetune` saves inside its model.pt), and the
queries that a job scoring such a checkpoint leaves out so that no backbone is scored on what one of them saw."""

from __future__ import annotations

from pathlib import Path
from typing import IO

import polars as pl

from newsclip.retrieval.ranks import counts

# model.pt as `newsclip finetune` writes it: {"state_dict": the clip weights, TRAINING_KEY: the record}, plain
# tensors, strings and lists, so `torch.load(..., weights_only=True)` reads it and a copy of the file keeps its record
TRAINING_KEY = "newsclip_training"
RECORD_VERSION = 1


def training_record(train: pl.DataFrame, validation: pl.DataFrame, **facts) -> dict:
    """The record of a fine-tune's data: the article ids and image hashes (sha256 of the bytes) it trained and
    validated on, sorted, and `facts` (the job, the starting backbone, the held-out sample's size)."""
    def side(frame: pl.DataFrame) -> dict:
        return {"articles": sorted(frame["article_id"].to_list()),
                "image_hashes": sorted(frame["image_hash"].unique().to_list())}

    return {"version": RECORD_VERSION, **facts, "train": side(train), "validation": side(validation)}


def save_checkpoint(target: IO[bytes], weights: dict, record: dict) -> None:
    """Write the weights with their training record (through a file object: the same content, the same bytes)."""
    import torch

    torch.save({"state_dict": weights, TRAINING_KEY: record}, target)


def read_training_record(path: str | Path) -> dict | None:
    """The training record saved in a checkpoint file; None when it has none (a TorchScript archive, someone else's
    state dict). Memory-mapped: the weights are not read."""
    import pickle
    import zipfile

    import torch

    from newsclip.retrieval.backbones import _is_torchscript

    path = Path(path)
    if _is_torchscript(path):
        return None  # OpenAI's files hold no record
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise ValueError(f"cannot read {path} as a checkpoint (to find what it was trained on): {e}") from e
    record = obj.get(TRAINING_KEY) if isinstance(obj, dict) else None
    return record if isinstance(record, dict) else None


def trained_on(backbones) -> dict[str, dict | None]:
    """Each checkpoint file among the resolved `backbones` ({name: ResolvedBackbone}) and its training record (None:
    its training data is unknown). The registry's backbones (OpenAI's, demo-tiny) and open_clip's published tags are
    not listed: they were never trained on a job's archive."""
    return {name: read_training_record(Path(b.weights)) for name, b in backbones.items() if is_checkpoint_file(b)}


def is_checkpoint_file(backbone) -> bool:
    """A weights file named by the job (a fine-tune, maybe newsclip's own), not a registry name or published tag."""
    from newsclip.retrieval.backbones import BACKBONES

    if backbone.kind == "clip":
        return backbone.source not in BACKBONES
    return Path(backbone.source).expanduser().is_file() and not backbone.weights.endswith(".safetensors")


def seen(record: dict) -> tuple[set[str], set[str]]:
    """(article ids, image hashes) that a record's fine-tune trained or validated on."""
    sides = [record.get("train", {}), record.get("validation", {})]
    return ({a for s in sides for a in s.get("articles", [])}, {h for s in sides for h in s.get("image_hashes", [])})


def leave_out_trained(queries: pl.DataFrame, image_hashes: pl.DataFrame,
                      records: dict[str, dict | None]) -> tuple[pl.DataFrame, list[dict]]:
    """The queries (article_id, image_id, source) that none of the recorded fine-tunes trained or validated on: not
    the article, not its image's bytes. The same queries for every backbone, so paired comparisons stay paired.

    Also one fact row per checkpoint: whether its training is known, what it saw, how many of these queries it
    alone would leave out (`n_excluded_trained`), and how many of its trained images are still among the candidates
    (`image_hashes`: image_id, image_hash, candidate). Those stay: as distractors they make the task no easier."""
    truths = queries.join(image_hashes.select("image_id", "image_hash"), on="image_id", how="left")
    facts, excluded = [], pl.repeat(False, len(truths), eager=True)
    candidates = image_hashes.filter("candidate") if "candidate" in image_hashes.columns else image_hashes
    for backbone, record in records.items():
        if record is None:
            facts.append({"backbone": backbone, "training": "unknown"})
            continue
        articles, hashes = seen(record)
        mine = truths["article_id"].is_in(list(articles)) | truths["image_hash"].is_in(list(hashes)).fill_null(False)
        excluded = excluded | mine
        facts.append({"backbone": backbone, "training": "recorded", "start": record.get("start"),
                      "job": record.get("job"), "trained_articles": len(articles), "trained_images": len(hashes),
                      "n_excluded_trained": int(mine.sum()),
                      "trained_images_among_candidates": int(candidates["image_hash"].is_in(list(hashes)).sum())})
    return queries.filter(~excluded), facts


def excluded_counts(queries: pl.DataFrame, kept: pl.DataFrame, direction: str) -> dict[str, int]:
    """Per source (and `all`), the queries of a direction that `leave_out_trained` left out."""
    before, after = counts(queries, direction), counts(kept, direction)
    return {source: n - after.get(source, 0) for source, n in before.items()}
