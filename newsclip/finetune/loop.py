"""The Ray Train worker loop: CLIP's symmetric InfoNCE with its learnable temperature (SigLIP's sigmoid loss with its
logit bias for SigLIP models), AdamW with warm-up and cosine decay, validation with early stopping, and checkpoints
that a restarted worker group resumes from."""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from newsclip.finetune.config import FinetuneConfig
from newsclip.finetune.optim import BETAS, EPS, MAX_LOGIT_SCALE, param_groups, warmup_cosine

if TYPE_CHECKING:
    import torch

    from newsclip.retrieval.backbone_values import ResolvedBackbone

STATE = "state.pt"  # the training state in every checkpoint
MODEL = "model.pt"  # the final checkpoint's fp32 clip state dict (what the driver commits as finetune/<run>/model.pt)
PROBE = "probe.npz"  # a few pairs and their embeddings by the final model: the saved model must reproduce them
PROBE_ROWS = 8
KILL_ENV = "NEWSCLIP_TEST_KILL_AT_STEP"  # tests: rank 0's process is SIGKILLed once after this step
# tests: the last rank's first micro-batch of this step loses half its pairs, as if their images no longer decoded
SHORT_ENV = "NEWSCLIP_TEST_SHORT_AT_STEP"


def lr_at(step: int, steps: int, ft: FinetuneConfig) -> float:
    """The learning rate of a step: `warmup_cosine` with the fine-tune's settings."""
    return warmup_cosine(step, steps, ft.lr, ft.warmup_share, ft.min_lr_share)


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, rank: int = 0,
              world: int = 1) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: each image against every text of the global batch and each text against every
    image (features gathered from all ranks with their gradients, open_clip's local-loss form)."""
    import torch
    import torch.nn.functional as F

    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    all_image, all_text = image, text
    if world > 1:
        from torch.distributed.nn.functional import all_gather

        all_image, all_text = torch.cat(all_gather(image)), torch.cat(all_gather(text))
    labels = torch.arange(len(image), device=image.device) + rank * len(image)
    return (F.cross_entropy(scale * image @ all_text.t(), labels)
            + F.cross_entropy(scale * text @ all_image.t(), labels)) / 2


def sigmoid_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, rank: int = 0,
                 world: int = 1) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss with its learnable bias: every image against every text of the global batch,
    +1 for its own pair and -1 for the rest, summed and divided by the local batch (open_clip's SigLipLoss; the
    texts gathered from all ranks with their gradients rather than passed round a ring: the same sum)."""
    import torch
    import torch.nn.functional as F

    image, text = F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)
    all_text = text
    if world > 1:
        from torch.distributed.nn.functional import all_gather

        all_text = torch.cat(all_gather(text))
    labels = -torch.ones((len(image), len(all_text)), device=image.device)
    labels[torch.arange(len(image)), torch.arange(len(image)) + rank * len(image)] = 1
    logits = scale * image @ all_text.t() + bias
    return -F.logsigmoid(labels * logits).sum() / len(image)


def freeze(model, ft: FinetuneConfig) -> None:
    """LiT's locked image tower and/or a frozen text tower: no gradients (the temperature always trains)."""
    # clip's and open_clip's CLIP text parts; open_clip's other models keep their text tower under `text.`
    text_parts = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection", "text.")
    for name, param in model.named_parameters():
        if (ft.lock_image and name.startswith("visual.")) or (ft.freeze_text and name.startswith(text_parts)):
            param.requires_grad_(False)


def towers(clip_model, backbone: ResolvedBackbone | None = None):
    """Both towers in one module (what DDP wraps): uint8 pixels normalised on the device as ImageEncoder does, then
    (image features, text features, exp(logit_scale), logit_bias or None). `backbone`: an open_clip model's resolved
    backbone (its mean and std); None: a clip model."""
    import torch
    from torchvision.transforms import Normalize

    from newsclip.demo.model import _encode_text_trimmed

    open_clip = backbone is not None and backbone.kind == "open_clip"

    class Towers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = clip_model
            if open_clip:
                self.normalize = Normalize(backbone.preprocess.mean, backbone.preprocess.std)
            else:
                from clip.clip import _transform

                self.normalize = _transform(clip_model.visual.input_resolution).transforms[-1]  # no parameters

        def forward(self, pixels, tokens):
            if open_clip:  # fp32 master weights: autocast gives the lower precision
                images = self.normalize(pixels.float().div(255))
                bias = self.clip.logit_bias if backbone.loss == "sigmoid" else None
                return (self.clip.encode_image(images), self.clip.encode_text(tokens.long()),
                        self.clip.logit_scale.exp(), bias)
            images = self.normalize(pixels.float().div(255)).to(self.clip.dtype)
            # the text up to the longest end-of-text: the same function as encode_text (causal mask), cheaper
            return (self.clip.encode_image(images), _encode_text_trimmed(self.clip, tokens),
                    self.clip.logit_scale.exp(), None)

    return Towers()


def forward_loss(model, pixels, tokens, precision: str, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The contrastive loss of a batch through `towers(...)` (or its DDP wrapper), under bf16/fp16 autocast: InfoNCE,
    or SigLIP's sigmoid loss where the towers give a logit bias."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(pixels.device.type, dtype or torch.float32, enabled=dtype is not None):
        image, text, scale, bias = model(pixels, tokens)
    if bias is not None:
        return sigmoid_loss(image, text, scale.float(), bias.float(), rank, world)
    return clip_loss(image, text, scale.float(), rank, world)


def _rng_state(device) -> dict:
    """This rank's RNG states: torch's (CPU, and CUDA on a GPU), numpy's and Python's."""
    import torch

    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict, device) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _all_rng_states(device, world: int) -> list[dict]:
    """Every rank's RNG states, in rank order (on every rank: all of them call it at the same point)."""
    import torch

    if world == 1:
        return [_rng_state(device)]
    states = [None] * world
    torch.distributed.all_gather_object(states, _rng_state(device))
    return states


def _all_full(rows: int, batch_size: int, world: int, device) -> bool:
    """Whether every rank's micro-batch has all its pairs (all ranks ask at once, so all of them agree)."""
    import torch

    if world == 1:
        return rows == batch_size
    fewest = torch.tensor([rows], device=device)
    torch.distributed.all_reduce(fewest, op=torch.distributed.ReduceOp.MIN)
    return int(fewest.item()) == batch_size


def train_loop(config: dict) -> None:
    """One Ray Train worker. `config`: finetune (FinetuneConfig), backbone (ResolvedBackbone), total_steps, train and
    validation (ObjectRefs of Arrow tables of query_text, image_id, file; validation may be None), decode (the
    decoding's keyword arguments), task_retries, eval_every, run_dir, and the tests' kill_at_step (KILL_ENV's) and
    short_at_step (SHORT_ENV's), or None."""
    import ray
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from newsclip.finetune.feed import Feed, steps_per_epoch, train_plan, validation_plan
    from newsclip.retrieval.registry import load_model

    ft: FinetuneConfig = config["finetune"]
    total = config["total_steps"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = get_device()
    torch.manual_seed(ft.seed + rank)
    train_rows = ray.get(config["train"])
    validation_rows = ray.get(config["validation"]) if config["validation"] is not None else None
    train_feed = Feed(train_rows, config["decode"], config["task_retries"])
    per_epoch = steps_per_epoch(len(train_rows), ft)

    backbone = config["backbone"]
    clip_model = load_model(backbone)
    clip_model.float()  # fp32 master weights; bf16/fp16 come from autocast
    freeze(clip_model, ft)
    model = prepare_model(towers(clip_model, backbone))
    optimizer = torch.optim.AdamW(param_groups(clip_model, ft.weight_decay), lr=ft.lr, betas=BETAS, eps=EPS)
    precision = ft.resolved_precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # the state a checkpoint holds; a restarted worker group continues from it, not from step 0. The data position
    # is (epoch, the step it started at): an epoch cut short ends before its planned steps
    state = {"step": 0, "epoch": 0, "epoch_start": 0, "epochs_cut_short": [], "train_loss": [], "validation": [],
             "best_loss": None, "best_step": None, "bad_validations": 0, "resumed_from": [], "stopped_early": False}
    best_model = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            # our own file from this run (optimizer state, RNG states as Python objects): not a foreign checkpoint
            saved = torch.load(Path(folder) / STATE, map_location="cpu", weights_only=False)
        clip_model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        if len(saved["rng"]) == world:  # every rank's own; another worker count cannot continue their streams
            _set_rng_state(saved["rng"][rank], device)
        best_model = saved["best_model"]
        state = saved["state"]
        state["resumed_from"].append(state["step"])

    def set_modes(train: bool) -> None:
        model.train(train)
        if ft.lock_image:  # a locked tower keeps its BatchNorm statistics too
            clip_model.visual.eval()

    def on_device(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.array(v)).to(device) for k, v in batch.items()}

    probe: dict = {}

    def validate() -> float | None:
        """The mean loss over the validation split, each rank's batches with their own negatives."""
        if validation_rows is None:
            return None
        feed = Feed(validation_rows, config["decode"], config["task_retries"])
        set_modes(False)
        total_loss = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for batch in map(on_device, feed.batches(validation_plan(len(validation_rows), ft.batch_size, rank,
                                                                     world))):
                if not probe and rank == 0:
                    probe.update(pixels=batch["pixels"][:PROBE_ROWS].cpu(), tokens=batch["tokens"][:PROBE_ROWS].cpu())
                n = len(batch["pixels"])
                if n > 1:  # a lone pair has no negative to tell it from
                    # not through DDP, whose forward broadcasts buffers: ranks may have more or fewer batches
                    loss = forward_loss(getattr(model, "module", model), batch["pixels"], batch["tokens"], precision)
                    total_loss += torch.tensor([loss.item() * n, n], dtype=torch.float64, device=device)
        if world > 1:
            torch.distributed.all_reduce(total_loss)
        set_modes(True)
        return float(total_loss[0] / total_loss[1]) if total_loss[1] > 0 else None

    def report(metrics: dict, final: bool = False) -> None:
        """Every rank reports (Ray Train's report is a barrier); rank 0 attaches the checkpoint."""
        rng = _all_rng_states(device, world)
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory() as folder:
            torch.save({"model": clip_model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scaler": scaler.state_dict(), "rng": rng, "best_model": best_model,
                        "state": state}, Path(folder) / STATE)
            if final:
                _write_final(Path(folder), clip_model, best_model, probe, state, backbone)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))

    def more() -> bool:
        return (state["step"] < total and not state["stopped_early"]
                and (ft.steps is not None or state["epoch"] < ft.epochs))

    set_modes(True)
    while more():
        epoch, cut = state["epoch"], False
        plan = train_plan(len(train_rows), ft, epoch, state["step"] - state["epoch_start"], rank)
        micro_losses = []
        for batch in map(on_device, train_feed.batches(plan)):
            if (config.get("short_at_step") == state["step"] + 1 and epoch == 0 and rank == world - 1
                    and not micro_losses):
                batch = {k: v[: len(v) // 2] for k, v in batch.items()}  # tests: pairs that no longer decode
            # a micro-batch short of pairs on any rank ends the epoch on all of them: the features they gather
            # must be of one size, and a rank that went on alone would wait for the others for ever
            if not _all_full(len(batch["pixels"]), ft.batch_size, world, device):
                cut = True
                break
            loss = forward_loss(model, batch["pixels"], batch["tokens"], precision, rank, world)
            scaler.scale(loss / ft.grad_accum).backward()
            micro_losses.append(loss.item())
            if len(micro_losses) < ft.grad_accum:
                continue
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state["step"], total, ft)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                clip_model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            state["step"] += 1
            state["train_loss"].append(float(np.mean(micro_losses)))
            micro_losses = []
            step = state["step"]
            if config.get("kill_at_step") == step and rank == 0:
                _kill_once(Path(config["run_dir"]) / f".killed-at-{step}")
            if step - state["epoch_start"] == per_epoch:  # the epoch's last step: a checkpoint holds the next one's
                state.update(epoch=epoch + 1, epoch_start=step)
            if step % config["eval_every"] == 0 or step == total:
                val = validate()
                metrics = {"step": step, "epoch": epoch, "train_loss": float(np.mean(state["train_loss"][-10:])),
                           "logit_scale": float(clip_model.logit_scale.exp())}
                if val is not None:
                    state["validation"].append({"step": step, "loss": val})
                    metrics["validation_loss"] = val
                    if state["best_loss"] is None or val < state["best_loss"]:
                        state.update(best_loss=val, best_step=step, bad_validations=0)
                        best_model = {k: v.detach().cpu().clone() for k, v in clip_model.state_dict().items()}
                    else:
                        state["bad_validations"] += 1
                        if ft.patience is not None and state["bad_validations"] >= ft.patience:
                            state["stopped_early"] = True
                if more():
                    report(metrics)
            if not more() or state["epoch"] != epoch:
                break
        if cut:
            optimizer.zero_grad(set_to_none=True)  # what this step's earlier micro-batches accumulated
            if state["step"] == state["epoch_start"]:
                raise RuntimeError(f"finetune: epoch {epoch} came up short before its first step: images of the "
                                   f"train split no longer decode (their shards changed since prepare?); run the "
                                   f"fine-tune again")
            state["epochs_cut_short"].append({"epoch": epoch, "at_step": state["step"]})
            state.update(epoch=epoch + 1, epoch_start=state["step"])
        elif state["epoch"] == epoch and more():  # an epoch of no whole step: the split is smaller than a step
            raise RuntimeError(f"finetune: epoch {epoch} has no step of {ft.batch_size * world * ft.grad_accum} pairs")
    if not probe and rank == 0:  # no validation split: probe with a few train pairs
        batch = on_device(next(train_feed.batches([np.arange(min(PROBE_ROWS, len(train_rows)))])))
        probe.update(pixels=batch["pixels"].cpu(), tokens=batch["tokens"].cpu())
    report({"step": state["step"], "final": True, "best_step": state["best_step"],
            "best_validation_loss": state["best_loss"]}, final=True)


def _kill_once(marker: Path) -> None:
    """Tests' fault injection (KILL_ENV): this worker's process dies by SIGKILL, the first time only."""
    import os
    import signal

    if not marker.exists():
        marker.touch()
        _wait_until_reports_are_taken()
        os.kill(os.getpid(), signal.SIGKILL)


def _wait_until_reports_are_taken(timeout_s: float = 120.0) -> None:
    """Ray Train's controller takes a worker's reports from a queue when it next polls the worker (every 2 s); a
    checkpoint still in the queue dies with the worker. A test that kills a worker after a checkpoint waits for the
    controller to have it, or on a busy machine the run restarts from step 0 (internal API: fault injection only)."""
    import time

    from ray.train.v2._internal.execution.context import get_train_context

    queue = get_train_context().get_result_queue()
    deadline = time.monotonic() + timeout_s
    while not queue.empty() and time.monotonic() < deadline:
        time.sleep(0.1)


def _write_final(folder: Path, clip_model, best_model: dict | None, probe: dict, state: dict,
                 backbone: ResolvedBackbone | None = None) -> None:
    """model.pt (the best validated weights, else the last; fp32, plain state dict) and probe.npz (a few pairs and
    their embeddings by exactly that model, on the CPU as load_backbone gives it) into the final checkpoint."""
    import copy

    import torch

    final = copy.deepcopy(clip_model).cpu().float().eval()
    if best_model is not None:
        final.load_state_dict(best_model)
    weights = {k: v.detach().contiguous().clone() for k, v in final.state_dict().items()}
    with open(folder / MODEL, "wb") as f:  # through a file object: the same weights give the same bytes
        torch.save(weights, f)
    from torchvision.transforms import Normalize

    if backbone is not None and backbone.kind == "open_clip":
        normalize, tokens = Normalize(backbone.preprocess.mean, backbone.preprocess.std), probe["tokens"].long()
    else:
        from clip.clip import _transform

        normalize, tokens = _transform(final.visual.input_resolution).transforms[-1], probe["tokens"]
    with torch.no_grad():
        image = final.encode_image(normalize(probe["pixels"].float().div(255)))
        text = final.encode_text(tokens)
    np.savez(folder / PROBE, pixels=probe["pixels"].numpy(), tokens=probe["tokens"].numpy(),
             image=image.numpy(), text=text.numpy())
    (folder / "losses.json").write_text(json.dumps(state))
