"""Run outputs besides checkpoints: the per-epoch CSV log and the loss-curve plot (written atomically)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from DRoPE.atomic import atomic_path

LOG_COLUMNS = (
    "epoch", "loss", "loss_visible", "loss_masked", "lr", "wd", "lambda", "strategy",
    "seconds", "samples_per_s", "data_wait_fraction",
)


def write_log_csv(path: Path, history: Sequence[dict]) -> Path:
    """Rewrite ``log.csv`` from the whole history (one row per epoch; columns ``LOG_COLUMNS``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: _fmt(row.get(k, "")) for k in LOG_COLUMNS})
    return Path(path)


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_log_csv(path: Path) -> list[dict]:
    """Rows of a ``log.csv`` with numbers converted (strategy stays a string)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        converted = {}
        for key, value in row.items():
            if key == "strategy":
                converted[key] = value
            elif key == "epoch":
                converted[key] = int(value)
            else:
                converted[key] = float(value) if value not in ("", None) else math.nan
        out.append(converted)
    return out


def plot_loss_curve(path: Path, history: Sequence[dict]) -> Path:
    """Loss (total, visible, masked) per epoch on a log scale, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.subplots()
    epochs = [row["epoch"] for row in history]
    for key, label in (("loss", "loss"), ("loss_visible", "visible patches"), ("loss_masked", "masked patches")):
        axes.plot(epochs, [row[key] for row in history], marker="o" if len(epochs) < 30 else None, label=label)
    if all(row["loss"] > 0 for row in history):
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("MSE")
    axes.set_title("DRoPE pretraining")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    return Path(path)
