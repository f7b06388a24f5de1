"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is two files in the run folder, each written atomically (temporary file + rename):

- ``checkpoint.safetensors``: ``model/<name>`` (model state dict), ``optimizer/<param index>/<key>`` (tensor
  entries of the optimizer state, e.g. AdamW ``step``, ``exp_avg``, ``exp_avg_sq``), ``rng/torch`` (CPU generator
  state, uint8) and ``rng/cuda/<device>`` (CUDA generator states, uint8). Its metadata ``checkpoint_json`` holds
  the same JSON as ``checkpoint.json``, so the tensor file alone is complete.
- ``checkpoint.json``: format and project version, completed epochs, global step (the schedules' position),
  the training config, optimizer param groups and non-tensor state, GradScaler state, python and numpy RNG
  states, the per-epoch history (``log.csv`` is rewritten from it) and a random ``checkpoint_id`` shared with
  the tensor file.

If a run is killed between the two renames, the JSON belongs to the previous save: the loader notices the
different ``checkpoint_id`` and trusts the copy embedded in the tensor file.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from DRoPE.atomic import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "drope-train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CHECKPOINT_TENSORS = "checkpoint.safetensors"
CHECKPOINT_JSON = "checkpoint.json"


class CheckpointError(ValueError):
    """A training checkpoint cannot be written or resumed; the message names the file and the fix."""


@dataclass
class TrainingState:
    """What a resumed run needs besides the weights: position, history, RNG, config."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps done
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, JSON) of the torch (CPU + CUDA), python and numpy global generators."""
    tensors = {"rng/torch": torch.get_rng_state().clone()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{index}"] = state.clone()
    version, internal, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    numpy_json = {
        "bit_generator": numpy_state["bit_generator"],
        "state": {"key": numpy_state["state"]["key"].tolist(), "pos": int(numpy_state["state"]["pos"])},
        "has_gauss": int(numpy_state["has_gauss"]),
        "gauss": float(numpy_state["gauss"]),
    }
    return tensors, {"python": [version, list(internal), gauss], "numpy": numpy_json}


def set_rng_state(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved (CUDA states only where this machine has those devices)."""
    torch.set_rng_state(tensors["rng/torch"].to(torch.uint8).cpu())
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        for key in cuda:
            index = int(key.rsplit("/", 1)[1])
            if index < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[key].to(torch.uint8).cpu(), index)
    version, internal, gauss = data["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    numpy_state = dict(data["numpy"])
    numpy_state["state"] = {"key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32), "pos": numpy_state["state"]["pos"]}
    np.random.set_state(numpy_state)


def _json_safe(value):
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainingState,
    *,
    scaler: torch.amp.GradScaler | None = None,
    version: str = "",
) -> Path:
    """Write ``checkpoint.safetensors`` then ``checkpoint.json`` atomically into ``run_dir``; returns the JSON path.

    Raises CheckpointError (the last complete checkpoint kept) when they cannot be written, e.g. on a full disk.
    """
    run_dir = Path(run_dir)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in _unwrap(model).state_dict().items():
        tensors[f"model/{name}"] = value.detach().cpu().clone().contiguous()
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in opt["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value.detach().cpu().clone().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = _json_safe(value)
    rng_tensors, rng_json = rng_state()
    tensors.update(rng_tensors)
    checkpoint_id = uuid.uuid4().hex
    meta = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "drope_version": version,
        "checkpoint_id": checkpoint_id,
        "epoch": int(state.epoch),
        "global_step": int(state.global_step),
        "config": state.config,
        "optimizer": {"param_groups": _json_safe(opt["param_groups"]), "state": scalars},
        "scaler": _json_safe(scaler.state_dict()) if scaler is not None and scaler.is_enabled() else None,
        "rng": rng_json,
        "history": _json_safe(state.history),
        "extra": _json_safe(state.extra),
    }
    text = json.dumps(meta, indent=1, allow_nan=True)
    try:
        with atomic_path(run_dir / CHECKPOINT_TENSORS) as tmp:
            save_file(tensors, str(tmp), metadata={"checkpoint_json": text, "checkpoint_id": checkpoint_id})
        with atomic_path(run_dir / CHECKPOINT_JSON) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except (OSError, SafetensorError) as error:
        raise CheckpointError(
            f"{run_dir / CHECKPOINT_TENSORS}: cannot write the checkpoint ({error}); the last complete checkpoint is "
            "kept: free disk space and continue with --resume"
        ) from None
    return run_dir / CHECKPOINT_JSON


def has_checkpoint(run_dir: Path) -> bool:
    return (Path(run_dir) / CHECKPOINT_TENSORS).is_file()


def read_checkpoint_meta(run_dir: Path) -> dict[str, Any]:
    """The checkpoint's JSON (the copy embedded in the tensor file wins if the two files disagree)."""
    tensors_path = Path(run_dir) / CHECKPOINT_TENSORS
    json_path = Path(run_dir) / CHECKPOINT_JSON
    try:
        with safe_open(str(tensors_path), framework="pt") as handle:
            embedded = (handle.metadata() or {}).get("checkpoint_json")
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(
            f"{tensors_path}: unreadable checkpoint ({error}); delete checkpoint.* to restart the run"
        ) from None
    if embedded is None:
        raise CheckpointError(f"{tensors_path}: not a DRoPE training checkpoint (no checkpoint_json metadata)")
    meta = json.loads(embedded)
    if json_path.is_file():
        try:
            on_disk = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            on_disk = None
        if not on_disk or on_disk.get("checkpoint_id") != meta.get("checkpoint_id"):
            log.warning("%s is from another save than %s (run killed while saving); using the latter", json_path, tensors_path)
    if meta.get("format") != CHECKPOINT_FORMAT or meta.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{tensors_path}: checkpoint format {meta.get('format')} v{meta.get('format_version')} is not "
            f"{CHECKPOINT_FORMAT} v{CHECKPOINT_FORMAT_VERSION}; resume it with the DRoPE version that wrote it "
            f"({meta.get('drope_version')})"
        )
    return meta


def load_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    restore_rng: bool = True,
) -> TrainingState:
    """Load weights, optimizer, scaler and (optionally) RNG states saved by ``save_checkpoint``."""
    run_dir = Path(run_dir)
    meta = read_checkpoint_meta(run_dir)
    path = run_dir / CHECKPOINT_TENSORS
    tensors = load_file(str(path), device="cpu")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        _unwrap(model).load_state_dict(model_state, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{path}: the weights do not fit the model built from the config ({' '.join(str(error).split())[:300]})"
        ) from None
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta["optimizer"]["state"].items():
        state.setdefault(int(index), {}).update(entries)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{path}: the optimizer state does not fit this model ({error})") from None
    if scaler is not None and scaler.is_enabled() and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return TrainingState(
        epoch=int(meta["epoch"]),
        global_step=int(meta["global_step"]),
        history=list(meta.get("history", [])),
        config=meta.get("config", {}),
        extra=meta.get("extra", {}),
    )
