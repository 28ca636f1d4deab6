"""Synthetic article-image embedding pairs shaped like CLIP's: topics of uneven size, anisotropic spread, a text-image
gap (the shape, and why, in the README's "Synthetic embeddings"); for scale.py, knn_scale.py and gpu_check.py.

Every vector is a sum of parts, each part's expected squared norm a share of 1 (`Shape`), then L2-normalised:

    image = cone + gap + topic centre + the article's content + image noise
    text  = cone - gap + topic centre + the article's content + text noise

`cone` is one direction all vectors share (CLIP embeddings sit in a narrow cone: unrelated images score ~0.4-0.5),
`gap` the offset between the two modalities (unrelated text-image pairs score ~0.15, matched ~0.3), a topic is drawn
from Zipf-like shares (a few big topics, a long tail) and its centre and spread are its own, and every random part is
anisotropic: axis j has variance ~ 1/(j+1)**`spectrum`, so a few directions carry most of the spread. (Axis-aligned:
a rotation would leave every inner product as it is.) `pairs(first, count, ...)` gives rows first..first+count-1;
the same arguments give the same rows, and the topics, centres and directions depend on (seed, dim) alone.

    .venv/bin/python benchmarks/synthetic_embeddings.py --dims 64,512,768 --pairs 3000   # the shape's statistics
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Shape:
    """The parts' shares of a vector's squared norm, and how topics and axes are spread."""

    cone: float = 0.30  # shared by every vector of both sides
    gap: float = 0.15  # + on images, - on texts: unrelated images 0.45, unrelated text-image 0.15
    topic: float = 0.12  # the topic's centre, shared by its texts and images
    content: float = 0.10  # the article's own, shared by its text and its image
    noise: float = 0.33  # each side's own (times the row's noise factor)
    topics: int = 2000
    topic_exponent: float = 1.0  # topic t's share ~ 1/(t+1)**exponent: the biggest of 2000 holds ~12% of rows
    topic_spread: float = 0.4  # a topic's content spread is exp(topic_spread * N(0,1)) times the typical one
    spectrum: float = 1.0  # axis j's variance ~ 1/(j+1)**spectrum (effective rank ~13 at 64 dims, ~35 at 768)
    noise_spread: float = 0.5  # a row's noise factor, when none is given: exp(noise_spread * N(0,1))


REALISTIC = Shape()


@cache
def _structure(dim: int, seed: int, shape: Shape) -> tuple[np.ndarray, ...]:
    """What all rows share: the axes' scales, the cone and gap directions, the topics' shares, centres and spreads."""
    rng = np.random.default_rng([seed, dim, 27])
    scales = (np.arange(1, dim + 1, dtype=np.float64) ** -shape.spectrum) ** 0.5
    scales = (scales / np.sqrt(np.sum(scales**2))).astype(np.float32)  # E |z * scales|^2 = 1
    cone, gap = (_unit(rng.standard_normal(dim).astype(np.float32)) for _ in range(2))
    shares = np.arange(1, shape.topics + 1, dtype=np.float64) ** -shape.topic_exponent
    centres = rng.standard_normal((shape.topics, dim), dtype=np.float32) * scales
    spreads = np.exp(shape.topic_spread * rng.standard_normal(shape.topics)).astype(np.float32)
    return scales, cone.astype(np.float32), gap.astype(np.float32), shares / shares.sum(), centres, spreads


def pairs(first: int, count: int, dim: int, seed: int = 0, noise_factor: np.ndarray | None = None,
          shape: Shape = REALISTIC, device: str | None = None) -> tuple[Any, Any, np.ndarray]:
    """(texts, images, topics) of rows first..first+count-1: two (count, dim) float32 unit-norm matrices (row i of
    each is one article's text and image) and each row's topic. `noise_factor` (count,) scales each row's noise
    (harder articles); by default a lognormal spread. With a torch `device` the matrices are tensors drawn there by
    torch (the same shape, other numbers: a GPU draws 1M x 768 in a moment, numpy in half a minute)."""
    scales, cone, gap, shares, centres, spreads = _structure(dim, seed, shape)
    rng = np.random.default_rng([seed, dim, first])
    topics = rng.choice(len(shares), size=count, p=shares)
    if noise_factor is None:
        noise_factor = np.exp(shape.noise_spread * rng.standard_normal(count))
    noise = (math.sqrt(shape.noise) * np.asarray(noise_factor, np.float32))[:, None]
    if device is None:
        def draw() -> np.ndarray:
            return rng.standard_normal((count, dim), dtype=np.float32) * scales

        rows = topics
    else:
        import torch

        generator = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        cone, gap, centres, spreads, noise, scales = (torch.as_tensor(np.asarray(x, np.float32), device=device)
                                                      for x in (cone, gap, centres, spreads, noise, scales))
        rows = torch.as_tensor(topics, device=device)

        def draw() -> Any:
            return torch.randn((count, dim), generator=generator, device=device) * scales

    shared = (math.sqrt(shape.cone) * cone + math.sqrt(shape.topic) * centres[rows]
              + math.sqrt(shape.content) * spreads[rows, None] * draw())
    images = shared + math.sqrt(shape.gap) * gap + noise * draw()
    texts = shared - math.sqrt(shape.gap) * gap + noise * draw()
    return _unit(texts), _unit(images), topics


def isotropic(first: int, count: int, dim: int, seed: int = 0) -> np.ndarray:
    """Unit vectors with no structure at all (what the benchmarks drew before): IVF's and HNSW's worst case."""
    return _unit(np.random.default_rng([seed, dim, first, 1]).standard_normal((count, dim), dtype=np.float32))


def _unit(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)
    return x / x.norm(dim=-1, keepdim=True)  # a torch tensor


def statistics(dim: int, count: int, seed: int = 0, noise: float = 1.0) -> dict:
    """What the README quotes of the shape at `dim`: mean cosines, MRR@100 of every text against the `count`
    images, the effective rank of the spread and the biggest topic's share (`noise` scales every row's noise)."""
    rng = np.random.default_rng([seed, dim, 1])
    texts, images, topics = pairs(0, count, dim, seed, noise * np.exp(REALISTIC.noise_spread
                                                                      * rng.standard_normal(count)))
    scores, off = texts @ images.T, ~np.eye(count, dtype=bool)
    rank = (scores > np.diag(scores)[:, None]).sum(axis=1) + 1
    scales = _structure(dim, seed, REALISTIC)[0].astype(np.float64)
    return {"dim": dim, "pairs": count, "noise": noise,
            "matched_text_image": round(float(np.diag(scores).mean()), 3),
            "unrelated_text_image": round(float(scores[off].mean()), 3),
            "unrelated_images": round(float((images @ images.T)[off].mean()), 3),
            "unrelated_texts": round(float((texts @ texts.T)[off].mean()), 3),
            "mrr_at_100": round(float(np.mean(np.where(rank <= 100, 1 / rank, 0))), 3),
            "effective_rank": round(float(np.sum(scales**2) ** 2 / np.sum(scales**4)), 1),
            "biggest_topic_share": round(float(np.bincount(topics).max() / count), 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", default="64,512,768", help="widths, comma-separated")
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--noise", type=float, default=1.0, help="every row's noise times this (scale.py: 0.3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [statistics(int(d), args.pairs, args.seed, args.noise) for d in args.dims.split(",")]
    print(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
