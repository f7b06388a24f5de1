"""Evaluate masked-autoencoder reconstructions on held-out DWIs (paper Tables 1 and 2).

    python DRoPETrain/evaluate.py --checkpoint RUN/ --data DWI_FOLDER --out EVAL_DIR [--volumes 90] [--mask-ratio 0.75]
    python DRoPETrain/evaluate.py --checkpoint A/ --compare B/ C/ --names drope mae alt --data ... --out ...

For each DWI: a seeded subset of ``--volumes`` volumes (holding a b0), ``--mask-ratio`` of the patches of every
volume hidden (seeded; the same volumes and masks for every compared checkpoint), slab-wise reconstruction
(``DRoPE.reconstruct``), then per shell PSNR / SSIM on the b0-normalised signal inside the brain (masked patches =
headline, and whole brain), a Frechet distance of pretrained-CNN slice features pooled over subjects
("FID (EfficientNet-Lite0)"; see ``DRoPE/evaluation/features.py``), and DTI (DIPY) FA / MD errors over the brain,
in white matter (FA > 0.2) and per tract (Juelich atlas registered to the subject; ``DRoPE/evaluation/atlas.py``).

Outputs in EVAL_DIR: ``signal_metrics.csv`` (subject x model x shell), ``dti_metrics.csv`` (subject x model),
``tract_metrics.csv``, ``results.json`` (settings, all rows, summaries, FID), ``report.md`` with figures
(``shell_metrics.png``, ``tract_errors.png``), per subject and model ``subjects/SUBJECT/MODEL/`` with
``fa_error.nii.gz`` / ``md_error.nii.gz`` (on the input grid; MD in mm^2/s), ``montage.png``, ``dti_errors.png``;
with ``--compare`` also ``comparison.md`` / ``comparison.csv`` (printed too). Errors: one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `import DRoPE` work from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from DRoPE import __version__
from DRoPE.arguments import output_folder, scan_flags
from DRoPE.device import select_device
from DRoPE.evaluation import atlas, report
from DRoPE.baselines import BASELINES
from DRoPE.evaluation.engine import evaluate_baselines, evaluate_reconstruction, fid_slice_index, take_slices
from DRoPE.evaluation.features import FID_LABEL, SliceFeatureExtractor
from DRoPE.evaluation.metrics import frechet_distance_features
from DRoPE.io import input_files, load_dwi, save_scalar_nifti
from DRoPE.probing.extract import subject_ids
from DRoPE.reconstruct import ReconstructSettings
from DRoPE.training.data import find_dwis

log = logging.getLogger("drope.evaluate")


class EvaluationError(ValueError):
    """Arguments that cannot work together; the message says which."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description="Reconstruction quality (PSNR, SSIM, FID) and DTI errors of D-RoPE checkpoints (paper Tables 1-2).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("inputs and outputs")
    io.add_argument("--checkpoint", required=True, help="checkpoint folder (model.safetensors + model.json) or file")
    io.add_argument("--data", required=True, help="a DWI file, a folder of DWIs (searched recursively) or a text list")
    io.add_argument("--out", required=True, help="output folder")
    io.add_argument("--compare", nargs="+", default=[], metavar="CHECKPOINT",
                    help="more checkpoints evaluated on the same volumes and masks (comparison table)")
    io.add_argument("--names", nargs="+", default=None,
                    help="display names for --checkpoint then each --compare; default: the checkpoint folder names")
    masking = parser.add_argument_group("masking")
    masking.add_argument("--volumes", type=int, default=None, help="volumes per subject (seeded subset holding a b0); None = all volumes")
    masking.add_argument("--mask-ratio", type=float, default=0.75, help="fraction of the patches of every volume hidden")
    masking.add_argument("--seed", type=int, default=0, help="seeds the volume subset, the patch mask and the FID slices")
    masking.add_argument("--slab", type=int, default=None, help="slices per inference slab; None = the checkpoint's training slab")
    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--fid-slices", type=int, default=64,
                         help="axial slices per subject and DW shell fed to the CNN for the FID (0 = no FID)")
    metrics.add_argument("--no-tracts", action="store_true", help="skip the atlas registration and per-tract errors")
    metrics.add_argument("--no-baselines", action="store_true",
                         help="skip the baselines (shell mean, angular shell mean, DTI of visible volumes) measured on "
                         "the same hidden patches")
    run = parser.add_argument_group("runtime")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    run.add_argument("--quiet", action="store_true", help="only warnings and errors")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return run(args)
    except ValueError as error:  # every DRoPE input error is a ValueError subclass naming the file and problem
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def model_names(checkpoints: list[str], names: list[str] | None) -> list[str]:
    """Display names: the given ones, else the checkpoint folder names (made unique)."""
    if names is not None:
        if len(names) != len(checkpoints):
            raise EvaluationError(f"--names has {len(names)} names for {len(checkpoints)} checkpoints")
        if len(set(names)) != len(names):
            raise EvaluationError(f"--names must be unique, got {names}")
        return list(names)
    out = []
    for path in checkpoints:
        p = Path(path)
        base = (p.parent if p.suffix in (".safetensors", ".json") else p).name or "model"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


def run(args) -> int:
    checkpoints = [args.checkpoint, *args.compare]
    names = model_names(checkpoints, args.names)
    if not 0.0 <= args.mask_ratio < 1.0:
        raise EvaluationError(f"--mask-ratio must be in [0, 1), got {args.mask_ratio}")
    if args.fid_slices < 0:
        raise EvaluationError(f"--fid-slices must be >= 0, got {args.fid_slices}")
    output_folder(args.out, "--out")
    scan_flags(args)
    paths = find_dwis(args.data)
    subjects = subject_ids(paths)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(args.device)
    settings = ReconstructSettings(mask_ratio=args.mask_ratio, volumes=args.volumes, seed=args.seed, slab=args.slab)
    notes: list[str] = []
    use_tracts = not args.no_tracts and atlas.available()
    if not args.no_tracts and not use_tracts:
        notes.append(f"per-tract errors skipped: no atlas / FA template installed ({atlas.INSTALL_HINT})")
        log.warning(notes[-1])
    extractor = SliceFeatureExtractor(device) if args.fid_slices else None

    methods = names + ([] if args.no_baselines else list(BASELINES))
    signal_rows, dti_rows, tract_rows, digests = [], [], [], {}
    fid_features: dict[str, dict[str, dict[str, list]]] = {name: {} for name in methods}
    started = time.perf_counter()
    for path, subject in zip(paths, subjects):
        dwi = load_dwi(path)
        tract_cache: dict = {}
        original_features: dict = {}

        def tracts(fa, affine, mask, _cache=tract_cache):
            key = hashlib.sha1(np.ascontiguousarray(fa).tobytes()).hexdigest()
            if key not in _cache:
                _cache[key] = atlas.subject_tracts(fa, affine, mask, seed=args.seed)
            return _cache[key]

        def measured(subject=subject, tracts=tracts):
            """(name, SubjectResult, seconds) of each checkpoint, then of each baseline on the first one's masks."""
            for checkpoint, name in zip(checkpoints, names):
                t0 = time.perf_counter()
                res = evaluate_reconstruction(dwi, checkpoint, settings, subject=subject, model=name, device=device,
                                              tracts=tracts if use_tracts else None)
                if name == names[0]:
                    first = res
                yield name, res, time.perf_counter() - t0
            if not args.no_baselines:
                t0 = time.perf_counter()
                for res in evaluate_baselines(first.reconstruction, subject=subject,
                                              tracts=tracts if use_tracts else None):
                    yield res.model, res, time.perf_counter() - t0

        for name, res, seconds in measured():
            signal_rows += res.shells
            dti_rows.append({"subject": subject, "model": name, **res.dti})
            tract_rows += res.tracts
            digests.setdefault(subject, {})[name] = res.mask_digest
            notes += [f"{subject} / {name}: {n}" for n in res.notes]
            _write_subject_outputs(res, out / "subjects" / subject / name.replace(" ", "_"))
            if extractor is not None:
                _collect_fid(res, extractor, fid_features[name], args.fid_slices, args.seed, original_features)
            dw = next((r for r in res.shells if r["shell"] == "dw"), res.shells[-1])
            print(f"{subject} [{name}]: PSNR masked {report.fmt(dw['psnr_masked'], None, 2)} dB, SSIM masked "
                  f"{report.fmt(dw['ssim_masked'])}, FA error WM {report.fmt(res.dti.get('fa_mae_wm'))} "
                  f"({seconds:.1f} s)", flush=True)

    fid = {name: _fid_table(shells) for name, shells in fid_features.items()}
    same_masks = all(len(set(d.values())) == 1 for d in digests.values())
    if len(names) > 1 and not same_masks:
        notes.append("the compared checkpoints did not see identical volume subsets / patch masks "
                     "(different patch size or slab?); see mask_digests in results.json")
    results = {
        "drope_version": __version__,
        "checkpoints": dict(zip(names, map(str, checkpoints))),
        "subjects": dict(zip(subjects, map(str, paths))),
        "settings": {"mask_ratio": args.mask_ratio, "volumes": args.volumes, "seed": args.seed, "slab": args.slab,
                     "fid_slices": args.fid_slices, "device": str(device)},
        "conventions": CONVENTIONS,
        "fid_network": FID_LABEL if extractor else None,
        "atlas": {"atlas": atlas.ATLAS_NAME, "template": atlas.TEMPLATE_NAME} if use_tracts else None,
        "signal": signal_rows,
        "dti": dti_rows,
        "tracts": tract_rows,
        "signal_summary": report.summarise(signal_rows, ("model", "shell"), report.SIGNAL_METRICS),
        "dti_summary": report.summarise(dti_rows, ("model",), report.DTI_METRICS),
        "tract_summary": report.summarise(tract_rows, ("model", "tract"), ("fa_mae", "md_mae")),
        "fid": fid,
        "mask_digests": digests,
        "same_masks": same_masks,
        "notes": notes,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write_tables(results, out)
    if len(methods) > 1:
        text = _comparison(results, out)
        print(text)
    print(f"wrote {out / 'report.md'}")
    return 0


CONVENTIONS = {
    "signal": "b0-normalised signal S / mean(S_b0) (reference clipped to [0, 1.5] as the model's target), brain mask only",
    "psnr": "10 log10(peak^2 / MSE) dB with peak 1.0 (the b0 level); psnr_masked_half = the public code's convention (half)",
    "ssim": "3-D Gaussian-window SSIM per volume (sigma 1.5 voxels, K1 0.01, K2 0.03, data_range 1.0), region mean, "
            "averaged over the shell's volumes",
    "headline": "masked-patch metrics (voxels of patches hidden from the encoder); *_whole = all brain voxels",
    "fid": "Frechet distance of pooled EfficientNet-Lite0 (ImageNet) features of axial slices of the diffusion-weighted "
           "volumes, pooled over subjects (per shell; 'dw' pools all shells); not comparable with ResNet50 / Inception FIDs",
    "dti": "DIPY WLS fit on the original and on the reconstruction (same volumes); mean absolute error; MD in 1e-3 mm^2/s; "
           "white matter = FA > 0.2 in the original; tracts = atlas region within that white matter",
}


def _write_subject_outputs(res, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    result = res.reconstruction
    dwi = result.dwi
    protect = input_files(dwi)
    if result.maps:
        for name in ("fa_error", "md_error"):
            save_scalar_nifti(dwi.to_input_grid(result.maps[name]), dwi.grid.affine, folder / f"{name}.nii.gz", protect=protect)
        report.save(report.dti_error_figure(result, title=f"{res.subject} [{res.model}]: DTI errors"), folder / "dti_errors.png")
    original, recon = res.normalised
    title = f"{res.subject} [{res.model}]: normalised signal, {result.summary['settings']['mask_ratio']:.0%} of patches masked"
    report.save(report.montage_figure(result, original, recon, title=title), folder / "montage.png")


def _collect_fid(res, extractor, store: dict, max_slices: int, seed: int, cache: dict) -> None:
    """Add this subject's original / reconstructed slice features per DW shell to ``store[shell]``.

    cache: features of the original slices, shared by the models that saw the same volumes.
    """
    original, recon = res.normalised
    result = res.reconstruction
    pairs = fid_slice_index(result.mask, result.dwi.gtab.shell_bvals, max_slices, seed, res.subject)
    for shell, index in pairs.items():
        if len(index) == 0:
            continue
        key = (res.subject, tuple(result.volume_index.tolist()), shell)
        if key not in cache:
            cache[key] = extractor(take_slices(original, index))
        entry = store.setdefault(shell, {"original": [], "reconstruction": []})
        entry["original"].append(cache[key])
        entry["reconstruction"].append(extractor(take_slices(recon, index)))


def _fid_table(shells: dict) -> dict:
    """{shell: FID} per DW shell plus "dw" pooling the slices of every shell."""
    table = {shell: _fid(parts) for shell, parts in shells.items()}
    if shells:
        table["dw"] = _fid({k: [a for parts in shells.values() for a in parts[k]] for k in ("original", "reconstruction")})
    return table


def _fid(parts: dict) -> float | None:
    a, b = np.concatenate(parts["original"]), np.concatenate(parts["reconstruction"])
    if len(a) < 2:
        return None
    return frechet_distance_features(a, b)


def _write_tables(results: dict, out: Path) -> None:
    report.write_csv(out / "signal_metrics.csv", results["signal"])
    report.write_csv(out / "dti_metrics.csv", results["dti"])
    report.write_csv(out / "tract_metrics.csv", results["tracts"],
                     columns=["subject", "model", "tract", "n_voxels", "fa_mae", "md_mae"])
    report.write_json(out / "results.json", results)
    figures = ["shell_metrics.png"]
    report.save(report.shell_bar_figure(results["signal_summary"]), out / "shell_metrics.png")
    if results["tract_summary"]:
        report.save(report.tract_bar_figure(results["tract_summary"]), out / "tract_errors.png")
        figures.append("tract_errors.png")
    report.write_text(out / "report.md", _markdown(results, figures))


def _markdown(results: dict, figures: list[str]) -> str:
    settings = results["settings"]
    fid_label = results["fid_network"] or "FID (not computed)"
    lines = [
        "# DRoPE reconstruction evaluation\n",
        f"{len(results['subjects'])} subject(s), model(s): {', '.join(results['checkpoints'])}. "
        f"Volumes per subject: {settings['volumes'] or 'all'}; {settings['mask_ratio']:.0%} of the patches of every "
        f"volume masked; seed {settings['seed']}; same masks for all models: {results['same_masks']}.\n",
        "## Reconstruction quality (Table 1)\n",
        "Mean ± std over subjects. Masked = voxels of masked patches (headline); whole = all brain voxels.\n",
        report.table1(results["signal_summary"], results["fid"], fid_label),
        "\n## DTI errors (Table 2)\n",
        report.table2(results["dti_summary"]),
    ]
    if results["tract_summary"]:
        rows = [[r["tract"], r["model"], r["n"], report.fmt(r["fa_mae_mean"], r["fa_mae_std"]),
                 report.fmt(r["md_mae_mean"], r["md_mae_std"])] for r in results["tract_summary"]]
        lines += ["\n## DTI errors per tract\n", f"Atlas: {results['atlas']['atlas']}, registered via the "
                  f"{results['atlas']['template']}.\n", report.markdown_table(["tract", "model", "subjects", "FA error",
                  "MD error (1e-3 mm²/s)"], rows)]
    lines.append("\n## Figures\n")
    lines += [f"![{f}]({f})\n" for f in figures]
    for subject in results["subjects"]:
        for model in results["checkpoints"]:
            base = f"subjects/{subject}/{model}"
            lines.append(f"- {subject} [{model}]: [montage]({base}/montage.png), [DTI errors]({base}/dti_errors.png), "
                         f"`{base}/fa_error.nii.gz`, `{base}/md_error.nii.gz`\n")
    lines.append("\n## Conventions\n")
    lines += [f"- **{k}**: {v}\n" for k, v in results["conventions"].items()]
    if results["notes"]:
        lines.append("\n## Notes\n")
        lines += [f"- {n}\n" for n in results["notes"]]
    return "\n".join(lines)


def _comparison(results: dict, out: Path) -> str:
    """Table 1/2-style comparison (Markdown + CSV): per shell and model PSNR / SSIM / FID, and DTI errors."""
    dti = {r["model"]: r for r in results["dti_summary"]}
    rows = []
    for s in results["signal_summary"]:
        d = dti.get(s["model"], {})
        rows.append({
            "shell": s["shell"], "model": s["model"], "subjects": s["n"],
            "psnr_masked_mean": s["psnr_masked_mean"], "psnr_masked_std": s["psnr_masked_std"],
            "ssim_masked_mean": s["ssim_masked_mean"], "ssim_masked_std": s["ssim_masked_std"],
            "fid": results["fid"].get(s["model"], {}).get(s["shell"]),
            "fa_mae_wm_mean": d.get("fa_mae_wm_mean"), "fa_mae_wm_std": d.get("fa_mae_wm_std"),
            "md_mae_wm_mean": d.get("md_mae_wm_mean"), "md_mae_wm_std": d.get("md_mae_wm_std"),
        })
    report.write_csv(out / "comparison.csv", rows)
    fid_label = results["fid_network"] or "FID (not computed)"
    text = ("# Comparison\n\n" + f"Same masks for all models: {results['same_masks']}.\n\n"
            + report.table1(results["signal_summary"], results["fid"], fid_label) + "\n"
            + report.table2(results["dti_summary"]))
    report.write_text(out / "comparison.md", text)
    return text


if __name__ == "__main__":
    code = main()
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "util"):
        sys.modules["slicer"].util.exit(code)
    sys.exit(code)
