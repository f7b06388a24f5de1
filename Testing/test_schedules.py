"""Per-step schedules of pretraining (paper Table 5): learning rate, weight decay, lambda."""

from __future__ import annotations

import math

import pytest

from DRoPE.training import schedules
from DRoPE.training.config import OptimConfig
from DRoPE.training.engine import StepSchedule


def paper_schedule(epochs=300, warmup=40.0) -> StepSchedule:
    return StepSchedule(epochs=epochs, lr=5e-5, min_lr=1e-6, warmup_epochs=warmup, weight_decay=0.04,
                        weight_decay_end=0.4, lambda_start=0.05, lambda_end=0.95)


def test_paper_defaults_are_table_5():
    optim = OptimConfig()
    assert (optim.lr, optim.min_lr, optim.warmup_epochs, optim.epochs, optim.batch_size) == (5e-5, 1e-6, 40, 300, 4)
    assert (optim.weight_decay, optim.weight_decay_end, optim.betas) == (0.04, 0.4, (0.9, 0.999))


def test_fractional_epoch_is_end_of_step():
    assert schedules.fractional_epoch(0, 0, 4) == 0.25
    assert schedules.fractional_epoch(2, 3, 4) == 3.0
    with pytest.raises(ValueError):
        schedules.fractional_epoch(0, 0, 0)


def test_warmup_starts_near_zero_and_is_linear():
    steps = 10  # per epoch
    sched = paper_schedule()
    first = sched.at(schedules.fractional_epoch(0, 0, steps))[0]
    # the first step: 1/(40*10) of the base learning rate, i.e. really warming up from ~0
    assert first == pytest.approx(5e-5 / 400, rel=1e-12)
    assert first < 1e-3 * 5e-5 * 10
    # linear: lr(t) = base * t / warmup at arbitrary t inside the warm-up
    for t in (0.3, 7.0, 21.5, 39.9):
        assert sched.at(t)[0] == pytest.approx(5e-5 * t / 40, rel=1e-12)
    # strictly increasing over the warm-up steps
    lrs = [sched.at(schedules.fractional_epoch(e, s, steps))[0] for e in range(40) for s in range(steps)]
    assert all(b > a for a, b in zip(lrs, lrs[1:]))


def test_lr_reaches_base_at_end_of_warmup_then_cosine_to_final():
    sched = paper_schedule()
    assert sched.at(40.0)[0] == pytest.approx(5e-5, rel=1e-12)
    # half-way through the cosine the lr is the mean of base and final
    assert sched.at(40 + 130)[0] == pytest.approx((5e-5 + 1e-6) / 2, rel=1e-12)
    # an independent evaluation of the cosine formula
    t = 123.4
    expected = 1e-6 + (5e-5 - 1e-6) * 0.5 * (1 + math.cos(math.pi * (t - 40) / 260))
    assert sched.at(t)[0] == pytest.approx(expected, rel=1e-12)
    # the last step of the last epoch ends exactly at the final value
    steps = 7
    assert sched.at(schedules.fractional_epoch(299, steps - 1, steps))[0] == pytest.approx(1e-6, rel=1e-12)
    lrs = [sched.at(40 + k * 0.5)[0] for k in range(521)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_cosine_grows_from_start_to_end():
    sched = paper_schedule()
    assert sched.at(0.0)[1] == pytest.approx(0.04)
    assert sched.at(150.0)[1] == pytest.approx(0.22)
    assert sched.at(300.0)[1] == pytest.approx(0.4)
    t = 77.0
    assert sched.at(t)[1] == pytest.approx(0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * t / 300)))


def test_lambda_ramps_linearly():
    sched = paper_schedule()
    assert sched.at(0.0)[2] == pytest.approx(0.05)
    assert sched.at(100.0)[2] == pytest.approx(0.05 + 0.9 / 3)
    assert sched.at(300.0)[2] == pytest.approx(0.95)
    assert sched.at(400.0)[2] == pytest.approx(0.95)  # clamped


def test_no_warmup_starts_at_base():
    sched = paper_schedule(epochs=10, warmup=0.0)
    assert sched.at(0.0)[0] == pytest.approx(5e-5)
    assert sched.at(10.0)[0] == pytest.approx(1e-6)
