"""Choose the torch device in one place."""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A requested device is not available."""


def select_device(preference: str = "auto") -> torch.device:
    """Return the device to run on.

    preference: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N", or "mps".
    A requested accelerator that is missing raises DeviceError (no silent fallback). The choice is logged once.
    """
    pref = str(preference).strip().lower()
    if pref == "auto":
        if torch.cuda.is_available():
            device, reason = torch.device("cuda"), "auto: CUDA available"
        else:
            device, reason = torch.device("cpu"), "auto: no CUDA device, using CPU"
    elif pref == "cpu":
        device, reason = torch.device("cpu"), "requested"
    elif pref == "cuda" or pref.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {preference!r} requested but CUDA is not available in this torch build or machine "
                f"(torch {torch.__version__}); use 'cpu' or 'auto'"
            )
        device = torch.device(pref)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {preference!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
        reason = "requested"
    elif pref == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' requested but Apple MPS is not available; use 'cpu' or 'auto'")
        device, reason = torch.device("mps"), "requested"
    else:
        raise DeviceError(f"unknown device {preference!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    _log_choice(str(device), reason)
    return device


@functools.lru_cache(maxsize=None)
def _log_choice(device: str, reason: str) -> None:
    logger.info("using device %s (%s)", device, reason)
