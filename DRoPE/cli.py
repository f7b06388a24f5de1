"""Command line: ``python -m DRoPE info DWI`` and ``python -m DRoPE dti DWI --out DIR``.

Each subcommand is a small ``_add_<name>(subparsers)`` function listed in ``COMMANDS``; it registers its flags
and a ``_cmd_<name>(args)`` handler that unpacks the flags into plain values for a ``run_<name>`` function.
Errors in the input (DWIError) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from .arguments import in_range, input_file, model_checkpoint, output_folder, scan_flags
from .atomic import atomic_folder, full_suffix
from .dti import DTIModel, mean_b0
from .dwi import DWI
from .gradcheck import check_gradients, check_summary, world_fix
from .gradients import DWIError, DWIWarning
from .io import describe, input_files, load_dwi, refuse_inputs, save_scalar_nifti
from .overview import save_overview
from .preprocess import brain_mask
from .resources import DEFAULT_WEIGHTS

EXIT_INPUT_ERROR = 2
EXIT_CANCELLED = 143  # 128 + SIGTERM, as a shell reports a terminated process
DTI_OUTPUTS = ("fa.nii.gz", "md.nii.gz", "mask.nii.gz", "v1.nii.gz", "overview.png")
GRID_ATOL = 1e-3  # mm: a mask's affine must match the DWI's on-disk affine to this tolerance


# --- shared helpers -----------------------------------------------------------------------------------------------


def _add_input(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dwi", type=Path, help="DWI image: .nii/.nii.gz (+ .bval/.bvec beside it) or Slicer DWI .nrrd")
    parser.add_argument("--bval", type=Path, help="FSL b-value file (s/mm^2); default: beside the image")
    parser.add_argument("--bvec", type=Path, help="FSL b-vector file (3 x N, image frame); default: beside the image")


def _read_dwi(path: Path, bval: Path | None, bvec: Path | None) -> DWI:
    """load_dwi without printing its warnings (they are kept in ``dwi.warnings`` and reported by the commands)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return load_dwi(path, bval=bval, bvec=bvec)


def read_mask(path: Path, dwi: DWI) -> np.ndarray:
    """A NIfTI mask on the DWI's on-disk grid -> (X, Y, Z) bool on the canonical grid, True = nonzero voxel."""
    if full_suffix(path).lower() not in (".nii", ".nii.gz"):
        raise DWIError(f"{path}: the mask must be a NIfTI file (.nii or .nii.gz)")
    try:
        image = nib.load(path)
        values = np.asarray(image.dataobj)
    except (OSError, EOFError, ValueError, nib.filebasedimages.ImageFileError) as exc:
        raise DWIError(f"{path}: cannot read the mask: {exc}") from exc
    if values.ndim == 4 and values.shape[3] == 1:
        values = values[..., 0]
    if values.shape != dwi.grid.shape or not np.allclose(image.affine, dwi.grid.affine, atol=GRID_ATOL):
        raise DWIError(
            f"{path}: the mask grid ({'x'.join(map(str, values.shape))}) does not match the DWI grid "
            f"({'x'.join(map(str, dwi.grid.shape))}, same affine required); resample the mask onto {dwi.source}"
        )
    return np.asarray(dwi.grid.to_canonical(values != 0), dtype=bool)


# --- info ---------------------------------------------------------------------------------------------------------


def run_info(path: Path, bval: Path | None = None, bvec: Path | None = None) -> str:
    """Summary text of a DWI: shape, voxel size, orientation, shells with counts, b0 count, warnings, and the
    gradient-table check (a warning line when the data favour another table; nothing is changed)."""
    dwi = _read_dwi(path, bval, bvec)
    record, warning = check_summary(dwi)
    check = f"warning: {warning}" if warning else f"gradient check: {record.get('message') or record['skipped']}"
    return describe(dwi) + "\n" + check


def _cmd_info(args: argparse.Namespace) -> int:
    print(run_info(args.dwi, args.bval, args.bvec))
    return 0


def _add_info(subparsers) -> None:
    parser = subparsers.add_parser(
        "info", help="describe a DWI (geometry, protocol, warnings, gradient-table check from the data)"
    )
    _add_input(parser)
    parser.set_defaults(handler=_cmd_info)


# --- check-gradients ----------------------------------------------------------------------------------------------


def _cmd_check_gradients(args: argparse.Namespace) -> int:
    def work(report):
        input_file(args.mask, "--mask")
        report(0.0, "brain mask and tensor fit")
        dwi = _read_dwi(args.dwi, args.bval, args.bvec)
        result = check_gradients(dwi, read_mask(Path(args.mask), dwi) if args.mask else None)
        return {"file": str(args.dwi)} | result.to_json() | {
            "message": result.message(), "world_matrix": np.round(world_fix(dwi, result.best), 6).tolist()}, result

    if args.progress == "json":
        return engine_command(args, lambda report: {"result": work(report)[0]})
    record, result = work(lambda fraction, message: None)
    if args.json:
        print(json.dumps(record))
        return 0
    print(result.message())
    for candidate, score in list(zip(result.candidates, result.scores))[:5]:
        print(f"  {score:.4f}  {candidate.describe()}  permutation={list(candidate.permutation)} "
              f"flip={list(candidate.flip)}")
    return 0


def _add_check_gradients(subparsers) -> None:
    parser = subparsers.add_parser(
        "check-gradients",
        help="check the b-vector signs and axis order against the data (fibre coherence of the tensor directions)",
        description="Fit DTI once and score every sign flip / axis order of the b-vectors (in the image frame: the "
        "FSL .bvec axes) by how coherent the principal directions are with their neighbours. --json prints "
        '{"given_is_best", "best": {"permutation", "flip", ...}, "margin", "world_matrix", ...} where the best table '
        "is bvecs_fixed[a] = (-1 if flip[a] else 1) * bvecs_given[permutation[a]] (world_matrix: the same fix for "
        "world RAS gradients, fixed = W @ given). Exit code 0 whatever the verdict.",
    )
    _add_input(parser)
    parser.add_argument("--mask", type=Path, help="brain mask (.nii/.nii.gz) on the DWI's grid; default: a quick "
                        "median_otsu mask")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    add_progress(parser, ("none", "json"), "none")
    parser.set_defaults(handler=_cmd_check_gradients)


# --- dti ----------------------------------------------------------------------------------------------------------


def run_dti(
    path: Path,
    out_dir: Path,
    bval: Path | None = None,
    bvec: Path | None = None,
    mask_path: Path | None = None,
    *,
    progress: bool = True,
) -> list[Path]:
    """Fit DTI and write fa, md, mask, v1 (.nii.gz, on the input's own grid and affine) and overview.png.

    md is in mm^2/s; mask is the fitted voxels (brain mask with mean b0 > 0); v1 is (X, Y, Z, 3) with the principal
    eigenvector's world RAS x, y, z components. Returns the written paths.
    """
    out_dir = Path(out_dir)
    targets = [out_dir / name for name in DTI_OUTPUTS]
    with tqdm(total=4, desc="dti", unit="step", delay=2.0, disable=not progress) as steps:  # closed on errors too
        steps.set_postfix_str("reading", refresh=False)
        dwi = _read_dwi(path, bval, bvec)
        protected = [Path(p) for p in input_files(dwi)] + ([Path(mask_path)] if mask_path else [])
        refuse_inputs(targets, protected, dwi.source)
        for message in dwi.warnings:
            tqdm.write(f"warning: {message}", file=sys.stderr)
        steps.update()
        steps.set_postfix_str("brain mask", refresh=False)
        mask = read_mask(Path(mask_path), dwi) if mask_path else brain_mask(dwi)
        steps.update()
        steps.set_postfix_str("tensor fit", refresh=False)
        fit = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=progress)
        steps.update()
        steps.set_postfix_str("writing", refresh=False)
        v1_world = (fit.v1 @ dwi.rotation.T) * fit.mask[..., None]
        maps = {"fa": fit.fa, "md": fit.md, "mask": fit.mask, "v1": v1_world}
        title = f"{Path(dwi.source).name}: {dwi.gtab.describe()}"
        try:
            with atomic_folder(out_dir, last=DTI_OUTPUTS[-1]) as stage:  # all files appear together
                for name, array in maps.items():
                    save_scalar_nifti(dwi.to_input_grid(array), dwi.grid.affine, stage / f"{name}.nii.gz")
                save_overview(stage / targets[-1].name, mean_b0(dwi.data, dwi.gtab), fit.fa, fit.md, v1_world,
                              dwi.voxel_size, mask=fit.mask, title=title)
        except OSError as exc:
            raise DWIError(f"{out_dir}: cannot write the outputs ({exc.strerror or exc})") from None
        steps.update()
    return targets


def _cmd_dti(args: argparse.Namespace) -> int:
    output_folder(args.out, "--out")
    input_file(args.mask, "--mask")
    for written in run_dti(args.dwi, args.out, args.bval, args.bvec, args.mask, progress=not args.quiet):
        print(written)
    return 0


def _add_dti(subparsers) -> None:
    parser = subparsers.add_parser(
        "dti", help="fit DTI; write FA, MD (mm^2/s), mask, V1 (world RAS) and overview.png on the input grid"
    )
    _add_input(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument(
        "--mask", type=Path, help="brain mask (.nii/.nii.gz) on the DWI's grid; default: median_otsu on the mean b0"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=_cmd_dti)


# --- reconstruct ----------------------------------------------------------------------------------------------


class Cancelled(Exception):
    """The run was stopped by SIGTERM / SIGINT."""


def _raise_cancelled(signum, frame):
    raise Cancelled(f"stopped by signal {signum}")


def _progress_reporter(mode: str, desc: str):
    """progress(fraction, message) callback: JSON lines on stdout (``--progress json``) or a tqdm bar."""
    if mode == "json":
        def report(fraction: float, message: str) -> None:
            print(json.dumps({"event": "progress", "fraction": round(fraction, 4), "message": message}), flush=True)
        return report, None
    bar = tqdm(total=100, desc=desc, unit="%", delay=1.0, disable=mode == "none")

    def report(fraction: float, message: str) -> None:
        bar.set_postfix_str(message, refresh=False)  # shown by the update, once the bar's delay has passed
        bar.update(max(0, round(100 * fraction) - bar.n))
    return report, bar


def engine_command(args: argparse.Namespace, work) -> int:
    """Run ``work(report)`` as the Slicer module's engine: SIGTERM / SIGINT cancel it (exit 143), bad input gives
    one line (exit 2). ``work`` returns the fields of the final ``done`` event (``--progress json``); otherwise
    their ``"lines"`` are printed. Progress is a bar, JSON lines or nothing (``--progress``)."""
    from .model.checkpoint import CheckpointError
    from .probes import ProbeError

    report, bar = _progress_reporter(args.progress, args.command)
    previous = {sig: signal.signal(sig, _raise_cancelled) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        payload = work(report)
    except Cancelled as exc:
        _emit(args, "cancelled", str(exc))
        return EXIT_CANCELLED
    except (DWIError, CheckpointError, ProbeError, ValueError) as exc:
        _emit(args, "error", str(exc))
        return EXIT_INPUT_ERROR
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if bar is not None:  # an error message then starts on a line of its own
            bar.close()
    lines = payload.pop("lines", [])
    if args.progress == "json":
        print(json.dumps({"event": "done"} | payload), flush=True)
    else:
        print("\n".join(map(str, lines)))
    return 0


def _emit(args: argparse.Namespace, event: str, message: str) -> None:
    if args.progress == "json":
        print(json.dumps({"event": event, "message": message}), flush=True)
    print(f"{event}: {message}", file=sys.stderr)


def add_progress(parser: argparse.ArgumentParser, choices=("bar", "json", "none"), default: str = "bar") -> None:
    parser.add_argument("--progress", choices=choices, default=default,
                        help="progress as a bar on stderr, JSON lines on stdout (for the Slicer module), or none")


def run_reconstruct(args: argparse.Namespace, report) -> list[Path]:
    """Load, reconstruct and write every output of ``python -m DRoPE reconstruct`` (see its --help)."""
    from .device import select_device
    from .reconstruct import ReconstructSettings, output_paths, run_reconstruction, write_outputs

    _check_reconstruct_args(args)
    report(0.0, "reading the DWI")
    dwi = _read_dwi(args.dwi, args.bval, args.bvec)
    refuse_inputs(output_paths(args.out), input_files(dwi), dwi.source)
    settings = ReconstructSettings(mask_ratio=args.mask_ratio, volumes=args.volumes, seed=args.seed, slab=args.slab,
                                   draws=args.draws)
    result = run_reconstruction(dwi, args.weights, settings, select_device(args.device), report)
    report(0.97, "writing outputs")
    written = write_outputs(result, args.out, probe_path=args.probe)
    report(1.0, "done")
    return written


def _check_reconstruct_args(args: argparse.Namespace) -> None:
    """The ``reconstruct`` flags that can be checked before the DWI is read (the probe and model.json are small:
    read them now)."""
    from .probes import load_probe

    output_folder(args.out, "--out")
    in_range(args.mask_ratio, "--mask-ratio", 0, 1)
    in_range(args.draws, "--draws", 1)
    scan_flags(args)
    if args.probe is not None:
        load_probe(args.probe)
    model_checkpoint(args.weights, "--weights")


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    return engine_command(args, lambda report: {"out": str(args.out), "lines": run_reconstruct(args, report)})


def _add_reconstruct(subparsers) -> None:
    parser = subparsers.add_parser(
        "reconstruct",
        help="mask and reconstruct a DWI with the D-RoPE model; write reconstruction, FA/MD errors, attention, latent",
    )
    _add_input(parser)
    parser.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint folder or .safetensors "
                        "(default: the bundled model in Resources/model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu or cuda")
    parser.add_argument("--mask-ratio", type=float, default=0.75,
                        help="fraction of the patches of every volume hidden from the encoder (default 0.75)")
    parser.add_argument("--volumes", type=int, default=None,
                        help="give the model N random volumes (seeded, at least one b0); default: all")
    parser.add_argument("--seed", type=int, default=0, help="seed of the volume subset and the patch mask")
    parser.add_argument("--slab", type=int, default=None,
                        help="slices per inference slab (default: the checkpoint's training slab)")
    parser.add_argument("--draws", type=int, default=1,
                        help="independent patch-mask draws (default 1); K > 1 also writes reconstruction_mean/_std and "
                        "fa_mean/_std: the spread of the prediction over the draws that hid each voxel, and of FA")
    parser.add_argument("--probe", type=Path, default=None, help="fitted linear probe (JSON) to apply to the latent")
    add_progress(parser)
    parser.set_defaults(handler=_cmd_reconstruct)


# --- synthesize ---------------------------------------------------------------------------------------------------


def run_synthesize(args: argparse.Namespace, report) -> list[Path]:
    """Read the DWI and the request, synthesise and write ``python -m DRoPE synthesize`` (see its --help)."""
    from .device import select_device
    from .synthesis import check_outputs, read_request, run_synthesis, write_synthesis

    output_folder(args.out, "--out")
    input_file(args.bvals, "--bvals")
    input_file(args.bvecs, "--bvecs")
    in_range(args.slab, "--slab", 1)
    in_range(args.chunk, "--chunk", 1)
    model_checkpoint(args.weights, "--weights")
    report(0.0, "reading the DWI")
    dwi = _read_dwi(args.dwi, args.bval, args.bvec)
    request = read_request(args.bvals, args.bvecs, dwi)
    check_outputs(args.out, dwi, protect=(args.bvals, args.bvecs))
    result = run_synthesis(dwi, request, args.weights, select_device(args.device), slab=args.slab, chunk=args.chunk,
                           progress=report)
    for note in result.summary["warnings"]:
        print(f"warning: {note}", file=sys.stderr)
    report(0.97, "writing outputs")
    return write_synthesis(result, args.out, protect=(args.bvals, args.bvecs))


def _cmd_synthesize(args: argparse.Namespace) -> int:
    return engine_command(args, lambda report: {"out": str(args.out), "lines": run_synthesize(args, report)})


def _add_synthesize(subparsers) -> None:
    parser = subparsers.add_parser(
        "synthesize",
        help="predict DWI volumes at b-values / directions that were not acquired, from all acquired volumes",
    )
    _add_input(parser)
    parser.add_argument("--bvals", type=Path, required=True,
                        help="FSL .bval of the volumes to synthesise (s/mm^2; b0 rows get the mean acquired b0)")
    parser.add_argument("--bvecs", type=Path, required=True,
                        help="FSL .bvec of the volumes to synthesise (3 x K, in the input image's frame, like its own)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output folder: synthesized.nii.gz + .bval/.bvec on the input grid, summary.json")
    parser.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="checkpoint folder or .safetensors "
                        "(default: the bundled model in Resources/model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu or cuda")
    parser.add_argument("--slab", type=int, default=None,
                        help="slices per inference slab (default: the checkpoint's training slab)")
    parser.add_argument("--chunk", type=int, default=1,
                        help="requested volumes decoded together (default 1: each independent of the others)")
    add_progress(parser)
    parser.set_defaults(handler=_cmd_synthesize)


# --- entry point --------------------------------------------------------------------------------------------------

COMMANDS = (_add_info, _add_check_gradients, _add_dti, _add_reconstruct, _add_synthesize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m DRoPE", description="DRoPE: diffusion MRI tools (DWI summary, DTI maps)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. Returns the exit status: 0 ok, 2 invalid input (message on stderr)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return args.handler(args)
    except DWIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT_ERROR
