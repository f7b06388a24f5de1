"""Leave-volumes-out validation of angular synthesis (``python -m DRoPE synthesize``) against simple baselines.

    python DRoPETrain/synthesis_heldout.py --data LIST_OR_FOLDER [--checkpoint Resources/model] [--fraction 0.1]
        [--seed 0] [--out table.md] [--json rows.json] [--threads 1]

Per scan, the diffusion-weighted volumes are split at random (seeded) into folds of ``--fraction`` of them (at least
one); each fold is left out entirely, synthesised from every remaining volume, and compared with the acquired
truth, so every weighted volume is left out once. Methods, all from the same remaining volumes:

- the model: ``DRoPE.synthesis.synthesize_normalised`` with the left-out (b, g) as requests;
- DTI fit: a WLS tensor fit of the remaining volumes (b0 included) at each voxel, evaluated at the left-out (b, g)
  (``DRoPE.baselines.dti_baseline``);
- shell mean and angular shell mean of the remaining volumes of the shell (``shell_mean_baseline``).

Error: mean squared error of the b0-normalised signal (signal / mean b0, clipped to [0, 1.5]) over the brain voxels
of the left-out volumes. Tables: per scan and mean; by the angle from a left-out direction to its nearest remaining
one; and a new-shell check (each acquired direction requested at twice the acquired b: brain-mean signal ratio to
the acquired volume, model against the DTI fit's physics).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from DRoPE.arguments import in_range, output_file  # noqa: E402
from DRoPE.atomic import atomic_path  # noqa: E402
from DRoPE.baselines import dti_baseline, shell_mean_baseline  # noqa: E402
from DRoPE.dti import mean_b0  # noqa: E402
from DRoPE.gradients import DWIError, DWIWarning  # noqa: E402
from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.model import load_model, read_metadata  # noqa: E402
from DRoPE.preprocess import brain_mask, normalize, preprocess  # noqa: E402
from DRoPE.reconstruct import ReconstructSettings, resolve_slab  # noqa: E402
from DRoPE.resources import DEFAULT_WEIGHTS  # noqa: E402
from DRoPE.synthesis import synthesize_normalised  # noqa: E402
from DRoPE.training.data import DataError, find_dwis  # noqa: E402

METHODS = ("DRoPE", "DTI fit", "shell mean", "angular shell mean")
REFERENCE = "DTI fit"
ANGLE_BINS = (0.0, 30.0, 40.0, 50.0, 90.01)  # degrees to the nearest remaining direction


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="held-out DWIs: folder or list file")
    parser.add_argument("--checkpoint", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint folder or file")
    parser.add_argument("--fraction", type=float, default=0.1, help="fraction of the weighted volumes left out per fold")
    parser.add_argument("--seed", type=int, default=0, help="seeds the folds")
    parser.add_argument("--out", type=Path, help="write the Markdown tables here as well")
    parser.add_argument("--json", type=Path, help="write the per-volume rows here as JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def folds(n_weighted: int, fraction: float, seed: int) -> list[np.ndarray]:
    """A seeded partition of range(n_weighted) into groups of max(1, round(fraction * n_weighted)) (the last may
    be smaller)."""
    size = max(1, int(round(fraction * n_weighted)))
    order = np.random.default_rng(seed).permutation(n_weighted)
    return [np.sort(order[i : i + size]) for i in range(0, n_weighted, size)]


def nearest_remaining(bvecs: np.ndarray, left: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """(len(left),) degrees from each left-out direction to the nearest remaining one (antipodes alike)."""
    cosine = np.abs(bvecs[left] @ bvecs[rest].T).max(1)
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


def evaluate_scan(dwi, model, slab: int, fraction: float, seed: int) -> tuple[list[dict], dict]:
    """Per left-out volume {dwi, volume, b, angle, mse: {method: value}} and the scan's new-shell check."""
    mask = brain_mask(dwi)
    gtab = dwi.gtab
    target = normalize(dwi.data, gtab, mask)  # (X, Y, Z, N)
    brain = mask & (mean_b0(dwi.data, gtab) > 0)
    weighted = np.flatnonzero(~gtab.b0s_mask)
    rows = []
    for fold in folds(len(weighted), fraction, seed):
        left = weighted[fold]
        rest = np.setdiff1d(np.arange(len(gtab)), left)
        prep = preprocess(dwi.select(rest), mask=mask, patch=model.config.patch_size)
        pred = prep.to_input(synthesize_normalised(model, prep, gtab.bvals[left], gtab.bvecs[left], slab))
        visible = np.ones(target.shape, dtype=bool)
        visible[..., left] = False
        plain = shell_mean_baseline(target, visible, gtab.shell_bvals, brain)
        angular = shell_mean_baseline(target, visible, gtab.shell_bvals, brain, gtab.bvecs)
        tensor = dti_baseline(target, visible, gtab.bvals, gtab.bvecs, brain, angular)
        angles = nearest_remaining(gtab.bvecs, left, rest[~gtab.b0s_mask[rest]])
        for n, v in enumerate(left):
            truth = target[..., v][brain]
            predictions = {"DRoPE": pred[..., n], "DTI fit": tensor[..., v], "shell mean": plain[..., v],
                           "angular shell mean": angular[..., v]}
            rows.append({"dwi": str(dwi.source), "volume": int(v), "b": float(gtab.shell_bvals[v]),
                         "angle": float(angles[n]),
                         "mse": {m: float(((p[brain] - truth) ** 2).mean()) for m, p in predictions.items()}})
    return rows, new_shell_check(dwi, model, slab, mask, brain, target)


def new_shell_check(dwi, model, slab: int, mask, brain, target) -> dict:
    """Every acquired direction requested at twice its b: brain-mean of the synthesised signal / brain-mean of the
    acquired volume, for the model and for the DTI fit of all volumes (the physics: exp(-b D))."""
    gtab = dwi.gtab
    weighted = np.flatnonzero(~gtab.b0s_mask)
    prep = preprocess(dwi, mask=mask, patch=model.config.patch_size)
    pred = prep.to_input(synthesize_normalised(model, prep, 2 * gtab.bvals[weighted], gtab.bvecs[weighted], slab))
    # DTI of all volumes, evaluated at 2b: append the requests as hidden volumes of the tensor baseline
    signal = np.concatenate((target, np.zeros_like(target[..., weighted])), -1)
    visible = np.concatenate((np.ones_like(target, dtype=bool), np.zeros_like(target[..., weighted], dtype=bool)), -1)
    bvals = np.r_[gtab.bvals, 2 * gtab.bvals[weighted]]
    bvecs = np.vstack((gtab.bvecs, gtab.bvecs[weighted]))
    tensor = dti_baseline(signal, visible, bvals, bvecs, brain, signal)[..., len(gtab):]
    acquired = target[..., weighted][brain].mean(0)
    return {"dwi": str(dwi.source), "b": float(gtab.shells.max()),
            "DRoPE": float((pred[brain].mean(0) / acquired).mean()),
            "DTI fit": float((tensor[brain].mean(0) / acquired).mean())}


def scan_label(path: str) -> str:
    """'source/series' for corpus scans (dcm_qa_*/SERIES/dwi.nii.gz), else the DWI's folder name."""
    folder = Path(path).parent
    return f"{folder.parent.name}/{folder.name}" if folder.parent.name.startswith("dcm_qa") else folder.name


def _table(groups: dict[str, list[dict]], title: str) -> str:
    lines = [f"| {title} | left out | " + " | ".join(METHODS) + f" | DRoPE / {REFERENCE} | DRoPE wins |",
             "|---" * (len(METHODS) + 4) + "|"]
    for name, rows in groups.items():
        means = [np.mean([r["mse"][m] for r in rows]) for m in METHODS]
        wins = sum(r["mse"]["DRoPE"] < r["mse"][REFERENCE] for r in rows)
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(f"{v:.5f}" for v in means)
                     + f" | {means[0] / means[1]:.3f} | {wins}/{len(rows)} |")
    return "\n".join(lines)


def report(rows: list[dict], checks: list[dict], fraction: float, seed: int) -> str:
    scans = list(dict.fromkeys(r["dwi"] for r in rows))
    per_scan = {scan_label(s): [r for r in rows if r["dwi"] == s] for s in scans}
    text = [f"{len(scans)} held-out scans; each weighted volume left out once (folds of {fraction:.0%} of them, "
            f"seed {seed}) and synthesised from the rest. MSE of the b0-normalised signal over brain voxels.", "",
            _table(per_scan, "held-out DWI")]
    scan_means = {m: np.mean([np.mean([r["mse"][m] for r in v]) for v in per_scan.values()]) for m in METHODS}
    text.append("| **mean of scans** | | " + " | ".join(f"**{scan_means[m]:.5f}**" for m in METHODS)
                + f" | **{scan_means['DRoPE'] / scan_means[REFERENCE]:.3f}** | |")
    by_b = {f"b={b:g}": [r for r in rows if r["b"] == b] for b in sorted({r["b"] for r in rows})}
    text += ["", "By b-value (every held-out scan is single-shell):", "", _table(by_b, "shell")]
    bins = {}
    for lo, hi in zip(ANGLE_BINS[:-1], ANGLE_BINS[1:]):
        chosen = [r for r in rows if lo <= r["angle"] < hi]
        if chosen:
            bins[f"{lo:g}-{min(hi, 90):g} deg"] = chosen
    text += ["", "By the angle from the left-out direction to its nearest remaining direction:", "",
             _table(bins, "nearest remaining")]
    text += ["", "New shell (each acquired direction requested at 2 x the acquired b): brain-mean synthesised signal "
             "/ brain-mean acquired signal at that direction (physics, via the DTI fit of all volumes: well below 1)",
             "", "| DWI | acquired b | DRoPE | DTI fit |", "|---|---|---|---|"]
    text += [f"| {scan_label(c['dwi'])} | {c['b']:g} | {c['DRoPE']:.3f} | {c['DTI fit']:.3f} |" for c in checks]
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        in_range(args.fraction, "--fraction", 1e-9, 1)
        in_range(args.threads, "--threads", 1)
        for path in (args.out, args.json):
            if path is not None:
                output_file(path, "--out" if path is args.out else "--json")
        paths = find_dwis(args.data)
        torch.set_num_threads(args.threads)
        model = load_model(args.checkpoint).eval()
        slab = resolve_slab(ReconstructSettings(), read_metadata(args.checkpoint), model.config.patch_size[2])
        rows, checks = [], []
        for path in paths:
            started = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DWIWarning)
                dwi = load_dwi(path)
            scan_rows, check = evaluate_scan(dwi, model, slab, args.fraction, args.seed)
            rows += scan_rows
            checks.append(check)
            means = {m: round(float(np.mean([r["mse"][m] for r in scan_rows])), 6) for m in METHODS}
            print(json.dumps({"dwi": str(path), "mse": means, "new_shell": check,
                              "seconds": round(time.perf_counter() - started, 1)}), flush=True)
    except (DWIError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text = report(rows, checks, args.fraction, args.seed)
    print(text)
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    if args.json:
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"rows": rows, "new_shell": checks}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
