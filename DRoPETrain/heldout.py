"""Held-out reconstruction error of checkpoints against the shell-mean baseline (the model card's table).

    python DRoPETrain/heldout.py --data LIST_OR_FOLDER --checkpoint drope=RUN1 --checkpoint mae=RUN2 \
        [--mask-ratio 0.75] [--seeds 0 1 2] [--out table.md]

Every checkpoint sees exactly the same hidden patches (same seed, same grid). The error is the mean squared error
of the b0-normalised signal over hidden voxels inside the brain mask; the baseline fills each hidden voxel with the
mean of the visible volumes of the same shell (``DRoPE.baselines.shell_mean_baseline``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from DRoPE.atomic import atomic_path  # noqa: E402
from DRoPE.baselines import shell_mean_baseline  # noqa: E402
from DRoPE.gradients import DWIError, DWIWarning  # noqa: E402
from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.reconstruct import ReconstructSettings, normalised_pair, run_reconstruction  # noqa: E402
from DRoPE.training.data import DataError, find_dwis  # noqa: E402

BASELINE = "shell mean of visible volumes"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="held-out DWIs: folder or list file")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a checkpoint to evaluate, with the name used in the table (repeatable)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden per volume")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mask seeds (one run each)")
    parser.add_argument("--out", type=Path, help="write the Markdown table here as well")
    return parser


def masked_mse(prediction: np.ndarray, target: np.ndarray, hidden: np.ndarray) -> float:
    """Mean squared error over the hidden voxels. All arrays (X, Y, Z, V); hidden bool."""
    return float(((prediction - target) ** 2)[hidden].mean())


def evaluate(paths, checkpoints: dict[str, Path], mask_ratio: float, seeds) -> list[dict]:
    """One row per (DWI, seed): masked MSE of each checkpoint and of the baseline."""
    rows = []
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWIWarning)
            dwi = load_dwi(path)
        for seed in seeds:
            settings = ReconstructSettings(mask_ratio=mask_ratio, seed=seed)
            row = {"dwi": str(path), "seed": seed}
            visible = mask = None
            for name, weights in checkpoints.items():
                result = run_reconstruction(dwi, weights, settings)
                if visible is not None and not np.array_equal(visible, result.visible):
                    raise ValueError(f"{weights}: hidden patches differ between checkpoints (another patch size?)")
                visible, mask = result.visible, result.mask
                prediction, target = normalised_pair(dwi, result.recon, mask)
                row[name] = masked_mse(prediction, target, mask[..., None] & ~visible)
            baseline = shell_mean_baseline(target, visible, dwi.gtab.shell_bvals, mask)
            row[BASELINE] = masked_mse(baseline, target, mask[..., None] & ~visible)
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown_table(rows: list[dict], names: list[str]) -> str:
    """Per-DWI mean over seeds, and the mean over DWIs, of each method's masked MSE."""
    columns = names + [BASELINE]
    lines = ["| held-out DWI | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    dwis = list(dict.fromkeys(r["dwi"] for r in rows))
    for dwi in dwis:
        mine = [r for r in rows if r["dwi"] == dwi]
        values = [np.mean([r[c] for r in mine]) for c in columns]
        lines.append(f"| {Path(dwi).parent.name}/{Path(dwi).name} | " + " | ".join(f"{v:.5f}" for v in values) + " |")
    overall = [np.mean([r[c] for r in rows]) for c in columns]
    lines.append("| **mean** | " + " | ".join(f"**{v:.5f}**" for v in overall) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checkpoints = dict(_named(spec) for spec in args.checkpoint)
        rows = evaluate(find_dwis(args.data), checkpoints, args.mask_ratio, args.seeds)
    except (DWIError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = markdown_table(rows, list(checkpoints))
    print(table)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(table + "\n")
    return 0


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--checkpoint {spec!r}: expected NAME=PATH")
    return name, Path(path)


if __name__ == "__main__":
    sys.exit(main())
