"""The fine-tune split, on the driver: the job's evaluation sample held out (texts, images and byte-identical
images), then a seeded train/validation split of the rest by image. Texts are the job's own (`texts.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from newsclip.articles import sample_pairs
from newsclip.config import JobConfig
from newsclip.finetune.config import FinetuneConfig
from newsclip.finetune.texts import training_texts


def prepared_inputs(cfg: JobConfig) -> tuple[Path, Path]:
    """What the split reads of prepare's output: the usable articles and the images."""
    return cfg.layout.prepared.articles, cfg.layout.prepared.candidates


@dataclass(frozen=True)
class Split:
    train: pl.DataFrame  # article_id, query_text, image_id, image_hash, file (the image's shard)
    validation: pl.DataFrame
    eval_ids: list[str]
    # articles left out, per reason: they share something with the eval sample, or (untranslated) the job would
    # not score their text; `images`: the images of those that share something with the eval sample
    excluded: dict[str, int]

    def summary(self) -> dict:
        """What split.json holds: article ids per split and what was left out."""
        return {"train": self.train["article_id"].to_list(), "validation": self.validation["article_id"].to_list(),
                "eval": self.eval_ids, "excluded": self.excluded,
                "excluded_images": self.excluded["images"]}


def compute_split(cfg: JobConfig, ft: FinetuneConfig) -> Split:
    """Read prepared/ and the job's texts; hold out the eval sample and everything that shares an image, its bytes
    or its text with it; split the rest into train and validation (whole image groups, seeded)."""
    articles, candidates = prepared_inputs(cfg)
    missing = [p for p in (articles, candidates) if not p.exists()]
    if missing:
        raise FileNotFoundError(f"finetune: {missing[0]} is missing: run `newsclip prepare JOB.yaml` first")
    usable = pl.read_parquet(articles, columns=["article_id", "image_id", "in_eval", "file"])
    images = pl.read_parquet(candidates, columns=["image_id", "image_hash", "file"])
    # the eval sample exactly as prepare draws it; prepared/ from other eval settings would leak
    eval_ids = sample_pairs(usable, cfg.eval.sample_size, cfg.eval.seed)
    if set(eval_ids.to_list()) != set(usable.filter("in_eval")["article_id"].to_list()):
        raise ValueError(f"finetune: {cfg.layout.prepared.dir} was sampled with other eval settings than the job's "
                         f"(eval.sample_size={cfg.eval.sample_size}, eval.seed={cfg.eval.seed}): run "
                         f"`newsclip prepare JOB.yaml` again")
    texts, untranslated = training_texts(cfg, usable.select("article_id", "file"))
    pairs = usable.drop("file").join(texts, on="article_id", how="left").join(images, on="image_id", how="left")
    skipped = pl.col("article_id").is_in(untranslated.implode())  # no text the job would score: never trained on
    if pairs["image_hash"].null_count() or pairs.filter(~skipped)["query_text"].null_count():
        raise ValueError(f"finetune: {cfg.layout.prepared.dir} does not match the input any more: run "
                         "`newsclip prepare JOB.yaml` again")
    held = pairs.filter(pl.col("article_id").is_in(eval_ids.implode()))
    rest = pairs.filter(~pl.col("article_id").is_in(eval_ids.implode()))
    n_untranslated = int(rest.select(skipped.sum()).item())
    rest = rest.filter(~skipped)
    same_image = pl.col("image_id").is_in(held["image_id"].implode())
    same_bytes = pl.col("image_hash").is_in(held["image_hash"].implode())
    same_text = pl.col("query_text").is_in(held["query_text"].implode())
    excluded = {"eval_image": int(rest.select(same_image.sum()).item()),
                "eval_image_bytes": int(rest.select((~same_image & same_bytes).sum()).item()),
                "eval_text": int(rest.select((~same_image & ~same_bytes & same_text).sum()).item()),
                "untranslated": n_untranslated}
    dropped = rest.filter(same_image | same_bytes | same_text)
    excluded["images"] = dropped["image_id"].n_unique()
    pool = rest.filter(~(same_image | same_bytes | same_text)).sort("article_id")
    # by image bytes: articles sharing a picture land on the same side, so validation never sees a train image
    groups = pool["image_hash"].unique().sort()
    order = np.random.default_rng([ft.seed, 14]).permutation(len(groups))
    n_val = int(round(ft.validation_share * len(groups)))
    val_hashes = groups.gather(np.sort(order[:n_val]))
    in_val = pl.col("image_hash").is_in(val_hashes.implode())
    columns = ["article_id", "query_text", "image_id", "image_hash", "file"]
    return Split(pool.filter(~in_val).select(columns), pool.filter(in_val).select(columns),
                 eval_ids.to_list(), excluded)
