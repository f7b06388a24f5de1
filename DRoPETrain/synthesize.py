"""Protocol-augmented synthetic variants of real DWIs, for pretraining.

For each input DWI, a DTI fit (``DRoPE.phantom``) is re-sampled on a few acquisition protocols that the real data
lack (other b-values, multi-shell, other direction sets), with Rician noise, and written as NIfTI + bval/bvec:

    python DRoPETrain/synthesize.py --data LIST_OR_FOLDER --out DIR [--seed 0] [--snr 30]

Outputs: DIR/<subject>_<protocol>/dwi.nii.gz (+ .bval/.bvec), ready for ``train.py --data DIR``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DRoPE.gradients import DWIError, DWIWarning  # noqa: E402
from DRoPE.io import load_dwi, save_nifti  # noqa: E402
from DRoPE.phantom import make_gtab, phantom_from_dwi  # noqa: E402
from DRoPE.preprocess import brain_mask  # noqa: E402
from DRoPE.training.data import DataError, find_dwis  # noqa: E402

# name -> (shells {b: directions}, b0 count): protocols unlike the shared scans (single shell b=1000-2500)
PROTOCOLS = {
    "ms1000-2000": ({1000: 30, 2000: 30}, 3),
    "ms500-1500-3000": ({500: 12, 1500: 20, 3000: 24}, 2),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder of DWIs or a text file listing them")
    parser.add_argument("--out", type=Path, required=True, help="output folder (one sub-folder per variant)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the direction sets and the noise")
    parser.add_argument("--snr", type=float, default=30.0, help="SNR of the Rician noise (median S0 / sigma)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = find_dwis(args.data)
    except (DWIError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for n, path in enumerate(paths):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWIWarning)
            dwi = load_dwi(path)
        mask = brain_mask(dwi)
        subject = path.parent.name if path.name.startswith("dwi.") else path.name.split(".")[0]
        for k, (name, (shells, n_b0)) in enumerate(PROTOCOLS.items()):
            seed = args.seed * 1000 + n * 10 + k
            phantom = phantom_from_dwi(dwi, make_gtab(shells, n_b0, seed=seed), snr=args.snr, seed=seed, mask=mask)
            folder = args.out / f"{subject}_{name}"
            folder.mkdir(parents=True, exist_ok=True)
            save_nifti(phantom, folder / "dwi.nii.gz")
            print(f"{folder}: {phantom.gtab.describe()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
