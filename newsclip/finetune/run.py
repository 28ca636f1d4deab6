"""`newsclip finetune JOB.yaml`: split the archive's pairs without the eval sample, train with Ray Train's
TorchTrainer, commit output_dir/finetune/<run>/{model.pt, config.yaml, split.json, losses.json}, then score the
fine-tuned model against its starting point on the job's eval sample."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import yaml

from newsclip.config import JobConfig
from newsclip.finetune.config import FinetuneConfig, load
from newsclip.finetune.loop import KILL_ENV, MODEL, PROBE, train_loop
from newsclip.finetune.split import Split, compute_split, prepared_inputs
from newsclip.runtime.console import log, print_metrics
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import atomic_path, write_text
from newsclip.yaml_config import to_dict


def run_dir(cfg: JobConfig, ft: FinetuneConfig) -> Path:
    return Layout(cfg.output.resolve()).finetune(ft.run)


def _datasets(split: Split, cfg: JobConfig, resolution: int, context_length: int, workers: int) -> dict:
    """Ray datasets of decoded pairs: CPU map tasks read and decode the images and tokenise the texts."""
    from newsclip.finetune.data import DECODE_ROWS, decode_pairs
    from newsclip.runtime.ray_setup import dataset_of

    kwargs = {"resolution": resolution, "context_length": context_length,
              "max_pixels": cfg.encode.max_image_pixels, "alpha": cfg.encode.alpha}
    out = {}
    for name, frame in (("train", split.train), ("validation", split.validation)):
        if len(frame) == 0:
            continue
        table = frame.select("query_text", "image_id", "file").to_arrow()
        blocks = max(workers, -(-len(table) // DECODE_ROWS))
        out[name] = dataset_of(table, blocks).map_batches(decode_pairs, batch_format="pyarrow",
                                                          batch_size=DECODE_ROWS, fn_kwargs=kwargs)
    return out


def finetune(cfg: JobConfig, ft: FinetuneConfig) -> dict:
    """Fine-tune `ft.backbone` on the job's archive; returns a summary (paths, steps, losses, seconds)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from newsclip.retrieval.backbones import input_sizes, resolve_weights
    from newsclip.runtime.ray_setup import ensure_ray

    started = time.perf_counter()
    resolve_weights(ft.backbone, cfg.encode.download_root)  # fail now, not in a worker, if the weights are missing
    if not all(p.exists() for p in prepared_inputs(cfg)):
        from newsclip.runtime.runner import run_stages

        log(f"finetune: no {cfg.layout.prepared.dir} yet: running the prepare stage first")
        run_stages(cfg, ("prepare",))
    ensure_ray(cfg.ray)
    split = compute_split(cfg, ft)
    folder = run_dir(cfg, ft)
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "split.json", json.dumps(split.summary()))
    write_text(folder / "config.yaml", yaml.safe_dump({"finetune": to_dict(ft), "job": cfg.name,
                                                       "eval": to_dict(cfg.eval), "input": to_dict(cfg.input),
                                                       "prepare": to_dict(cfg.prepare)}, sort_keys=False))
    per_worker = len(split.train) // ft.workers
    micro_per_epoch = per_worker // ft.batch_size
    steps_per_epoch = micro_per_epoch // ft.grad_accum
    if steps_per_epoch == 0:
        raise ValueError(f"finetune.batch_size: {ft.batch_size} x grad_accum {ft.grad_accum} pairs per worker is more "
                         f"than the train split gives each of the {ft.workers} workers ({per_worker} pairs)")
    total = ft.steps or ft.epochs * steps_per_epoch
    log(f"finetune {ft.backbone}: {len(split.train)} train, {len(split.validation)} validation pairs, "
        f"{len(split.eval_ids)} eval articles held out ({sum(v for k, v in split.excluded.items() if k != 'images')} "
        f"more excluded); {total} steps of {ft.batch_size * ft.workers * ft.grad_accum} pairs")
    resolution, context_length = input_sizes(ft.backbone, cfg.encode.download_root)
    datasets = _datasets(split, cfg, resolution, context_length, ft.workers)
    resources = {"CPU": ft.cpus_per_worker} | ({"GPU": ft.gpus_per_worker} if ft.on_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"finetune": ft, "backbone": ft.backbone, "download_root": cfg.encode.download_root,
                           "total_steps": total, "micro_per_epoch": micro_per_epoch,
                           "eval_every": ft.eval_every or steps_per_epoch, "has_validation": "validation" in datasets,
                           "run_dir": str(folder),
                           "kill_at_step": int(os.environ[KILL_ENV]) if os.environ.get(KILL_ENV) else None},
        scaling_config=ScalingConfig(num_workers=ft.workers, use_gpu=ft.on_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=str(folder / "ray"), name=f"{ft.run}-{time.strftime('%Y%m%dT%H%M%S')}",
                             failure_config=FailureConfig(max_failures=ft.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints)),
        datasets=datasets)
    result = trainer.fit()
    with result.checkpoint.as_directory() as final:
        final = Path(final)
        with atomic_path(folder / MODEL) as tmp:
            shutil.copyfile(final / MODEL, tmp)
        shutil.copyfile(final / PROBE, folder / PROBE)
        state = json.loads((final / "losses.json").read_text())
    losses = {"train_loss": [{"step": i + 1, "loss": v} for i, v in enumerate(state["train_loss"])],
              "validation_loss": state["validation"], "best_step": state["best_step"],
              "best_validation_loss": state["best_loss"], "stopped_early": state["stopped_early"],
              "resumed_from": state["resumed_from"], "steps": state["step"], "planned_steps": total,
              "precision": ft.resolved_precision, "seconds": round(time.perf_counter() - started, 1)}
    write_text(folder / "losses.json", json.dumps(losses, indent=1))
    first, last = state["train_loss"][:5], state["train_loss"][-5:]
    log(f"finetune: {state['step']} steps in {losses['seconds']:.0f}s, train loss {sum(first) / len(first):.3f} -> "
        f"{sum(last) / len(last):.3f}; model: {folder / MODEL} (use it as `backbones: [{folder / MODEL}]`)")
    return {"model": folder / MODEL, "folder": folder, "steps": state["step"], "seconds": losses["seconds"],
            "train": len(split.train), "validation": len(split.validation), "eval": len(split.eval_ids)}


def comparison_job(cfg: JobConfig, ft: FinetuneConfig, model: Path) -> JobConfig:
    """The job with [the starting backbone, the fine-tuned model] as its backbones: the same eval sample, prepared
    and translated texts (their stage keys do not read the backbones) and store, so the start's embeddings are
    reused and only the new model is encoded."""
    backbones = (ft.backbone, str(model))
    own = {name: v for name, v in cfg.encode.per_backbone.items() if name in backbones}
    return replace(cfg, backbones=backbones, fusion=(), encode=replace(cfg.encode, per_backbone=own))


def finetune_and_compare(cfg: JobConfig, ft: FinetuneConfig) -> None:
    """Fine-tune; with `finetune.evaluate` (the default), then run the comparison job and print its metrics."""
    from newsclip.runtime.runner import run_stages

    summary = finetune(cfg, ft)
    if ft.evaluate:
        compared = comparison_job(cfg, ft, summary["model"])
        run_stages(compared)
        print_metrics(compared.output)
        print(f"report: {compared.layout.report_html}")
    print(f"model: {summary['model']}")


def main(args) -> int:
    """The CLI's `finetune` command: the job file (with its `finetune:` section) and `--set` overrides."""
    cfg, ft = load(args.job, args.overrides)
    finetune_and_compare(cfg, ft)
    return 0
