"""Held-out reconstruction error of checkpoints against simple baselines (the model card's tables).

    python DRoPETrain/heldout.py --data LIST_OR_FOLDER --checkpoint drope=RUN1 --checkpoint mae=RUN2 \
        [--mask-ratio 0.75] [--seeds 0 1 2] [--out table.md] [--json rows.json]

Every checkpoint and baseline sees exactly the same hidden patches (same seed, same grid). Two numbers per method:

- masked MSE: mean squared error of the b0-normalised signal over the hidden diffusion-weighted voxels inside the
  brain mask (b0 volumes are the normalisation reference and never hidden);
- FA error: mean |FA - FA of the acquired data| over the brain, FA fitted (WLS) to the DWI completed by the method:
  hidden voxels filled by it, visible voxels as acquired (so model and baselines are compared alike).

Baselines (``DRoPE.baselines``): the mean of the visible volumes of the same shell at that voxel, the same mean
weighted by angular closeness, and a tensor fit of the visible volumes where at least 7 are visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from DRoPE.atomic import atomic_path  # noqa: E402
from DRoPE.baselines import BASELINES, baseline_predictions  # noqa: E402
from DRoPE.dti import DTIModel, mean_b0  # noqa: E402
from DRoPE.gradients import DWIError, DWIWarning  # noqa: E402
from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.reconstruct import ReconstructSettings, normalised_pair, run_reconstruction  # noqa: E402
from DRoPE.training.data import DataError, find_dwis  # noqa: E402

REFERENCE = BASELINES[0]  # ratios are given against the plain shell mean


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="held-out DWIs: folder or list file")
    parser.add_argument("--checkpoint", action="append", required=True, metavar="NAME=PATH",
                        help="a checkpoint to evaluate, with the name used in the table (repeatable)")
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of patches hidden per volume")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mask seeds (one run each)")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here as well")
    parser.add_argument("--json", type=Path, help="write the per-scan, per-seed rows here as JSON")
    return parser


def masked_mse(prediction: np.ndarray, target: np.ndarray, hidden: np.ndarray) -> float:
    """Mean squared error over the hidden voxels. All arrays (X, Y, Z, V); hidden bool."""
    return float(((prediction - target) ** 2)[hidden].mean())


class FAError:
    """Mean absolute FA error of completed DWIs against the FA of the acquired one (fitted once)."""

    def __init__(self, dwi, mask: np.ndarray):
        self.model = DTIModel(dwi.gtab)
        self.b0 = mean_b0(dwi.data, dwi.gtab)[..., None]
        self.reference = self.model.fit(dwi.data, mask, progress=False)
        self.mask = mask

    def __call__(self, normalised: np.ndarray) -> float:
        """normalised: (X, Y, Z, V) completed DWI in units of the mean b0."""
        fit = self.model.fit(normalised * self.b0, self.mask, progress=False)
        both = fit.mask & self.reference.mask
        return float(np.abs(fit.fa - self.reference.fa)[both].mean())


def evaluate_scan(dwi, checkpoints: dict[str, Path], mask_ratio: float, seed: int) -> dict:
    """One row {dwi, seed, mse: {method: value}, fa: {method: value}} for one scan and mask seed."""
    settings = ReconstructSettings(mask_ratio=mask_ratio, seed=seed)
    predictions, visible, mask, target = {}, None, None, None
    for name, weights in checkpoints.items():
        result = run_reconstruction(dwi, weights, settings)
        if visible is not None and not np.array_equal(visible, result.visible):
            raise ValueError(f"{weights}: hidden patches differ between checkpoints (another patch size?)")
        visible, mask = result.visible, result.mask
        predictions[name], target = normalised_pair(dwi, result.recon, mask)
    predictions.update(baseline_predictions(target, visible, dwi.gtab, mask))
    hidden = mask[..., None] & ~visible
    fa_error = FAError(dwi, mask)
    return {
        "dwi": str(dwi.source),
        "seed": seed,
        "mse": {name: masked_mse(p, target, hidden) for name, p in predictions.items()},
        "fa": {name: fa_error(p) for name, p in predictions.items()},
    }


def evaluate(paths, checkpoints: dict[str, Path], mask_ratio: float, seeds) -> list[dict]:
    """One row per (DWI, seed) (see ``evaluate_scan``), printed as it comes."""
    rows = []
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWIWarning)
            dwi = load_dwi(path)
        for seed in seeds:
            rows.append(evaluate_scan(dwi, checkpoints, mask_ratio, seed))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def scan_label(path: str) -> str:
    """'source/series' for corpus scans (dcm_qa_*/SERIES/dwi.nii.gz), else the DWI's folder name."""
    folder = Path(path).parent
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name.startswith("dcm_qa") else folder.name


def markdown_table(rows: list[dict], metric: str, methods: list[str]) -> str:
    """Per-DWI mean over seeds, the mean over DWIs and its ratio to the shell mean, for ``metric`` (mse | fa)."""
    lines = ["| held-out DWI | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for dwi in dict.fromkeys(r["dwi"] for r in rows):
        mine = [r[metric] for r in rows if r["dwi"] == dwi]
        values = [np.mean([m[c] for m in mine]) for c in methods]
        lines.append(f"| {scan_label(dwi)} | " + " | ".join(f"{v:.5f}" for v in values) + " |")
    overall = [np.mean([r[metric][c] for r in rows]) for c in methods]
    lines.append("| **mean** | " + " | ".join(f"**{v:.5f}**" for v in overall) + " |")
    reference = overall[methods.index(REFERENCE)]
    lines.append(f"| mean / {REFERENCE} | " + " | ".join(f"{v / reference:.3f}" for v in overall) + " |")
    return "\n".join(lines)


def report(rows: list[dict], names: list[str], mask_ratio: float, seeds) -> str:
    methods = names + list(BASELINES)
    scans = len(set(r["dwi"] for r in rows))
    header = f"{scans} held-out scans, {mask_ratio:.0%} of patches hidden, seeds {list(seeds)}"
    return (f"{header}\n\nMasked MSE (b0-normalised signal, hidden weighted voxels in the brain):\n\n"
            f"{markdown_table(rows, 'mse', methods)}\n\nFA error (mean |FA - FA acquired| over the brain, "
            f"hidden voxels filled by each method):\n\n{markdown_table(rows, 'fa', methods)}\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        checkpoints = dict(_named(spec) for spec in args.checkpoint)
        rows = evaluate(find_dwis(args.data), checkpoints, args.mask_ratio, args.seeds)
    except (DWIError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report(rows, list(checkpoints), args.mask_ratio, args.seeds)
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    return 0


def _named(spec: str) -> tuple[str, Path]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--checkpoint {spec!r}: expected NAME=PATH")
    return name, Path(path)


if __name__ == "__main__":
    sys.exit(main())
