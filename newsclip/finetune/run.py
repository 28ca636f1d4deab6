"""`newsclip finetune JOB.yaml`: under the job's lock, prepare, split the archive's pairs without the eval sample,
train with Ray Train's TorchTrainer, commit output_dir/finetune/<run>/{model.pt (with its training record),
config.yaml, split.json, losses.json}, then score the fine-tuned model against its starting point on exactly the
held-out sample of the split. The same command again resumes the run from its last checkpoint; --restart starts it
over."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import yaml

from newsclip.config import BackboneEncode, JobConfig
from newsclip.config import load as load_job
from newsclip.finetune.config import SECTION, FinetuneConfig, load
from newsclip.finetune.loop import KILL_ENV, MODEL, PROBE, SHORT_ENV, train_loop
from newsclip.finetune.split import Split, compute_split
from newsclip.names import slug
from newsclip.runtime.console import log, print_metrics
from newsclip.runtime.layout import Layout
from newsclip.runtime.store import atomic_path, write_text
from newsclip.yaml_config import ConfigError, read_yaml, to_dict

# fine-tune settings that leave what is trained as it is: a run resumed with other values of these is the same run
NOT_TRAINING = ("evaluate", "max_failures", "keep_checkpoints")


def run_dir(cfg: JobConfig, ft: FinetuneConfig) -> Path:
    return Layout(cfg.output.resolve()).finetune(ft.run)


def run_name(cfg: JobConfig, ft: FinetuneConfig) -> str:
    """Ray Train's run folder under finetune/<run>/ray/: named by the job and the run, never by the time, so the
    same command finds it again and resumes from its last checkpoint."""
    return f"{slug(cfg.name)}-{ft.run}"


def training_settings(cfg: JobConfig, ft: FinetuneConfig) -> dict:
    """What decides the training besides the split: the fine-tune's settings, the decoding, the texts' translator."""
    from newsclip.translate.packages import translator_key

    return {"finetune": {k: v for k, v in to_dict(ft).items() if k not in NOT_TRAINING},
            "decode": {"alpha": cfg.encode.alpha, "max_image_pixels": cfg.encode.max_image_pixels},
            "texts": {"prepare.text": cfg.prepare.text,
                      "translator": translator_key(cfg.translate.resolved()) if cfg.translate.enabled else None}}


def open_run(cfg: JobConfig, ft: FinetuneConfig, split: Split, restart: bool = False) -> Path:
    """The run's folder, with its split.json and config.yaml. `restart` empties it first. Else a run found there
    (its driver died, or it finished) is resumed from its last checkpoint by Ray Train, if it trained on this split
    with these settings; if not, the error says how to start over."""
    folder = run_dir(cfg, ft)
    if restart and folder.exists():
        log(f"finetune: --restart: {folder} removed")
        shutil.rmtree(folder)
    settings = training_settings(cfg, ft)
    if (folder / "ray" / run_name(cfg, ft)).exists():
        other = []
        recorded = json.loads((folder / "split.json").read_text()) if (folder / "split.json").exists() else {}
        if any(recorded.get(key) != value for key, value in split.summary().items() if key != "excluded"):
            other.append("data (split.json: its train, validation or eval articles differ, so the input or "
                         "prepared/ changed since it started)")
        config = yaml.safe_load((folder / "config.yaml").read_text()) if (folder / "config.yaml").exists() else {}
        before = config.get("training") or {}
        changed = [f"{section}.{key}" for section, values in settings.items() for key, value in values.items()
                   if (before.get(section) or {}).get(key, None) != value]
        if changed:
            other.append(f"settings ({', '.join(changed)})")
        if other:
            raise ValueError(f"finetune: {folder} holds a fine-tune of other {' and '.join(other)}: run `newsclip "
                             f"finetune JOB.yaml --restart` to start it over, or set finetune.run to another name")
        log(f"finetune: {folder} holds this fine-tune: it resumes from its last checkpoint")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / "split.json", json.dumps(split.summary()))
    write_text(folder / "config.yaml", yaml.safe_dump({"finetune": to_dict(ft), "job": cfg.name,
                                                       "eval": to_dict(cfg.eval), "input": to_dict(cfg.input),
                                                       "prepare": to_dict(cfg.prepare), "training": settings},
                                                      sort_keys=False))
    return folder


def _test_step(name: str) -> int | None:
    """A tests' fault injection step (KILL_ENV, SHORT_ENV), read here and handed to the workers."""
    return int(os.environ[name]) if os.environ.get(name) else None


def finetune(cfg: JobConfig, ft: FinetuneConfig, restart: bool = False) -> dict:
    """Fine-tune `ft.backbone` on the job's archive, under the job's lock: prepare (nothing when up to date), split
    what was just prepared, train. Returns a summary (paths, steps, seconds, the split's sizes and eval ids)."""
    from newsclip.runtime.runner import job_lock, run_stages

    start_backbone(cfg, ft)  # fail now, not in a worker, if the weights are missing
    cfg.output.mkdir(parents=True, exist_ok=True)
    with job_lock(cfg.output):
        run_stages(cfg, ("prepare",))
        split = compute_split(cfg, ft)
        folder = open_run(cfg, ft, split, restart)
        return _train(cfg, ft, split, folder)


def start_backbone(cfg: JobConfig, ft: FinetuneConfig):
    """The starting point resolved once: the job's own backbone of that name (its mapping's options), or a name of
    the registry."""
    from newsclip.retrieval.registry import resolve_backbone

    if ft.backbone in cfg.backbones:
        return cfg.resolved_backbones[ft.backbone]
    return resolve_backbone(ft.backbone, cfg.backbone_options.get(ft.backbone), cfg.encode.download_root,
                            cfg.encode.hf_cache)


def _train(cfg: JobConfig, ft: FinetuneConfig, split: Split, folder: Path) -> dict:
    import torch
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from newsclip.finetune.feed import steps_per_epoch
    from newsclip.retrieval.trained import save_checkpoint, training_record
    from newsclip.runtime.ray_setup import ensure_ray

    started = time.perf_counter()
    per_epoch = steps_per_epoch(len(split.train), ft)
    if per_epoch == 0:
        raise ValueError(f"finetune.batch_size: {ft.batch_size} x grad_accum {ft.grad_accum} x {ft.workers} workers "
                         f"is more pairs than the train split has ({len(split.train)})")
    total = ft.steps or ft.epochs * per_epoch
    log(f"finetune {ft.backbone}: {len(split.train)} train, {len(split.validation)} validation pairs, "
        f"{len(split.eval_ids)} eval articles held out ({sum(v for k, v in split.excluded.items() if k != 'images')} "
        f"more excluded); {total} steps of {ft.batch_size * ft.workers * ft.grad_accum} pairs")
    backbone = start_backbone(cfg, ft)
    open_clip = backbone.kind == "open_clip"
    ensure_ray(cfg.ray)
    import ray

    # the pairs in the split's order, once in the object store; each rank takes its rows of each step from them
    rows = {name: ray.put(frame.select("query_text", "image_id", "file").to_arrow()) if len(frame) else None
            for name, frame in (("train", split.train), ("validation", split.validation))}
    resources = {"CPU": ft.cpus_per_worker} | ({"GPU": ft.gpus_per_worker} if ft.on_gpu else {})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"finetune": ft, "backbone": backbone,
                           "total_steps": total, "train": rows["train"], "validation": rows["validation"],
                           "decode": {"resolution": backbone.image_size[0], "context_length": backbone.context_length,
                                      "max_pixels": cfg.encode.max_image_pixels, "alpha": cfg.encode.alpha,
                                      "preprocess": backbone.preprocess if open_clip else None,
                                      "tokenizer": backbone.tokenizer if open_clip else None},
                           "task_retries": cfg.ray.max_task_retries, "eval_every": ft.eval_every or per_epoch,
                           "run_dir": str(folder), "kill_at_step": _test_step(KILL_ENV),
                           "short_at_step": _test_step(SHORT_ENV)},
        scaling_config=ScalingConfig(num_workers=ft.workers, use_gpu=ft.on_gpu, resources_per_worker=resources),
        run_config=RunConfig(storage_path=str(folder / "ray"), name=run_name(cfg, ft),
                             failure_config=FailureConfig(max_failures=ft.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=ft.keep_checkpoints)))
    result = trainer.fit()
    record = training_record(split.train, split.validation, job=cfg.name, start=ft.backbone,
                             held_out=len(split.eval_ids))
    with result.checkpoint.as_directory() as final:
        final = Path(final)
        weights = torch.load(final / MODEL, map_location="cpu", weights_only=True)
        with atomic_path(folder / MODEL) as tmp, open(tmp, "wb") as f:
            save_checkpoint(f, weights, record)  # the weights and what they were trained on, in one file
        shutil.copyfile(final / PROBE, folder / PROBE)
        state = json.loads((final / "losses.json").read_text())
    losses = {"train_loss": [{"step": i + 1, "loss": v} for i, v in enumerate(state["train_loss"])],
              "validation_loss": state["validation"], "best_step": state["best_step"],
              "best_validation_loss": state["best_loss"], "stopped_early": state["stopped_early"],
              "resumed_from": state["resumed_from"], "epochs_cut_short": state["epochs_cut_short"],
              "steps": state["step"], "planned_steps": total, "precision": ft.resolved_precision,
              "seconds": round(time.perf_counter() - started, 1)}
    write_text(folder / "losses.json", json.dumps(losses, indent=1))
    first, last = state["train_loss"][:5], state["train_loss"][-5:]
    log(f"finetune: {state['step']} steps in {losses['seconds']:.0f}s, train loss {sum(first) / len(first):.3f} -> "
        f"{sum(last) / len(last):.3f}; model: {folder / MODEL} (use it as `backbones: [{use_as(backbone, folder)}]`)")
    return {"model": folder / MODEL, "folder": folder, "steps": state["step"], "seconds": losses["seconds"],
            "train": len(split.train), "validation": len(split.validation), "eval": len(split.eval_ids)}


def is_open_clip_start(cfg: JobConfig, ft: FinetuneConfig) -> bool:
    """Whether the fine-tune starts from an open_clip model (a mapping of the job's, or an `ARCH/TAG` name)."""
    from newsclip.retrieval.registry import is_open_clip

    return is_open_clip(ft.backbone, cfg.backbone_options.get(ft.backbone))


def tuned_entry(backbone, model: Path):
    """The fine-tuned model as a job backbone: its path (clip), or for an open_clip start the mapping that loads
    it with the start's architecture, preprocess, tokenizer and texts."""
    from newsclip.retrieval.backbone_values import BackboneEntry, PreprocessSettings

    if backbone.kind == "clip":
        return str(model), None
    p = backbone.preprocess
    tokenizer = backbone.tokenizer.folder if backbone.tokenizer.kind == "hf" else None
    return None, BackboneEntry(open_clip=backbone.arch, pretrained=str(model), text=backbone.text, tokenizer=tokenizer,
                               text_model=backbone.text_model,
                               preprocess=PreprocessSettings(p.mean, p.std, p.resize_mode, p.interpolation,
                                                             p.fill_color))


def use_as(backbone, folder: Path) -> str:
    """How a job names the fine-tuned model (the message after training)."""
    path, entry = tuned_entry(backbone, folder / MODEL)
    return path or f"{{open_clip: {entry.open_clip}, pretrained: {entry.pretrained}}}"


def comparison_job(cfg: JobConfig, ft: FinetuneConfig, model: Path) -> JobConfig:
    """The job with [the starting backbone, the fine-tuned model] as its backbones: the same eval sample, prepared
    and translated texts (their stage keys do not read the backbones) and store, so the start's embeddings are
    reused and only the new model is encoded, with the start's encode settings (precision, batch, GPU share)."""
    from newsclip.retrieval.registry import entry_name

    # a clip start needs nothing resolved (its weights may be elsewhere: a cluster's); an open_clip start its settings
    backbone = start_backbone(cfg, ft) if is_open_clip_start(cfg, ft) else None
    path, entry = tuned_entry(backbone, model) if backbone else (str(model), None)
    tuned = path or entry_name(entry)
    backbones = (ft.backbone, tuned)
    options = {name: e for name, e in cfg.backbone_options.items() if name == ft.backbone}
    if entry is not None:
        options[tuned] = entry
    start = cfg.encode.for_backbone(ft.backbone, backbone.image_gflops if backbone else None)
    own = {name: v for name, v in cfg.encode.per_backbone.items() if name == ft.backbone}
    own[tuned] = BackboneEncode(batch_size=start.batch_size, actors=start.actors,
                                num_gpus_per_actor=start.num_gpus_per_actor, precision=start.precision)
    return replace(cfg, backbones=backbones, backbone_options=options, fusion=(),
                   encode=replace(cfg.encode, per_backbone=own))


def finetune_and_compare(cfg: JobConfig, ft: FinetuneConfig, restart: bool = False) -> None:
    """Fine-tune; with `finetune.evaluate` (the default), then run the comparison job and print its metrics. All
    under the job's lock: the comparison scores the prepared/ the split was drawn from, its held-out sample."""
    from newsclip.runtime.runner import STAGE_NAMES, job_lock, run_stages

    cfg.output.mkdir(parents=True, exist_ok=True)
    with job_lock(cfg.output):
        summary = finetune(cfg, ft, restart)
        if ft.evaluate:
            compared = comparison_job(cfg, ft, summary["model"])
            run_stages(compared, STAGE_NAMES[1:])  # not prepare: its sample is the split's, whatever came in since
    if ft.evaluate:
        print_metrics(compared.output)
        print(f"report: {compared.layout.report_html}")
    print(f"model: {summary['model']}")


def main(args) -> int:
    """The CLI's `finetune` command: the job file (with its `finetune:` section), `--set` overrides, `--restart`."""
    cfg, ft = load(args.job, args.overrides)
    finetune_and_compare(cfg, ft, getattr(args, "restart", False))
    return 0


def searched_job(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """The job whose index `newsclip search`, `serve` and `backbones` read from a job file: the job as `newsclip run`
    reads it; for a fine-tune's file (with `finetune:`), the comparison its command ran last in the output folder,
    [the start, the fine-tuned model], once the model exists (before it does, the job without the section)."""
    try:
        fine_tune = SECTION in read_yaml(path, overrides)
    except ConfigError:
        fine_tune = False  # load_job says what is wrong, and where
    if not fine_tune:
        return load_job(path, overrides)
    job, ft = load(path, overrides)
    model = run_dir(job, ft) / MODEL
    return comparison_job(job, ft, model) if model.is_file() else job
