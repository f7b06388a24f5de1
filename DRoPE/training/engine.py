"""One pretraining epoch: per-step schedules, masking, mixed precision, clipping, metrics.

``train_one_epoch`` takes the model, loader and optimizer plus plain values (no config object, no args) and
returns a dict of averaged metrics. The schedules are evaluated per optimizer step at the fractional epoch at
the end of the step (``DRoPE.training.schedules``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from . import schedules

log = logging.getLogger(__name__)

OOM_ADVICE = "lower optim.batch_size, data.volumes, data.slab or data.crop (or use a smaller model)"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, out of memory); the message says what to change."""


@dataclass(frozen=True)
class StepSchedule:
    """Learning rate, weight decay and lambda as functions of fractional epochs (paper Table 5 by default)."""

    epochs: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    weight_decay_end: float
    lambda_start: float
    lambda_end: float

    def at(self, t: float) -> tuple[float, float, float]:
        """(lr, weight decay, lambda) at fractional epoch t."""
        lr = schedules.learning_rate(t, total=self.epochs, base=self.lr, final=self.min_lr, warmup=self.warmup_epochs)
        wd = schedules.weight_decay(t, total=self.epochs, start=self.weight_decay, end=self.weight_decay_end)
        lam = schedules.mask_lambda(t, total=self.epochs, start=self.lambda_start, end=self.lambda_end)
        return lr, wd, lam


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(error, oom):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def step_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    """A 63-bit seed for the masking generator of one step of one process."""
    return int(np.random.SeedSequence([seed, epoch, step, rank, 104729]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def patches_per_volume(shape: Iterable[int], patch: tuple[int, int, int]) -> int:
    """P = (X / px) * (Y / py) * (Z / pz) for a volume of spatial ``shape`` (X, Y, Z)."""
    X, Y, Z = (int(s) for s in shape)
    return (X // patch[0]) * (Y // patch[1]) * (Z // patch[2])


def train_one_epoch(
    model: torch.nn.Module,
    loader: Iterable[dict],
    optimizer: torch.optim.Optimizer,
    *,
    epoch: int,
    steps_per_epoch: int,
    schedule: StepSchedule,
    make_keep: Callable[[int, int, int, torch.Generator], torch.Tensor],
    strategy: str,
    patch: tuple[int, int, int],
    device: torch.device,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float = 0.0,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train for one epoch; returns averaged metrics over all processes.

    Args:
        model: the MAE (or its DDP wrapper); ``model(x, bvals, bvecs, keep, mask_lambda)`` returns an output with
            ``.loss``, ``.loss_visible``, ``.loss_masked``.
        loader: batches ``{"x": (B, V, X, Y, Z), "bvals": (B, V), "bvecs": (B, V, 3)}`` and optionally
            ``"brain": (B, X, Y, Z)`` bool, the voxels the loss counts.
        optimizer: its param groups carry ``apply_weight_decay`` (bool); the weight-decay schedule only sets those.
        epoch: 0-based epoch; steps_per_epoch: optimizer steps in this epoch (same on every process).
        schedule: lr / weight decay / lambda per fractional epoch.
        make_keep: ``(B, V, P, generator) -> keep`` (B, V, P) bool, True = visible, for this epoch's strategy.
        strategy: name of this epoch's masking (logged).
        patch: model patch size (X, Y, Z) in voxels, to count patches P.
        seed, rank: the masking generator of step s is seeded by (seed, epoch, s, rank).
        amp_dtype: autocast dtype (CUDA: bf16 or fp16) or None for fp32; scaler: GradScaler for fp16.
        grad_clip: max global gradient norm, 0 = no clipping.
        on_step: called after each step with {"step", "steps", "loss", "lr", "samples_per_s"} (progress display).

    Returns {"loss", "loss_visible", "loss_masked", "lr", "wd", "lambda", "strategy", "steps", "samples",
    "seconds", "samples_per_s", "data_wait_fraction", "grad_norm"}: losses are sample-weighted means over the
    epoch and all processes; lr / wd / lambda are the values of the last step.
    """
    model.train()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, visible, masked (sample-weighted), samples
    grad_norm_sum = 0.0
    lr = wd = lam = float("nan")
    start = time.perf_counter()
    wait = 0.0
    steps = 0
    iterator = iter(loader)
    while True:
        fetch = time.perf_counter()
        try:
            batch = next(iterator)
        except StopIteration:
            break
        wait += time.perf_counter() - fetch
        t = schedules.fractional_epoch(epoch, steps, steps_per_epoch)
        lr, wd, lam = schedule.at(t)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group.get("apply_weight_decay", True) else 0.0

        x = batch["x"].to(device, non_blocking=True)
        bvals = batch["bvals"].to(device, non_blocking=True)
        bvecs = batch["bvecs"].to(device, non_blocking=True)
        brain = batch["brain"].to(device, non_blocking=True) if "brain" in batch else None
        B, V = x.shape[:2]
        generator = torch.Generator().manual_seed(step_seed(seed, epoch, steps, rank))
        keep = make_keep(B, V, patches_per_volume(x.shape[2:], patch), generator).to(device)
        try:
            grad_norm = _step(model, optimizer, (x, bvals, bvecs, keep, lam, brain), amp_dtype, scaler, grad_clip, device)
        except Exception as error:
            if is_out_of_memory(error):
                raise TrainingError(
                    f"out of memory at epoch {epoch + 1}, step {steps + 1} (batch {B} x {V} volumes x "
                    f"{'x'.join(str(s) for s in x.shape[2:])} voxels on {device}): {OOM_ADVICE}"
                ) from None
            raise
        out_loss, out_visible, out_masked = grad_norm.pop("losses")
        if not math.isfinite(out_loss):
            raise TrainingError(
                f"loss is {out_loss} at epoch {epoch + 1}, step {steps + 1} (lr {lr:.3g}); lower optim.lr or "
                "optim.grad_clip, or check the data for NaN"
            )
        sums += torch.tensor([out_loss * B, out_visible * B, out_masked * B, B], dtype=torch.float64, device=device)
        grad_norm_sum += grad_norm["norm"]
        steps += 1
        if on_step is not None:
            elapsed = time.perf_counter() - start
            on_step({"step": steps, "steps": steps_per_epoch, "loss": out_loss, "lr": lr,
                     "samples_per_s": float(sums[3]) * world_size / max(elapsed, 1e-9)})
    seconds = time.perf_counter() - start
    if world_size > 1:
        torch.distributed.all_reduce(sums)
        timing = torch.tensor([wait, seconds], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(timing)
        wait, seconds = float(timing[0]) / world_size, float(timing[1]) / world_size
    samples = float(sums[3])
    if steps != steps_per_epoch:
        log.warning("epoch %d ran %d steps, expected %d", epoch + 1, steps, steps_per_epoch)
    return {
        "loss": float(sums[0]) / max(samples, 1.0),
        "loss_visible": float(sums[1]) / max(samples, 1.0),
        "loss_masked": float(sums[2]) / max(samples, 1.0),
        "lr": lr,
        "wd": wd,
        "lambda": lam,
        "strategy": strategy,
        "steps": steps,
        "samples": int(samples),
        "seconds": seconds,
        "samples_per_s": samples / max(seconds, 1e-9),
        "data_wait_fraction": wait / max(seconds, 1e-9),
        "grad_norm": grad_norm_sum / max(steps, 1),
    }


def _step(model, optimizer, inputs, amp_dtype, scaler, grad_clip, device) -> dict:
    """Forward on ``inputs`` = (x, bvals, bvecs, keep, lambda, brain), backward, clip, update.

    Returns {"norm": pre-clip grad norm, "losses": (loss, visible, masked)}."""
    autocast = torch.autocast(device_type=device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    optimizer.zero_grad(set_to_none=True)
    with autocast:
        out = model(*inputs)
    loss = out.loss.float()
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])) if params else torch.zeros(())
    if scaler is not None and scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    values = torch.stack([loss.detach(), out.loss_visible.detach().float(), out.loss_masked.detach().float(), norm.detach().float().to(loss.device)])
    loss_v, visible_v, masked_v, norm_v = values.tolist()
    return {"norm": norm_v, "losses": (loss_v, visible_v, masked_v)}
