"""Validate the gradient-table check (``python -m DRoPE check-gradients``) on real scans.

For every DWI under ``--data`` (``dwi.nii.gz`` with its bval/bvec, and Slicer DWI ``.nrrd`` files) it checks the given
table, then crafts six wrong tables from it (each single-axis flip and each axis swap of the ``.bvec`` rows), writes
each to a temporary ``.bvec``, reads the scan again with it and checks whether the check names the fix that undoes
the error. Scans with a known error in their table (``KNOWN_ERRORS``) count as correct when the check finds that
error, and their crafted errors are scored against the corrected table. Prints a markdown table and the totals:

    .venv/bin/python DRoPETrain/gradcheck_validate.py --data ../shared/data [--out gradcheck.md]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from DRoPE.dti import DTIModel  # noqa: E402
from DRoPE.gradcheck import (  # noqa: E402
    MASK_SETTINGS,
    TableCandidate,
    candidate_tables,
    check_gradients,
    image_to_canonical,
    same_tensor,
)
from DRoPE.gradients import DWIWarning  # noqa: E402
from DRoPE.io import load_dwi  # noqa: E402
from DRoPE.preprocess import brain_mask  # noqa: E402

IDENTITY = TableCandidate((0, 1, 2), (False, False, False))
CRAFTED = {
    "flip x": TableCandidate((0, 1, 2), (True, False, False)),
    "flip y": TableCandidate((0, 1, 2), (False, True, False)),
    "flip z": TableCandidate((0, 1, 2), (False, False, True)),
    "swap x,y": TableCandidate((1, 0, 2), (False, False, False)),
    "swap x,z": TableCandidate((2, 1, 0), (False, False, False)),
    "swap y,z": TableCandidate((0, 2, 1), (False, False, False)),
}
# given table = error @ true table, established without the check (``--twins``, ``twin_agreement``): world-space V1
# (FA > 0.3) compared with the axial PA series of the same Canon session (canon_ortho_same_session), for each of the
# 24 tables, median |cos|:
# 10000_DTI_AP-ortho (the source README's AP y-sign problem): flip z 0.95 (given 0.60, flip y alone 0.69);
# the three sagittal (PSR) series: flip x, the A-P image axis, 0.72 / 0.78 / 0.84 (given 0.52 for 37000), the best
# of the 24 each time.
KNOWN_ERRORS = {
    "dcm_qa_canon/10000_DTI_AP-ortho": CRAFTED["flip z"],
    "dcm_qa_canon/37000_SAG_DTI_PA-ortho": CRAFTED["flip x"],
    "dcm_qa_canon/38000_SAG_DTI_PA-COR_20d": CRAFTED["flip x"],
    "dcm_qa_canon/39000_SAG_DTI_PA-ALL_20d": CRAFTED["flip x"],
}


def find_scans(data: Path) -> list[Path]:
    """Every dwi.nii.gz under ``data`` and every Slicer DWI .nrrd, sorted."""
    return sorted([*data.rglob("dwi.nii.gz"), *data.rglob("*.nrrd")])


def known_error(path: Path) -> TableCandidate:
    return next((e for key, e in KNOWN_ERRORS.items() if key in path.as_posix()), IDENTITY)


def _load(path: Path, bvec: Path | None = None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(path, bvec=bvec)


def validate_scan(path: Path, crafted: dict[str, TableCandidate] = CRAFTED) -> dict:
    """Check the given table of ``path`` and, for NIfTI inputs, each crafted error; returns one result row.

    Row: {"scan", "voxels", "seconds", "given_ok", "best", "margin", "lead", "crafted": {name: bool}}; given_ok is
    True when the best table undoes the scan's known error (none for most scans).
    """
    path = Path(path)
    error = known_error(path).matrix
    dwi = _load(path)
    started = time.perf_counter()
    result = check_gradients(dwi)
    seconds = time.perf_counter() - started
    row = {
        "scan": path, "voxels": result.voxels, "seconds": seconds, "best": result.best.describe(),
        "given_ok": same_tensor(result.best.matrix, error.T), "margin": result.margin, "lead": result.lead,
        "crafted": {},
    }
    if not path.name.endswith(".nii.gz"):
        return row
    mask = brain_mask(dwi, **MASK_SETTINGS)  # the same for every table: computed once
    given = np.loadtxt(str(path)[: -len(".nii.gz")] + ".bvec", ndmin=2)  # (3, N), image frame
    with tempfile.TemporaryDirectory() as tmp:
        for name, wrong in crafted.items():
            bvec = Path(tmp) / f"{name.replace(' ', '_').replace(',', '')}.bvec"
            np.savetxt(bvec, wrong.matrix @ given, fmt="%.6f")
            best = check_gradients(_load(path, bvec), mask).best
            row["crafted"][name] = same_tensor(best.matrix, error.T @ wrong.matrix.T)  # undoes wrong, then error
    return row


def twin_agreement(path: Path, reference: Path) -> list[tuple[float, str]]:
    """Median |cos| between world-space V1 of ``reference`` (FA > 0.3) and V1 of ``path`` at the nearest voxel (FA > 0.3
    there too) when ``path`` is fitted with each of the 24 tables; best first. Independent of the coherence score:
    a check of a table against another series of the same head."""
    ref, scan = _load(reference), _load(path)
    ref_fit = DTIModel(ref.gtab).fit(ref.data, brain_mask(ref, **MASK_SETTINGS), progress=False)
    seeds = np.argwhere(ref_fit.fa > 0.3)
    world = seeds @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    ijk = np.round((world - scan.affine[:3, 3]) @ np.linalg.inv(scan.affine[:3, :3]).T).astype(int)
    inside = np.all((ijk >= 0) & (ijk < scan.shape), axis=1)
    seeds, ijk = tuple(seeds[inside].T), tuple(ijk[inside].T)
    mask, to_canonical = brain_mask(scan, **MASK_SETTINGS), image_to_canonical(scan)
    agreement = []
    for candidate in candidate_tables():
        table = scan.gtab.transformed(to_canonical @ candidate.matrix @ to_canonical.T)
        fit = DTIModel(table).fit(scan.data, mask, progress=False)
        both = fit.fa[ijk] > 0.3
        cos = np.sum((ref_fit.v1[seeds][both] @ ref.rotation.T) * (fit.v1[ijk][both] @ scan.rotation.T), axis=1)
        agreement.append((float(np.median(np.abs(cos))), candidate.describe()))
    return sorted(agreement, reverse=True)


def format_row(row: dict, data: Path) -> str:
    crafted = row["crafted"]
    right = f"{sum(crafted.values())}/{len(crafted)}" if crafted else "-"
    missed = ", ".join(name for name, ok in crafted.items() if not ok)
    return (f"| {row['scan'].relative_to(data)} | {row['voxels']} | {'yes' if row['given_ok'] else 'NO'} "
            f"| {row['best']} | {row['margin']:.3f} | {row['lead']:.3f} | {right}{' (missed ' + missed + ')' if missed else ''} "
            f"| {row['seconds']:.1f} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder searched for dwi.nii.gz and .nrrd scans")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument("--twins", action="store_true", help="instead: for each scan of KNOWN_ERRORS, the V1 agreement "
                        "with canon_ortho_same_session under each table (how the known errors were established)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.twins:
        for key in KNOWN_ERRORS:
            ranked = twin_agreement(args.data / "corpus" / key / "dwi.nii.gz",
                                    args.data / "canon_ortho_same_session" / "dwi.nii.gz")
            given = next(score for score, fix in ranked if fix == "none")
            print(f"{key}: " + ", ".join(f"{fix} {score:.3f}" for score, fix in ranked[:3]) + f"; given {given:.3f}")
        return 0
    scans = find_scans(args.data)
    if not scans:
        print(f"error: --data {args.data}: no dwi.nii.gz or .nrrd scan found", file=sys.stderr)
        return 2
    lines = ["| scan | voxels FA>0.3 | right table wins | best fix | margin | lead | crafted errors fixed | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines), flush=True)
    rows = []
    for path in scans:
        rows.append(validate_scan(path))
        lines.append(format_row(rows[-1], args.data))
        print(lines[-1], flush=True)
    crafted = [ok for row in rows for ok in row["crafted"].values()]
    seconds = np.array([row["seconds"] for row in rows])
    total = (f"\n{len(rows)} scans: the right table wins on {sum(r['given_ok'] for r in rows)}/{len(rows)}; crafted "
             f"errors fixed {sum(crafted)}/{len(crafted)} ({100 * np.mean(crafted):.1f}%); seconds per check median "
             f"{np.median(seconds):.1f}, max {seconds.max():.1f}")
    print(total)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n" + total + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
