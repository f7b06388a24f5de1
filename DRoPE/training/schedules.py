"""Pure schedule formulas for pretraining (paper Table 5), evaluated per optimizer step.

Time is measured in *fractional epochs* at the END of an optimizer step::

    t = epoch + (step + 1) / steps_per_epoch        # epoch, step counted from 0

so the first step of training sees t = 1 / steps_per_epoch (a small but non-zero learning rate during warm-up)
and the last step of the last epoch sees t = total_epochs, where every schedule reaches its final value exactly.

- learning rate: linear warm-up from 0 to ``base`` over ``warmup`` epochs (lr = base * t / warmup), then a half
  cosine from ``base`` down to ``final`` at ``total`` epochs;
- weight decay: half cosine from ``start`` (0.04) at t = 0 to ``end`` (0.4) at t = total (it grows, as in DINO);
- lambda (weight of the masked-patch MSE in the loss): linear ramp from ``start`` (0.05) to ``end`` (0.95).
"""

from __future__ import annotations

import math


def fractional_epoch(epoch: int, step: int, steps_per_epoch: int) -> float:
    """Training time at the end of optimizer step ``step`` (0-based) of epoch ``epoch`` (0-based), in epochs."""
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    return epoch + (step + 1) / steps_per_epoch


def half_cosine(t: float, total: float, start: float, end: float) -> float:
    """Half cosine from ``start`` at t = 0 to ``end`` at t = total (clamped outside [0, total])."""
    if total <= 0:
        return end
    progress = min(max(t / total, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(t: float, *, total: float, base: float, final: float, warmup: float) -> float:
    """lr at fractional epoch t: base * t / warmup for t < warmup, then half cosine base -> final at t = total."""
    if warmup > 0 and t < warmup:
        return base * max(t, 0.0) / warmup
    return half_cosine(t - warmup, total - warmup, base, final)


def weight_decay(t: float, *, total: float, start: float, end: float) -> float:
    """Weight decay at fractional epoch t: half cosine start -> end over the whole run."""
    return half_cosine(t, total, start, end)


def mask_lambda(t: float, *, total: float, start: float, end: float) -> float:
    """Weight of the masked-patch loss at fractional epoch t: linear start -> end over the whole run."""
    if total <= 0:
        return end
    progress = min(max(t / total, 0.0), 1.0)
    return start + (end - start) * progress
