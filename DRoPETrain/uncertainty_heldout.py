"""Does the spread over mask draws (``reconstruct --draws K``) say where the reconstruction is wrong?

For each scan: K mask draws with the checkpoint, then, over brain voxels of the diffusion-weighted volumes hidden in
at least two draws, the Pearson and Spearman correlation between ``reconstruction_std`` and the absolute error of
``reconstruction_mean`` against the acquired signal, both divided by the voxel's mean b0 (so that bright voxels do
not correlate the two by their scale alone); and the same for ``fa_std`` against |fa_mean - fa| over brain voxels.
Prints a markdown table; ``--out`` also writes it with the per-scan numbers as JSON:

    .venv/bin/python DRoPETrain/uncertainty_heldout.py --data Resources/model/heldout_list.txt \
        --scans canon_oblique_all20d 12000_DTI_PA-AX_20d dti_tra_dir16_AP_9 dti_tra_dir16_PA_6 2201_DTI --draws 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DRoPE.dti import mean_b0  # noqa: E402
from DRoPE.gradients import DWIWarning  # noqa: E402
from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.reconstruct import ReconstructSettings, run_reconstruction  # noqa: E402
from DRoPE.resources import DEFAULT_WEIGHTS  # noqa: E402


def read_list(path: Path) -> list[Path]:
    """Scan paths of a list file (one per line, '#' comments, relative to the file's folder)."""
    lines = [line.strip() for line in path.read_text().splitlines()]
    return [(path.parent / line).resolve() for line in lines if line and not line.startswith("#")]


def correlations(std: np.ndarray, error: np.ndarray) -> dict:
    """Pearson and Spearman r of two (n,) arrays, and n."""
    return {"pearson": float(pearsonr(std, error)[0]), "spearman": float(spearmanr(std, error)[0]), "n": int(std.size)}


def scan_correlations(path: Path, weights, draws: int, seed: int) -> dict:
    """Run ``draws`` mask draws on ``path`` and correlate the spreads with the errors (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        dwi = load_dwi(path)
    started = time.perf_counter()
    result = run_reconstruction(dwi, weights, ReconstructSettings(seed=seed, draws=draws))
    maps, mask = result.maps, result.mask
    b0 = mean_b0(dwi.data, dwi.gtab)
    weighted = ~dwi.gtab.b0s_mask
    scored = (mask & (b0 > 0))[..., None] & weighted & (maps["reconstruction_std"] > 0)
    scale = np.where(b0 > 0, b0, 1.0)[..., None]
    std = (maps["reconstruction_std"] / scale)[scored]
    error = (np.abs(maps["reconstruction_mean"] - dwi.data) / scale)[scored]
    row = {"scan": str(path), "draws": draws, "seconds": round(time.perf_counter() - started, 1),
           "signal": correlations(std, error)}
    if "fa_std" in maps:
        brain = result.mask & (maps["fa"] > 0)
        row["fa"] = correlations(maps["fa_std"][brain], np.abs(maps["fa_mean"] - maps["fa"])[brain])
    return row


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="list file of held-out scans (heldout_list.txt)")
    parser.add_argument("--scans", nargs="*", default=None, help="keep only the scans whose path holds one of these")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint (default: the bundled model)")
    parser.add_argument("--draws", type=int, default=8, help="mask draws per scan (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first draw")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table and numbers as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    scans = [p for p in read_list(args.data) if not args.scans or any(key in str(p) for key in args.scans)]
    if not scans or args.draws < 2:
        print(f"error: --data {args.data} / --scans select no scan, or --draws {args.draws} < 2", file=sys.stderr)
        return 2
    print("| scan | voxels | signal std vs error: Pearson | Spearman | FA std vs error: Pearson | Spearman | s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    rows = []
    for path in scans:
        row = scan_correlations(path, args.weights, args.draws, args.seed)
        rows.append(row)
        fa = row.get("fa", {"pearson": float("nan"), "spearman": float("nan")})
        print(f"| {path.parent.name} | {row['signal']['n']} | {row['signal']['pearson']:.3f} | "
              f"{row['signal']['spearman']:.3f} | {fa['pearson']:.3f} | {fa['spearman']:.3f} | {row['seconds']} |",
              flush=True)
    for key in ("signal", "fa"):
        values = [[r[key]["pearson"], r[key]["spearman"]] for r in rows if key in r]
        print(f"{key}: median Pearson {np.median([v[0] for v in values]):.3f}, "
              f"median Spearman {np.median([v[1] for v in values]):.3f} over {len(values)} scans")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
