"""A stand-in for ``python -m DRoPE reconstruct ... --progress json`` used by the module tests.

Same command line and stdout protocol as the real engine, no model. The behaviour is chosen with the
environment variable FAKE_ENGINE_MODE:

- ``ok`` (default): progress lines mixed with plain log lines and one malformed line, then writes every output
  of the real engine into --out on the input's grid (read and written with ``DRoPE.io``), then ``done``. The
  "reconstruction" is volume v of the input times 1 + v / 100.
- ``error``: one progress line, then ``{"event": "error", ...}`` and exit code 2 (bad input).
- ``crash``: one progress line, then an uncaught exception (traceback on stderr, exit code 1).
- ``nodone``: progress lines and exit code 0 without a ``done`` event.
- ``slow``: progress lines every 50 ms until SIGTERM; on SIGTERM writes ``<out>/terminated`` and exits 143.
- ``stubborn``: like ``slow`` but ignores SIGTERM (only SIGKILL stops it).

In ``slow`` and ``stubborn`` the engine's process id is written to ``<out>/engine.pid``. With ``--draws K`` (K > 1),
``ok`` also writes ``reconstruction_std.nii.gz`` and ``fa_std.nii.gz``; ``summary.json`` carries a ``warnings`` list.

The arguments received are written to ``<out>/argv.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np


def emit(**event) -> None:
    print(json.dumps(event), flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fake_engine")
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("reconstruct")
    rec.add_argument("dwi", type=Path)
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--weights", type=Path)
    rec.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    rec.add_argument("--mask-ratio", type=float, default=0.75)
    rec.add_argument("--volumes", type=int)
    rec.add_argument("--seed", type=int)
    rec.add_argument("--probe", type=Path)
    rec.add_argument("--draws", type=int, default=1)
    rec.add_argument("--progress", choices=("json", "bar", "none"), default="bar")
    return parser


def write_outputs(args) -> None:
    """Every output file of the real engine, with simple but checkable content, on the input's grid."""
    from DRoPE.io import input_files, load_dwi, save_nifti, save_scalar_nifti

    dwi = load_dwi(args.dwi)
    protect = input_files(dwi)
    scale = 1.0 + np.arange(dwi.n_volumes, dtype=np.float32) / 100.0  # volume v: the input times 1 + v / 100
    save_nifti(dataclasses.replace(dwi, data=dwi.data * scale), args.out / "reconstruction.nii.gz")
    b0 = dwi.data[..., dwi.gtab.b0s_mask].mean(axis=-1)
    fa = np.clip(b0 / max(float(b0.max()), 1e-6), 0.0, 1.0).astype(np.float32)  # a map in [0, 1]
    md = (fa * 2e-3).astype(np.float32)
    fa_recon = np.clip(fa * 0.9, 0.0, 1.0)
    maps = {
        "fa": fa, "md": md, "fa_recon": fa_recon, "md_recon": md * 1.1,
        "fa_error": np.abs(fa - fa_recon), "md_error": np.abs(md * 0.1),
        "attention": fa ** 2 + 0.01,  # like the real engine's, non-zero everywhere, air included
    }
    if args.draws > 1:
        maps["fa_std"] = fa * 0.05
        recon_std = np.abs(dwi.data).astype(np.float32) * 0.01
        save_scalar_nifti(dwi.to_input_grid(recon_std), dwi.grid.affine, args.out / "reconstruction_std.nii.gz",
                          protect=protect)
    for name, array in maps.items():
        save_scalar_nifti(dwi.to_input_grid(array), dwi.grid.affine, args.out / f"{name}.nii.gz", protect=protect)
    # the (V, V) query x key matrix, in the real engine's layout; row q gives key k the weight (q + k + 1) / sum
    labels = [f"v{i}_b{b:g}" for i, b in enumerate(dwi.gtab.shell_bvals)]
    grid = np.add.outer(np.arange(dwi.n_volumes), np.arange(dwi.n_volumes)) + 1.0
    matrix = grid / grid.sum(axis=1, keepdims=True)
    rows = ["query\\key," + ",".join(labels)]
    rows += [label + "," + ",".join(f"{w:.6g}" for w in row) for label, row in zip(labels, matrix)]
    (args.out / "diffusion_attention.csv").write_text("\n".join(rows) + "\n")
    np.save(args.out / "latent.npy", np.arange(16, dtype=np.float32) / 4.0)
    if args.probe is not None:
        (args.out / "prediction.json").write_text(json.dumps({"label": "control", "probability": 0.8125}))
    summary = {"input": str(args.dwi), "device": "cpu", "seconds": 1.5,
               "metrics": {"mse_normalised_masked": 0.0125, "fa_mae": 0.0625, "md_mae_mm2_per_s": 1.25e-4},
               "warnings": [f"{args.dwi.name}: single-shell acquisition (fake)"]}
    (args.out / "summary.json").write_text(json.dumps(summary))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.progress != "json":
        print("fake_engine: the module must pass --progress json", file=sys.stderr)
        return 2
    mode = os.environ.get("FAKE_ENGINE_MODE", "ok")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "argv.json").write_text(json.dumps(sys.argv[1:] if argv is None else list(argv)))

    if mode in ("slow", "stubborn"):
        def stop(signum, frame):
            (args.out / "terminated").write_text("SIGTERM")
            sys.exit(143)

        signal.signal(signal.SIGTERM, stop if mode == "slow" else signal.SIG_IGN)
        pid_file = args.out / "engine.pid"
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").replace(pid_file)  # atomic: a test polling for the file never reads it empty
        emit(event="progress", fraction=0.0, message="waiting")
        for step in range(1200):
            time.sleep(0.05)
            emit(event="progress", fraction=min(step / 1200, 1.0), message=f"step {step}")
        return 0

    emit(event="progress", fraction=0.0, message="loading the DWI")
    if mode == "error":
        emit(event="error", message=f"{args.dwi}: no b0 volume (b < 50 s/mm^2); the signal cannot be normalised")
        return 2
    if mode == "crash":
        raise RuntimeError("CUDA out of memory (fake)")
    print("fake_engine: plain log line, not JSON", flush=True)
    print('{"event": "progress", "fraction": "half"}', flush=True)  # malformed: must be ignored
    emit(event="progress", fraction=0.5, message="reconstructing")
    if mode == "nodone":
        return 0
    if mode != "ok":
        print(f"fake_engine: unknown FAKE_ENGINE_MODE {mode!r}", file=sys.stderr)
        return 2
    write_outputs(args)
    emit(event="progress", fraction=1.0, message="writing outputs")
    emit(event="done", out=str(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
