"""Pretrain the D-RoPE masked autoencoder on a folder of DWIs.

    python DRoPETrain/train.py --data DWI_FOLDER --out RUN_DIR [--config tiny|small|paper|FILE] [--epochs N] ...
    torchrun --standalone --nproc_per_node K DRoPETrain/train.py --data ... --out ...      (DistributedDataParallel)
    Slicer --no-main-window --python-script DRoPETrain/train.py --data ... --out ...

RUN_DIR receives ``checkpoint.safetensors`` + ``checkpoint.json`` (every epoch; ``--resume`` continues from them
exactly), ``log.csv``, ``data.json`` (subjects used and held out), the preprocessing cache ``cache/`` (unless
``--cache``), and at the end ``model.safetensors`` + ``model.json`` (inference weights) and ``loss_curve.png``.
The learning rate (linear warm-up from 0, then cosine), weight decay (cosine) and the masked-loss weight lambda
(linear ramp) are set at every optimizer step from fractional epochs (``DRoPE/training/schedules.py``).
Errors print one line on stderr and exit with code 2 (a full or read-only disk too). Temporary files that a run
killed while writing left in RUN_DIR are removed at the next start.

Test hooks, hidden from --help: ``--stop-after-epoch K`` ends the run cleanly after epoch K as if it had been killed
there (checkpoint written, no final model); ``--weights-hash FILE`` writes each process's weight sha256 to
``FILE.rank<R>``.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `import DRoPE` work from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import DRoPE
from DRoPE.arguments import in_range, input_file, output_folder
from DRoPE.atomic import atomic_path, remove_temporaries
from DRoPE.gradients import DWIError
from DRoPE.training import data as tdata
from DRoPE.training import report
from DRoPE.training.config import TRAIN_PRESETS, ConfigError, config_from_dict, load_config, resolve_model_config
from DRoPE.training.engine import StepSchedule, TrainingError, is_out_of_memory, OOM_ADVICE, train_one_epoch
from DRoPE.training.runtime import (
    build_optimizer,
    close_distributed,
    dist_from_env,
    init_distributed,
    precision,
    seed_everything,
    training_device,
    weights_digest,
)
from DRoPE.training.state import CheckpointError, TrainingState, has_checkpoint, load_checkpoint, read_checkpoint_meta, save_checkpoint

log = logging.getLogger("drope.train")


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or settings (one-line message, exit 2), not a bug (traceback)."""
    from DRoPE.device import DeviceError
    from DRoPE.model import CheckpointError as ModelCheckpointError
    from DRoPE.model import MaskingError, ModelConfigError

    return (ConfigError, DWIError, CheckpointError, TrainingError, DeviceError, ModelCheckpointError,
            ModelConfigError, MaskingError)


USER_ERRORS = _user_errors()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    io = parser.add_argument_group("data and outputs")
    io.add_argument("--data", required=True, help="a DWI file, a folder of DWIs (NIfTI + .bval/.bvec or NRRD, searched "
                    "recursively) or a text file listing them, one path per line relative to the file")
    io.add_argument("--out", required=True, help="run folder (checkpoints, log.csv, model.safetensors, loss_curve.png)")
    io.add_argument("--cache", default=None, help="preprocessing cache folder (default: OUT/cache); shareable between runs")
    io.add_argument("--holdout", default=None, help="text file of subjects to leave out (paths relative to it, or "
                    "subject names / folders relative to --data)")
    io.add_argument("--skip-bad", action="store_true", help="skip unreadable DWIs with a warning instead of stopping")

    cfg = parser.add_argument_group("configuration")
    cfg.add_argument("--config", default=None, help=f"training preset ({', '.join(TRAIN_PRESETS)}) or YAML/JSON file; "
                     "default: paper (or the checkpoint's config with --resume)")
    cfg.add_argument("--epochs", type=int, default=None, help="override optim.epochs (a longer warm-up than the run is "
                     "scaled to keep its share)")
    cfg.add_argument("--seed", type=int, default=None, help="override the config's seed")

    run = parser.add_argument_group("runtime")
    run.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.* (starts afresh if there is none)")
    run.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                     help="default auto: CUDA if available; under torchrun each process uses cuda:LOCAL_RANK")
    run.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per training process (default 0: load in the training process)")
    run.add_argument("--threads", type=int, default=None, help="CPU threads per process for torch (default: torch's)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar (one line per epoch is still printed)")

    # Test hooks, hidden from --help: stop cleanly after epoch K as if killed (checkpoint written, no final model);
    # write this process's weight hash to FILE.rank<R> at the end.
    parser.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights-hash", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    dist = dist_from_env()
    logging.basicConfig(
        level=logging.INFO if dist.is_main else logging.WARNING,
        format=f"%(asctime)s {'[rank %d] ' % dist.rank if dist.distributed else ''}%(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return _train(args, dist)
    except USER_ERRORS as error:
        return _fail(error)
    except (RuntimeError, MemoryError) as error:
        if is_out_of_memory(error):
            return _fail(f"out of memory: {OOM_ADVICE}")
        raise
    except OSError as error:
        if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        return _fail(f"{error.filename}: cannot write ({error.strerror}); free disk space and continue with --resume")
    except KeyboardInterrupt:
        print("error: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        close_distributed()


def _fail(error) -> int:
    print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
    return 2


def _resolve_config(args, run_dir: Path):
    """The run's TrainConfig: --config (default paper), or on --resume the checkpoint's (which a given --config must match)."""
    requested = load_config(args.config)
    if args.epochs is not None:
        requested = requested.with_epochs(args.epochs)
    if args.seed is not None:
        requested = replace(requested, seed=args.seed)
    if not (args.resume and has_checkpoint(run_dir)):
        if args.resume:
            log.info("--resume: no checkpoint in %s yet, starting a new run", run_dir)
        return requested, None
    meta = read_checkpoint_meta(run_dir)
    saved = config_from_dict(meta["config"], source=str(run_dir / "checkpoint.json"))
    config = saved
    if args.config is not None or args.seed is not None:
        differ = [k for k in requested.differences(saved) if k != "optim.epochs"]
        if differ:
            raise ConfigError(
                f"--resume: the given configuration differs from the checkpoint's in {', '.join(differ)}; "
                "resume without --config/--seed (the checkpoint's config is used) or start a new --out"
            )
    if args.epochs is not None and args.epochs != saved.optim.epochs:
        log.warning("resuming with --epochs %d instead of %d: the schedules change from here on", args.epochs, saved.optim.epochs)
        config = saved.with_epochs(args.epochs)
    return config, meta


def _select_dwis(args) -> tuple[list[Path], list[str]]:
    """The DWIs of --data less those of --holdout, and the held-out names."""
    paths = tdata.find_dwis(args.data)
    held: list[str] = []
    if args.holdout:
        paths, held = tdata.read_holdout(args.holdout, paths, Path(args.data).resolve())
        if not paths:
            raise tdata.DataError(f"{args.holdout}: every DWI in {args.data} is held out; nothing left to train on")
    return paths, held


def _prepare_data(args, paths, held, config, patch, dist, run_dir: Path):
    names = tdata.subject_names(paths, Path(args.data).resolve())
    cache_dir = Path(args.cache) if args.cache else run_dir / "cache"
    cache_dir.mkdir(parents=True, exist_ok=True)
    mine = list(range(dist.rank, len(paths), dist.world_size))
    log.info("preprocessing %d DWIs into %s (cached subjects are reused)", len(paths), cache_dir)
    done, failed = tdata.prepare_cache(paths, cache_dir, config.data, patch, names=names, indices=mine)
    gathered = dist.all_gather((done, failed))
    done = {k: v for part, _ in gathered for k, v in part.items()}
    failed = {k: v for _, part in gathered for k, v in part.items()}
    if failed:
        message = tdata.bad_files_message(failed, len(paths))
        if not args.skip_bad:
            raise tdata.DataError(f"{message}; fix or remove them, or pass --skip-bad to train without them")
        if len(failed) == len(paths):
            raise tdata.DataError(f"{message}; no readable DWI left")
        if dist.is_main:
            warnings.warn(f"--skip-bad: training without them; {message}", stacklevel=1)
    subjects = [done[i] for i in sorted(done)]
    record = {
        "data": str(args.data),
        "subjects": [s.name for s in subjects],
        "sources": [s.source for s in subjects],
        "held_out": held,
        "skipped": [failed[i] for i in sorted(failed)],
    }
    return subjects, record


def _masking(strategy_name: str, epoch: int):
    from DRoPE.model import MASKING, strategy_for_epoch

    strategy = strategy_for_epoch(strategy_name, epoch)

    def make_keep(B: int, V: int, P: int, generator: torch.Generator) -> torch.Tensor:
        return MASKING[strategy](B, V, P, generator=generator, device=torch.device("cpu"))

    return strategy, make_keep


def _check_args(args) -> None:
    """The flags that can be checked before anything is read."""
    output_folder(args.out, "--out")
    if args.cache:
        output_folder(args.cache, "--cache")
    input_file(args.holdout, "--holdout")
    in_range(args.epochs, "--epochs", 1)
    in_range(args.seed, "--seed", 0)
    in_range(args.workers, "--workers", 0)
    in_range(args.threads, "--threads", 1)


def _train(args, dist) -> int:
    _check_args(args)
    run_dir = Path(args.out)
    if not args.resume and has_checkpoint(run_dir):
        raise CheckpointError(
            f"{run_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    config, resume_meta = _resolve_config(args, run_dir)
    paths, held = _select_dwis(args)
    model_cfg = resolve_model_config(config)
    patch = tuple(int(p) for p in model_cfg.patch_size)
    device = training_device(args.device, dist)
    init_distributed(dist, device)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path in remove_temporaries(run_dir):
            log.info("removed %s, left by a run killed while writing", path)
    dist.barrier()

    subjects, data_record = _prepare_data(args, paths, held, config, patch, dist, run_dir)
    augment = tdata.ProtocolAugment(config.data.volumes, config.data.augment_snr) if config.data.augment_protocol else None
    dataset = tdata.SlabDataset(subjects, config.data, config.seed, augment=augment)
    sampler = tdata.ShardedSampler(len(dataset), config.seed, dist.rank, dist.world_size)
    loader = _loader(dataset, sampler, config.optim.batch_size, args.workers, device, config.seed)
    steps_per_epoch = math.ceil(len(sampler) / config.optim.batch_size)

    from DRoPE.model import DRoPEMAE, save_model

    seed_everything(config.seed)
    model = DRoPEMAE(model_cfg).to(device)
    optimizer = build_optimizer(model, lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps)
    amp_dtype, use_scaler = precision(device)
    scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None
    state = TrainingState(config=config.to_dict())
    if resume_meta is not None:
        state = load_checkpoint(run_dir, model, optimizer, scaler=scaler)
        state.config = config.to_dict()
        log.info("resumed %s after epoch %d (step %d)", run_dir, state.epoch, state.global_step)
    train_model = model
    if dist.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    schedule = StepSchedule(
        epochs=config.optim.epochs, lr=config.optim.lr, min_lr=config.optim.min_lr,
        warmup_epochs=config.optim.warmup_epochs, weight_decay=config.optim.weight_decay,
        weight_decay_end=config.optim.weight_decay_end, lambda_start=config.masking.lambda_start,
        lambda_end=config.masking.lambda_end,
    )
    if dist.is_main:
        _write_json(run_dir / "data.json", data_record)
        n_params = sum(p.numel() for p in model.parameters())
        overrides = "".join(f" {k}={v}" for k, v in config.model_overrides_dict.items())
        log.info(
            "training model '%s'%s (%.2fM parameters) on %d subjects x %d samples, %d processes, %d steps/epoch, "
            "device %s%s", config.model, overrides, n_params / 1e6, len(subjects), config.data.samples_per_subject,
            dist.world_size, steps_per_epoch, device, f", autocast {amp_dtype}" if amp_dtype else "",
        )
    writer = _tensorboard(run_dir) if dist.is_main else None

    for epoch in range(state.epoch, config.optim.epochs):
        sampler.set_epoch(epoch)
        strategy, make_keep = _masking(config.masking.strategy, epoch)
        bar = _progress_bar(epoch, config.optim.epochs, steps_per_epoch, enabled=dist.is_main and not args.no_progress)
        metrics = train_one_epoch(
            train_model, loader, optimizer, epoch=epoch, steps_per_epoch=steps_per_epoch, schedule=schedule,
            make_keep=make_keep, strategy=strategy, patch=patch, device=device, seed=config.seed, rank=dist.rank,
            world_size=dist.world_size, amp_dtype=amp_dtype, scaler=scaler, grad_clip=config.optim.grad_clip,
            on_step=bar.update if bar else None,
        )
        if bar:
            bar.close()
        state.epoch = epoch + 1
        state.global_step += metrics["steps"]
        state.history.append({"epoch": epoch + 1, **metrics})
        if dist.is_main:
            save_checkpoint(run_dir, model, optimizer, state, scaler=scaler, version=DRoPE.__version__)
            report.write_log_csv(run_dir / "log.csv", state.history)
            if writer is not None:
                for key in ("loss", "loss_visible", "loss_masked", "lr", "wd", "lambda", "samples_per_s", "data_wait_fraction"):
                    writer.add_scalar(f"train/{key}", metrics[key], epoch + 1)
                writer.flush()
            print(
                f"epoch {epoch + 1}/{config.optim.epochs}  loss {metrics['loss']:.5f} (visible {metrics['loss_visible']:.5f}, "
                f"masked {metrics['loss_masked']:.5f})  lr {metrics['lr']:.3g}  {strategy}  {metrics['seconds']:.1f} s  "
                f"{metrics['samples_per_s']:.2f} samples/s  data wait {100 * metrics['data_wait_fraction']:.0f}%",
                flush=True,
            )
        dist.barrier()
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch and epoch + 1 < config.optim.epochs:
            log.info("stopping after epoch %d (--stop-after-epoch); continue with --resume", epoch + 1)
            _write_hash(args, model, dist)
            return 0

    if dist.is_main:
        extra = {"slab": config.data.slab, "training": {"config": config.to_dict(), "epochs": state.epoch, "global_step": state.global_step,
                              "final_loss": state.history[-1]["loss"] if state.history else None,
                              "subjects": len(subjects), "drope_version": DRoPE.__version__}}
        save_model(model, run_dir, extra)
        if state.history:
            report.plot_loss_curve(run_dir / "loss_curve.png", state.history)
        log.info("wrote %s", run_dir / "model.safetensors")
    if writer is not None:
        writer.close()
    _write_hash(args, model, dist)
    dist.barrier()
    return 0


def _loader(dataset, sampler, batch_size: int, workers: int, device, seed: int) -> torch.utils.data.DataLoader:
    # The explicit generator keeps the DataLoader from drawing on the global torch RNG; the samples themselves
    # are seeded per (seed, epoch, subject, draw), so they do not depend on the number of workers.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=tdata.collate_samples,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def _write_hash(args, model, dist) -> None:
    if args.weights_hash:
        path = Path(f"{args.weights_hash}.rank{dist.rank}")
        with atomic_path(path) as tmp:
            tmp.write_text(weights_digest(model) + "\n", encoding="utf-8")


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


class _Bar:
    """tqdm progress bar of one epoch: loss, lr and throughput."""

    def __init__(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False, dynamic_ncols=True)

    def update(self, info: dict) -> None:
        self._bar.set_postfix(loss=f"{info['loss']:.4f}", lr=f"{info['lr']:.2e}", samples_s=f"{info['samples_per_s']:.1f}", refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def _progress_bar(epoch: int, epochs: int, steps: int, *, enabled: bool):
    return _Bar(epoch, epochs, steps) if enabled and sys.stderr.isatty() else None


if __name__ == "__main__":
    code = main()
    try:
        import slicer

        in_slicer = hasattr(slicer, "app")
    except ImportError:
        in_slicer = False
    if in_slicer:
        slicer.util.exit(code)
    else:
        sys.exit(code)
