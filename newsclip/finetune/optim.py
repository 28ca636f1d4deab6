"""CLIP's training recipe, shared by demo-tiny's training and `newsclip finetune`: AdamW's settings, which parameters
decay, the temperature's bound, and the warm-up then cosine learning rate."""

from __future__ import annotations

import math

BETAS, EPS = (0.9, 0.98), 1e-6  # CLIP's AdamW betas and eps
MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps its temperature at 1/100: below, training destabilises


def warmup_cosine(step: int, steps: int, lr: float, warmup_share: float, min_lr_share: float) -> float:
    """Linear warm-up over `warmup_share` of the steps, then a cosine down to lr * min_lr_share."""
    warmup = round(warmup_share * steps)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_lr_share + (1 - min_lr_share) * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model, weight_decay: float) -> list[dict]:
    """The trainable parameters in two AdamW groups: weight matrices decay; gains, biases, embeddings and the
    temperature are not shrunk towards zero (open_clip's convention)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        skip = param.ndim < 2 or "embedding" in name or "logit_scale" in name
        (no_decay if skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
