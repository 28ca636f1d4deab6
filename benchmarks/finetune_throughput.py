"""Training steps and images per second of newsclip finetune's step (the same towers, loss, AdamW and autocast as
the Ray Train loop) for a backbone with random weights, and the GPU memory it takes; prints JSON.

    python3 benchmarks/finetune_throughput.py --backbone ViT-B/32 --batch-size 256 --precision bf16   # one GPU
    .venv/bin/python benchmarks/finetune_throughput.py --device cpu --backbone demo-tiny --batch-size 32 --steps 5

The batches are random uint8 pixels and token ids already in memory, so this is the model's ceiling: what the Ray
Data input pipeline has to keep up with. Needs torch and clip only (no Ray, polars or faiss)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="ViT-B/32", help="an OpenAI architecture or demo-tiny (random weights)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when torch sees one")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    from newsclip.finetune.loop import forward_loss, towers
    from newsclip.finetune.optim import BETAS, EPS, param_groups
    from newsclip.retrieval.backbones import load_backbone

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.precision != "fp32" and device == "cpu":
        args.precision = "fp32"  # what finetune does on CPU workers
    from random_clip import random_checkpoint

    with tempfile.TemporaryDirectory() as tmp:  # demo-tiny too: its trained weights would change no timing
        clip_model, _ = load_backbone(str(random_checkpoint(args.backbone, Path(tmp) / "random.pt")), "cpu")
    clip_model = clip_model.float().to(device).train()
    model = towers(clip_model)
    optimizer = torch.optim.AdamW(param_groups(clip_model, 0.1), lr=1e-5, betas=BETAS, eps=EPS)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")
    side = clip_model.visual.input_resolution
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (args.batch_size, 3, side, side), dtype=torch.uint8, generator=g).to(device)
    tokens = torch.randint(1, 49406, (args.batch_size, 77), generator=g)
    tokens[:, 0], tokens[:, 40], tokens[:, 41:] = 49406, 49407, 0  # start, end of text at 40, padding
    tokens = tokens.to(device)

    def step() -> float:
        loss = forward_loss(model, pixels, tokens, args.precision)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the step, as the loop's loss.item() does

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    seconds = time.perf_counter() - started
    result = {"backbone": args.backbone, "random_weights": True, "device": device,
              "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None, "precision": args.precision,
              "batch_size": args.batch_size, "steps": args.steps, "seconds": round(seconds, 3),
              "steps_per_s": round(args.steps / seconds, 3),
              "images_per_s": round(args.steps * args.batch_size / seconds, 1),
              "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
              "loss_first_last": [round(losses[0], 4), round(losses[-1], 4)], "torch": torch.__version__}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
