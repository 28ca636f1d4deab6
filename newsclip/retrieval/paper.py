"""The numbers of Zhang et al., MediaEval 2022 NewsImages: 2,000 sampled pairs, text-to-image retrieval."""

from __future__ import annotations

# backbone -> (MRR, R@5, R@10, R@20, R@50, R@100); recalls in percent as printed in the paper
PAPER = {
    "RN50": (0.388, 45.95, 54.50, 62.55, 73.20, 81.35),
    "RN101": (0.398, 46.85, 56.10, 65.40, 75.30, 83.20),
    "RN50x4": (0.424, 49.50, 59.05, 67.45, 77.85, 84.40),
    "RN50x16": (0.447, 52.70, 61.90, 70.50, 78.70, 85.45),
    "RN50x64": (0.456, 54.30, 63.50, 71.20, 80.50, 86.85),
    "ViT-B/32": (0.384, 45.25, 54.90, 63.30, 74.70, 82.90),
    "ViT-B/16": (0.427, 51.25, 60.70, 69.10, 78.60, 85.25),
    "ViT-L/14": (0.474, 55.35, 64.70, 72.00, 82.00, 88.60),
    "ViT-L/14@336px": (0.486, 57.10, 66.00, 73.50, 82.90, 88.55),
}


def paper_scores(backbone: str) -> dict[str, float] | None:
    """The paper's row for a backbone in our metric names (recall as a fraction), or None."""
    row = PAPER.get(backbone)
    if row is None:
        return None
    mrr, *recalls = row
    return {"mrr": mrr, **{f"recall@{k}": r / 100 for k, r in zip((5, 10, 20, 50, 100), recalls)}}
