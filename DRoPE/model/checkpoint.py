"""Model checkpoints: weights in safetensors, architecture and metadata in JSON. No pickle.

A checkpoint is a folder holding ``model.safetensors`` (the state dict) and ``model.json``:
    {"format_version": 1, "drope_version": "...", "config": {ModelConfig fields}, "extra": {...}}
Both files are written atomically (temporary file + os.replace).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..atomic import atomic_path
from .mae import DRoPEMAE, ModelConfig, ModelConfigError

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
META_NAME = "model.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or from an unsupported format."""


def save_model(model: DRoPEMAE, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``model.json`` into ``directory`` (created if needed). Returns the folder.

    extra: JSON-serialisable metadata stored under "extra" (training config, epoch, device, ...).
    Raises CheckpointError when the files cannot be written (full or read-only disk).
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "drope_version": __version__,
        "config": dataclasses.asdict(model.config),
        "extra": extra or {},
    }
    text = json.dumps(meta, indent=2, sort_keys=True)  # fails before anything is written if extra is not JSON-safe
    state = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    try:
        with atomic_path(folder / WEIGHTS_NAME) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "format_version": str(FORMAT_VERSION)})
        with atomic_path(folder / META_NAME) as tmp:
            tmp.write_text(text + "\n")
    except (OSError, SafetensorError) as error:
        raise CheckpointError(f"{folder / WEIGHTS_NAME}: cannot write the model ({error})") from None
    return folder


def read_metadata(path: str | os.PathLike) -> dict:
    """The parsed ``model.json`` of a checkpoint (path = folder, .safetensors or .json file)."""
    _, meta_path = _paths(path)
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: holds a JSON {type(meta).__name__}, not an object; not a DRoPE model checkpoint")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint format_version {version!r} is not supported by DRoPE {__version__} "
            f"(reads <= {FORMAT_VERSION}); update DRoPE"
        )
    if "config" not in meta:
        raise CheckpointError(f"{meta_path}: no 'config' entry; not a DRoPE model checkpoint")
    return meta


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> DRoPEMAE:
    """Rebuild the model from ``model.json`` and load ``model.safetensors``; returned in eval mode on ``device``.

    path: the checkpoint folder, or its .safetensors or .json file.
    """
    weights_path, meta_path = _paths(path)
    meta = read_metadata(meta_path)
    try:
        config = ModelConfig.from_dict(meta["config"])
    except (ModelConfigError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{meta_path}: invalid model config: {err}") from None
    model = DRoPEMAE(config)
    try:
        state = load_file(str(weights_path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise CheckpointError(f"{weights_path}: unreadable weights, corrupt or truncated ({err})") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path}: weights do not match the config in {meta_path.name}: {err}") from None
    return model.to(device).eval()


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: not found; give a checkpoint folder, a .safetensors or a .json file")
    if path.is_dir():
        weights, meta = path / WEIGHTS_NAME, path / META_NAME
    elif path.suffix == ".safetensors":
        weights, meta = path, path.with_suffix(".json")
    elif path.suffix == ".json":
        weights, meta = path.with_suffix(".safetensors"), path
    else:
        raise CheckpointError(f"{path}: expected a checkpoint folder, a .safetensors or a .json file")
    for needed in (weights, meta):
        if not needed.is_file():
            raise CheckpointError(f"{needed}: missing; a checkpoint needs both {WEIGHTS_NAME} and {META_NAME}")
    return weights, meta
