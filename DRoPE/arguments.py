"""Checks of command-line values shared by ``python -m DRoPE`` and the DRoPETrain scripts.

The commands run them before any computation. Each raises ArgumentError (a DWIError, so every command reports it
as one line on stderr with exit code 2) whose message names the flag, the value and the problem.
"""

from __future__ import annotations

import os
from pathlib import Path

from .gradients import DWIError


class ArgumentError(DWIError):
    """A command-line value that cannot work: out of range, a missing input file, an output path that cannot be written."""


def in_range(value, flag: str, low, high=None) -> None:
    """Raise unless ``value`` is None (not given) or in [low, high) (high None: no upper bound)."""
    if value is None:
        return
    if high is None and value < low:
        raise ArgumentError(f"{flag} must be >= {low}, got {value}")
    if high is not None and not low <= value < high:
        raise ArgumentError(f"{flag} must be in [{low}, {high}), got {value}")


def scan_flags(args) -> None:
    """Check ``--volumes``, ``--seed`` and ``--slab`` of a command that reads scans slab by slab (reconstruct,
    evaluate, probe extract / finetune)."""
    in_range(args.volumes, "--volumes", 1)
    in_range(args.seed, "--seed", 0)
    in_range(args.slab, "--slab", 1)


def input_file(path, flag: str) -> None:
    """Raise unless ``path`` is None (not given) or an existing file."""
    if path is not None and not Path(path).is_file():
        problem = "is a folder, not a file" if Path(path).is_dir() else "file not found"
        raise ArgumentError(f"{flag} {path}: {problem}")


def model_checkpoint(path, flag: str) -> None:
    """Raise unless ``path`` is a model checkpoint (folder, .safetensors or .json) whose model.json reads; the weights
    themselves are read when the model is built."""
    from .model.checkpoint import CheckpointError, read_metadata

    try:
        read_metadata(path)
    except CheckpointError as error:
        raise ArgumentError(f"{flag} {error}") from None


def output_folder(path, flag: str) -> None:
    """Raise unless ``path`` is a folder, or can be made one, that this process may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ArgumentError(f"{flag} {path}: exists and is not a folder; give a folder path")
    _check_writable(path, path, flag)


def output_file(path, flag: str) -> None:
    """Raise unless ``path`` names a file (new or existing, not a folder) in a folder this process may write into."""
    path = Path(path)
    if path.is_dir():
        raise ArgumentError(f"{flag} {path}: is a folder; give a file name")
    _check_writable(path.parent, path, flag)


def _check_writable(folder: Path, path: Path, flag: str) -> None:
    """The nearest existing one of ``folder`` and its parents must be a folder this process may write into."""
    existing = folder.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ArgumentError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ArgumentError(f"{flag} {path}: cannot write into {existing} (read-only or not permitted)")
