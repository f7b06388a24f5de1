"""Probe the pretrained encoder's latents on downstream labels (paper Section 4.3, Tables 3, 4, 6, 7).

    probe.py extract --checkpoint C --data D --out features.npz [--draws K] [--volumes 12 | --all-volumes] [--seed S]
    probe.py fit --features F.npz --labels L.csv --target COLUMN --task regression|classification --probe linear|mlp
                 [--splits S.json] --out RESULT.json [--class-weight balanced] [--seed N] [--save-probe P.json]
    probe.py finetune --checkpoint C --data D --labels L.csv --target COLUMN --task ... --out DIR [--splits S.json] [--lora]
    probe.py invariance --train-features P1.npz --test-features P2.npz --labels L.csv --target COLUMN --task ... --out R.json
    probe.py drift --checkpoint C --data D --draws K --out drift.csv [--min-volumes 6] [--sessions S.csv] [--no-untrained]

extract: CLS latents of whole scans (slab-wise, brain-weighted mean of slab CLS vectors, as ``DRoPE.reconstruct``),
K random protocol draws per subject (``--volumes`` random diffusion-weighted volumes + one b0, seeded by seed,
subject and draw). features.npz holds one array per subject id ((D,) for one draw, (K, D) for more); a JSON record
of the volumes drawn is written beside it (features.json). Subject id: the BIDS ``sub-XXX`` in the path, else the
file name, else the folder name.

fit: cross-validated probe. K draws are averaged per subject. Without --splits, stratified seeded splits (class, or
quantile bins of the target) with --split-ratio 30/35/35 (default) or 60/20/20, 5 folds, saved as splits.json next to
RESULT.json. RESULT.json: {"task", "probe", "folds": [{metric: value}], "mean", "std", ...}; also
RESULT_predictions.csv, RESULT_folds.png, RESULT_embedding.png. --save-probe (linear only) writes the linear probe
(DRoPE.probes JSON, read by ``python -m DRoPE reconstruct --probe``) fitted on the union of all folds' training ids.

Errors (bad files, ids in splits missing from features or labels, NaN labels, a single class in a fold, features
of different dimensions): one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `import DRoPE` work from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from DRoPE import __version__
from DRoPE.arguments import in_range, model_checkpoint, output_file, output_folder, scan_flags
from DRoPE.atomic import atomic_path
from DRoPE.cli import add_progress, engine_command
from DRoPE.device import select_device
from DRoPE.evaluation.report import write_csv, write_json
from DRoPE.overview import save_figure
from DRoPE.probes import save_probe
from DRoPE.probing import crossval, figures
from DRoPE.probing.extract import extract_latents, subject_ids
from DRoPE.probing.finetune import FinetuneConfig, finetune_fold
from DRoPE.probing.metrics import aggregate
from DRoPE.probing.probes import fit_linear
from DRoPE.probing.splits import PAPER_RATIOS, load_splits, make_splits, save_splits
from DRoPE.training.data import find_dwis

log = logging.getLogger("drope.probe")
N_FOLDS = 5
MIN_SUBJECTS = 4  # the fewest that leave each made fold two training subjects and one validation and test subject


class ProbeCLIError(ValueError):
    """Arguments that cannot work together."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe.py", description="Probe D-RoPE latents on downstream labels.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("extract", help="CLS latents per DWI with random protocol draws",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ex.add_argument("--checkpoint", required=True, help="checkpoint folder or file")
    ex.add_argument("--data", required=True, help="a DWI file, a folder of DWIs (recursive) or a text list")
    ex.add_argument("--out", required=True, help="features .npz (a .json record is written beside it)")
    ex.add_argument("--draws", type=int, default=1, help="random protocol draws per subject (K)")
    group = ex.add_mutually_exclusive_group()
    group.add_argument("--volumes", type=int, default=12, help="diffusion-weighted volumes per draw (+ one b0)")
    group.add_argument("--all-volumes", action="store_true", help="use every volume (one draw)")
    ex.add_argument("--seed", type=int, default=0, help="seeds the protocol draws")
    ex.add_argument("--slab", type=int, default=None, help="slices per slab (default: the checkpoint's)")
    ex.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")

    fit = sub.add_parser("fit", help="cross-validated linear / MLP probe on saved latents",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _label_args(fit)
    fit.add_argument("--features", required=True, help="features .npz from extract")
    fit.add_argument("--probe", required=True, choices=("linear", "mlp"))
    fit.add_argument("--out", required=True, help="RESULT.json")
    fit.add_argument("--save-probe", default=None, help="write the linear probe (DRoPE probe JSON) fitted on the union "
                     "of the folds' training ids")
    fit.add_argument("--alpha", default="auto", help="ridge / inverse-C strength of the linear probe, or 'auto' "
                     "(chosen on each validation fold)")
    fit.add_argument("--no-figures", action="store_true", help="skip the PNG figures")

    inv = sub.add_parser("invariance", help="train on protocol-1 latents, test on protocol 1 and protocol 2 (Table 7)",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _label_args(inv)
    inv.add_argument("--train-features", required=True, help="features .npz of protocol 1")
    inv.add_argument("--test-features", required=True, help="features .npz of protocol 2 (same subjects)")
    inv.add_argument("--out", required=True, help="metrics JSON")
    inv.add_argument("--probe", default="linear", choices=("linear", "mlp"))

    ft = sub.add_parser("finetune", help="fine-tune the last encoder block + an MLP head (optional LoRA)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _label_args(ft)
    ft.add_argument("--checkpoint", required=True, help="pretrained checkpoint")
    ft.add_argument("--data", required=True, help="a DWI file, a folder of DWIs (recursive) or a text list")
    ft.add_argument("--out", required=True, help="output folder (result.json, log.csv, predictions.csv)")
    ft.add_argument("--fold", type=int, default=None, help="run only this fold (default: all)")
    ft.add_argument("--epochs", type=int, default=50)
    ft.add_argument("--lr", type=float, default=5e-5, help="start learning rate")
    ft.add_argument("--final-lr", type=float, default=None, help="cosine schedule to this value (default: constant)")
    ft.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (Table 6: 0.01 or 0.05)")
    ft.add_argument("--batch-size", type=int, default=6, help="subjects per optimiser step")
    ft.add_argument("--volumes", type=int, default=12, help="diffusion-weighted volumes per draw (+ one b0)")
    ft.add_argument("--lora", action="store_true", help="LoRA adapters on the attention projections (peft)")
    ft.add_argument("--lora-rank", type=int, default=12)
    ft.add_argument("--lora-alpha", type=int, default=12)
    ft.add_argument("--slab", type=int, default=None, help="slices per slab (default: the checkpoint's)")
    ft.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    _add_drift(sub)
    return parser


def _label_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="CSV with a subject_id column and the target column")
    p.add_argument("--target", required=True, help="label column")
    p.add_argument("--task", required=True, choices=crossval.TASKS)
    p.add_argument("--splits", default=None, help='splits JSON {"folds": [{"train", "val", "test"}, ...]}; default: '
                   "stratified seeded splits written next to the output as splits.json")
    p.add_argument("--split-ratio", default="30/35/35", choices=tuple(PAPER_RATIOS), help="train/val/test without --splits")
    p.add_argument("--class-weight", default=None, choices=("balanced",), help="weight classes by inverse frequency")
    p.add_argument("--standardize-target", action="store_true", help="z-score a regression target with train-fold stats")
    p.add_argument("--seed", type=int, default=0, help="seeds the splits and the probes")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    commands = {"extract": cmd_extract, "fit": cmd_fit, "invariance": cmd_invariance, "finetune": cmd_finetune,
                "drift": cmd_drift}
    try:
        return commands[args.command](args)
    except ValueError as error:  # DRoPE input errors are ValueError subclasses naming the file and the problem
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------------------------------------------
# extract
# ---------------------------------------------------------------------------------------------------------------


def cmd_extract(args) -> int:
    out = Path(args.out)
    if out.suffix != ".npz":
        raise ProbeCLIError(f"{out}: --out must end with .npz")
    output_file(out, "--out")
    in_range(args.draws, "--draws", 1)
    scan_flags(args)
    paths = find_dwis(args.data)
    model_checkpoint(args.checkpoint, "--checkpoint")
    volumes = None if args.all_volumes else args.volumes
    latents, info = extract_latents(paths, args.checkpoint, draws=args.draws, volumes=volumes, seed=args.seed,
                                    device=select_device(args.device), slab=args.slab, progress=print)
    arrays = {sid: (x[0] if args.draws == 1 else x) for sid, x in latents.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        np.savez(tmp, **arrays)
    write_json(out.with_suffix(".json"), {"drope_version": __version__, **info})
    print(f"wrote {out} ({len(arrays)} subjects, latent dim {info['latent_dim']})")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# fit / invariance
# ---------------------------------------------------------------------------------------------------------------


def _folds(splits_path, features: dict, labels: dict, out: Path, *, task: str, split_ratio: str, seed: int,
           features_path, labels_path):
    """The folds (from ``splits_path``, or made and saved as splits.json next to ``out``) and the splits' source."""
    if splits_path:
        return load_splits(splits_path), str(splits_path)
    ids = _labelled_ids(features, labels, features_path, labels_path)
    data = crossval.build_data(features, labels, ids, task, features_path=features_path, labels_path=labels_path)
    values = [data.classes[i] for i in data.y] if data.classes else data.y
    splits = make_splits(data.ids, values, task, ratios=PAPER_RATIOS[split_ratio], n_folds=N_FOLDS, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = save_splits(splits, out.parent / "splits.json")
    print(f"wrote {path}")
    return splits["folds"], str(path)


def _labelled_ids(features: dict, labels: dict, features_path, labels_path) -> list[str]:
    """Ids with features and a label (those with a missing/NaN label are left out with a warning naming them); when
    fewer than MIN_SUBJECTS, raise naming the ids each file lacks."""
    ids = [s for s in features if s in labels and not crossval.is_missing(labels[s])]
    missing = [s for s in features if s in labels and crossval.is_missing(labels[s])]
    if missing:
        log.warning("%s: subjects with features but a missing/NaN label are left out: %s", labels_path, _some(missing))
    if len(ids) < MIN_SUBJECTS:
        unlabelled = [s for s in features if s not in ids]
        featureless = [s for s in labels if s not in features]
        raise ProbeCLIError(
            f"only {len(ids)} subject(s) have both features and a label, a probe needs {MIN_SUBJECTS}: "
            f"{_some(unlabelled)} in {features_path} have no label in {labels_path}; "
            f"{_some(featureless)} in {labels_path} have no features in {features_path}"
        )
    return ids


def _some(ids: list[str]) -> str:
    return f"{len(ids)} ids {ids[:10]}{' ...' if len(ids) > 10 else ''}"


def _prepare(args, features_path: str, out: Path):
    """Features, labels, folds, the splits' source and the checked ProbeData of every id in the folds."""
    features = crossval.load_features(features_path)
    labels = crossval.load_labels(args.labels, args.target)
    folds, splits_source = _folds(args.splits, features, labels, out, task=args.task, split_ratio=args.split_ratio,
                                  seed=args.seed, features_path=features_path, labels_path=args.labels)
    data = crossval.build_data(features, labels, crossval.split_ids(folds), args.task, features_path=features_path,
                               labels_path=args.labels)
    crossval.check_folds(folds, data, args.task, splits_source)
    return folds, splits_source, data


def _alpha(text):
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ProbeCLIError(f"--alpha must be 'auto' or a number >= 0, got {text!r}") from None
    if value < 0:
        raise ProbeCLIError(f"--alpha must be >= 0, got {value}")
    return value


def cmd_fit(args) -> int:
    out = Path(args.out)
    output_file(out, "--out")
    if args.save_probe:
        output_file(args.save_probe, "--save-probe")
    in_range(args.seed, "--seed", 0)
    if args.save_probe and args.probe != "linear":
        raise ProbeCLIError("--save-probe writes the linear probe format; use it with --probe linear")
    alpha = _alpha(args.alpha)
    folds, splits_source, data = _prepare(args, args.features, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = crossval.cross_validate(data, folds, args.task, args.probe, class_weight=args.class_weight, seed=args.seed,
                                     alpha=alpha, standardize_target=args.standardize_target)
    payload = {
        "task": args.task, "probe": args.probe, "folds": result["folds"], "mean": result["mean"], "std": result["std"],
        "target": args.target, "features": str(args.features), "labels": str(args.labels), "splits": splits_source,
        "n_subjects": len(data.ids), "classes": data.classes, "class_weight": args.class_weight, "seed": args.seed,
        "standardize_target": args.standardize_target, "drope_version": __version__,
        "notes": "K protocol draws per subject are averaged into one latent; features standardised with train-fold "
                 "statistics; " + ("linear = ridge (regression) / L2 logistic regression, alpha chosen on the "
                                   "validation fold" if args.probe == "linear" else "MLP with early stopping on the "
                                   "validation fold"),
    }
    if args.probe == "linear":
        payload["alpha_per_fold"] = [m.alpha for m in result["fitted"]]
    write_json(out, payload)
    stem = out.with_suffix("")
    write_csv(Path(f"{stem}_predictions.csv"), result["predictions"])
    if args.save_probe:
        path = _save_linear_probe(args, data, folds, alpha)
        print(f"wrote {path}")
    if not args.no_figures:
        title = f"{args.target} ({args.probe} probe)"
        save_figure(figures.fold_metrics_figure(result["folds"], title), Path(f"{stem}_folds.png"))
        values = [data.classes[i] for i in data.y] if data.classes else data.y
        save_figure(figures.embedding_figure(data.X, values, f"latents coloured by {args.target}",
                                             categorical=data.classes is not None, seed=args.seed),
                    Path(f"{stem}_embedding.png"))
    _print_summary(payload)
    return 0


def _save_linear_probe(args, data, folds, alpha):
    """Linear probe on the union of all folds' training ids (alpha: the fixed one, else the median chosen value)."""
    train = list(dict.fromkeys(s for fold in folds for s in fold["train"]))
    rows = data.rows(train)
    n_classes = 1 if data.classes is None else len(data.classes)
    if alpha == "auto":
        chosen = [fit_linear(data.X[data.rows(f["train"])], data.y[data.rows(f["train"])], args.task, n_classes=n_classes,
                             X_val=data.X[data.rows(f["val"])] if f["val"] else None,
                             y_val=data.y[data.rows(f["val"])] if f["val"] else None,
                             class_weight=args.class_weight, seed=args.seed).alpha for f in folds]
        alpha = float(np.median(chosen))
    model = fit_linear(data.X[rows], data.y[rows], args.task, n_classes=n_classes, alpha=alpha,
                       class_weight=args.class_weight, seed=args.seed)
    return save_probe(model.to_linear_probe(args.target, data.classes), args.save_probe)


def _print_summary(payload: dict) -> None:
    parts = [f"{k} {v:.3f} ± {payload['std'][k]:.3f}" for k, v in payload["mean"].items() if v is not None]
    print(f"{payload['target']} [{payload['probe']}]: " + ", ".join(parts))


def cmd_invariance(args) -> int:
    out = Path(args.out)
    output_file(out, "--out")
    in_range(args.seed, "--seed", 0)
    folds, splits_source, data = _prepare(args, args.train_features, out)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = crossval.load_labels(args.labels, args.target)
    other = crossval.load_features(args.test_features)
    dim_train, dim_test = data.X.shape[1], next(iter(other.values())).shape[1]
    if dim_train != dim_test:
        raise ProbeCLIError(f"{args.test_features}: latent dimension {dim_test} differs from {args.train_features} ({dim_train})")
    test_data = crossval.build_data(other, labels, data.ids, args.task, features_path=args.test_features, labels_path=args.labels)
    common = dict(class_weight=args.class_weight, seed=args.seed, standardize_target=args.standardize_target)
    same = crossval.cross_validate(data, folds, args.task, args.probe, **common)
    cross = crossval.cross_validate(data, folds, args.task, args.probe, test_data=test_data, **common)
    payload = {
        "task": args.task, "probe": args.probe, "target": args.target, "trained_on": str(args.train_features),
        "splits": splits_source, "n_subjects": len(data.ids),
        "protocol_1": {"tested_on": str(args.train_features), "folds": same["folds"], "mean": same["mean"], "std": same["std"]},
        "protocol_2": {"tested_on": str(args.test_features), "folds": cross["folds"], "mean": cross["mean"], "std": cross["std"]},
    }
    write_json(out, payload)
    for name in ("protocol_1", "protocol_2"):
        parts = [f"{k} {v:.3f}" for k, v in payload[name]["mean"].items() if v is not None]
        print(f"trained on protocol 1, tested on {name.replace('_', ' ')}: " + ", ".join(parts))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# finetune
# ---------------------------------------------------------------------------------------------------------------


def _check_finetune_args(args) -> None:
    output_folder(args.out, "--out")
    scan_flags(args)
    in_range(args.epochs, "--epochs", 1)
    in_range(args.batch_size, "--batch-size", 1)
    in_range(args.lr, "--lr", 0)
    in_range(args.final_lr, "--final-lr", 0)
    in_range(args.weight_decay, "--weight-decay", 0)
    in_range(args.lora_rank, "--lora-rank", 1)
    in_range(args.lora_alpha, "--lora-alpha", 1)


def cmd_finetune(args) -> int:
    _check_finetune_args(args)
    out = Path(args.out)
    paths = find_dwis(args.data)
    ids = subject_ids(paths)
    labels = crossval.load_labels(args.labels, args.target)
    model_checkpoint(args.checkpoint, "--checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    placeholder = {sid: np.zeros((1, 1)) for sid in ids}  # folds and labels are checked like the probe's
    folds, splits_source = _folds(args.splits, placeholder, labels, out / "result.json", task=args.task,
                                  split_ratio=args.split_ratio, seed=args.seed, features_path=args.data,
                                  labels_path=args.labels)
    data = crossval.build_data(placeholder, labels, crossval.split_ids(folds), args.task, features_path=args.data,
                               labels_path=args.labels)
    crossval.check_folds(folds, data, args.task, splits_source)
    if args.fold is not None and not 0 <= args.fold < len(folds):
        raise ProbeCLIError(f"--fold {args.fold} is out of range: {splits_source} has {len(folds)} folds")
    targets = {sid: (float(v) if data.classes is None else int(v)) for sid, v in zip(data.ids, data.y)}
    config = FinetuneConfig(epochs=args.epochs, lr=args.lr, final_lr=args.final_lr, weight_decay=args.weight_decay,
                            batch_size=args.batch_size, lora=args.lora, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
                            volumes=args.volumes, class_weight=args.class_weight, seed=args.seed, slab=args.slab)
    device = select_device(args.device)
    chosen = range(len(folds)) if args.fold is None else [args.fold]
    per_fold, predictions, log_rows, best_epochs = [], [], [], []
    for k in chosen:
        metrics, rows, best = finetune_fold(args.checkpoint, dict(zip(ids, paths)), targets, folds[k], args.task,
                                            1 if data.classes is None else len(data.classes), config, device,
                                            log_rows=log_rows, fold_index=k, progress=print)
        per_fold.append(metrics)
        best_epochs.append(best)
        for row in rows:
            if data.classes is not None:
                row["true"], row["predicted"] = data.classes[int(row["true"])], data.classes[int(row["predicted"])]
        predictions += rows
    mean, std = aggregate(per_fold)
    payload = {"task": args.task, "probe": "finetune" + ("+lora" if args.lora else ""), "folds": per_fold, "mean": mean,
               "std": std, "target": args.target, "splits": splits_source, "fold_indices": list(chosen),
               "best_epochs": best_epochs, "config": {k: v for k, v in vars(config).items()}, "device": str(device),
               "drope_version": __version__}
    write_json(out / "result.json", payload)
    write_csv(out / "log.csv", log_rows)
    write_csv(out / "predictions.csv", predictions)
    _print_summary(payload)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# drift
# ---------------------------------------------------------------------------------------------------------------


def _add_drift(sub) -> None:
    dr = sub.add_parser("drift", help="protocol drift of latents: within-scan spread under random protocol draws "
                        "against between-brain distances (CSV + PNG)", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    dr.add_argument("--checkpoint", required=True, help="checkpoint folder or file")
    dr.add_argument("--data", required=True, help="a folder of DWIs (recursive) or a text list; two sessions at least")
    dr.add_argument("--draws", type=int, default=5, help="random protocol draws per scan (K, >= 2)")
    dr.add_argument("--out", required=True, help="drift .csv (the figure .png and a .json record are written beside it)")
    dr.add_argument("--min-volumes", type=int, default=6, help="fewest diffusion-weighted volumes of a draw (every b0 "
                    "is kept; the size is uniform in [this, all - 1])")
    dr.add_argument("--sessions", default=None, help="CSV with subject_id and session columns (default: the dcm_qa_* "
                    "folder of a corpus scan, else each scan is its own session)")
    dr.add_argument("--no-untrained", action="store_true", help="skip the untrained-encoder baseline (halves the time)")
    dr.add_argument("--seed", type=int, default=0, help="seeds the draws and the untrained encoder")
    dr.add_argument("--slab", type=int, default=None, help="slices per slab (default: the checkpoint's)")
    dr.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    add_progress(dr, ("none", "json"), "none")


def finite_or_none(value) -> float | None:
    return float(value) if np.isfinite(value) else None


def cmd_drift(args) -> int:
    return engine_command(args, lambda report: run_drift(args, report))


def run_drift(args, report) -> dict:
    """The drift report of ``probe.py drift`` (see its --help); returns the ``done`` event's fields: the CSV path
    and the overall ratios per representation."""
    from DRoPE.io import load_dwi
    from DRoPE.model import load_model, read_metadata
    from DRoPE.probing import drift
    from DRoPE.reconstruct import ReconstructSettings, resolve_slab

    out = Path(args.out)
    if out.suffix != ".csv":
        raise ProbeCLIError(f"{out}: --out must end with .csv")
    output_file(out, "--out")
    in_range(args.draws, "--draws", 2)
    in_range(args.min_volumes, "--min-volumes", 1)
    in_range(args.seed, "--seed", 0)
    in_range(args.slab, "--slab", 1)
    model_checkpoint(args.checkpoint, "--checkpoint")
    paths = find_dwis(args.data)
    ids = subject_ids(paths)
    given = crossval.load_labels(args.sessions, "session") if args.sessions else {}
    sessions = {sid: drift.session_of(path, sid, given) for sid, path in zip(ids, paths)}
    if len(set(sessions.values())) < 2:
        raise ProbeCLIError(f"{args.data}: every scan is in session {next(iter(sessions.values()))!r}; between-brain "
                            "distances need two sessions at least")
    device = select_device(args.device)
    model = load_model(args.checkpoint, device=device).eval()
    slab = resolve_slab(ReconstructSettings(slab=args.slab), read_metadata(args.checkpoint), model.config.patch_size[2])
    scans = []
    for n, (sid, path) in enumerate(zip(ids, paths)):
        report(0.05 * n / len(paths), f"reading {sid}")
        scans.append(drift.make_draws(sid, load_dwi(path), args.draws, args.min_volumes, args.seed))
        print(f"{sid}: session {sessions[sid]}, draws of {[len(d) for d in scans[-1].draws]} volumes", flush=True)
    representations = {"DRoPE": drift.encoder_latents(model, slab, device)}
    if not args.no_untrained:
        representations["untrained encoder"] = drift.encoder_latents(drift.untrained_like(model, args.seed), slab, device)
    representations["signal histogram"] = drift.signal_histogram
    latents, results, rows = {}, {}, []
    for n, (name, represent) in enumerate(representations.items()):
        report(0.05 + 0.9 * n / len(representations), f"latents: {name}")
        latents[name] = drift.represent_all(scans, represent)
        results[name] = drift.drift_rows(latents[name], sessions)
        rows += [{"representation": name, **row} for row in results[name]]
        overall = results[name][-1]
        print(f"{name}: within / between {overall['ratio_within']:.3f}, same session other scans / between "
              f"{overall['ratio_session']:.3f}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    figure = drift.drift_figure({k: v[:-1] for k, v in results.items()}, latents["DRoPE"], sessions,
                                f"Protocol drift, {len(scans)} scans, {args.draws} draws each ({args.checkpoint})")
    save_figure(figure, out.with_suffix(".png"))
    record = {"drope_version": __version__, "checkpoint": str(args.checkpoint), "draws": args.draws,
              "min_volumes": args.min_volumes, "seed": args.seed, "slab": slab,
              "scans": {s.subject: {"path": str(p), "session": sessions[s.subject],
                                    "draws": [d.tolist() for d in s.draws]} for s, p in zip(scans, paths)}}
    write_json(out.with_suffix(".json"), record)
    overall = {name: {key: finite_or_none(results[name][-1][key]) for key in ("ratio_within", "ratio_session")}
               for name in results}
    return {"out": str(out), "overall": overall,
            "lines": [f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}"]}


if __name__ == "__main__":
    code = main()
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "util"):
        sys.modules["slicer"].util.exit(code)
    sys.exit(code)
