"""Masking strategies for masked-autoencoder pretraining.

Every strategy has one signature, ``(B, V, P, *, generator=None, device=None) -> keep``, with keep a (B, V, P) bool
tensor, True = visible (given to the encoder), False = removed (to be reconstructed). Randomness comes only from
``generator`` (a torch.Generator; when given, the mask is made on its device unless ``device`` says otherwise).

Counts are exact: a strategy that removes a fraction r of n items keeps ``max(1, n - floor(r n))`` of them, so
every (b, v) row of a spatial mask keeps the same number of patches and every batch element of a diffusion mask
keeps the same number of volumes (the encoder packs them without padding).
"""

from __future__ import annotations

import math

import torch

SPATIAL_RATIO = 0.75  # fraction of patches removed, drawn independently per volume
DIFFUSION_RATIO = 0.5  # fraction of volumes removed entirely


class MaskingError(ValueError):
    """Unknown masking strategy or invalid ratio."""


def n_kept(n: int, ratio: float) -> int:
    """How many of n items stay visible when a fraction ``ratio`` is removed: max(1, n - floor(ratio n))."""
    if not 0.0 <= ratio < 1.0:
        raise MaskingError(f"mask ratio must be in [0, 1) (fraction removed), got {ratio}")
    return max(1, n - math.floor(ratio * n + 1e-9))


def _first_k(noise: torch.Tensor, k: int) -> torch.Tensor:
    """True at the k smallest entries of noise along the last axis."""
    ids = noise.argsort(dim=-1)[..., :k]
    return torch.zeros_like(noise, dtype=torch.bool).scatter(-1, ids, True)


def _device(generator, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def fixed_ratio_spatial_mask(B: int, V: int, P: int, ratio: float = SPATIAL_RATIO, *, generator=None, device=None):
    """Remove a fraction ``ratio`` of the patches of each volume, drawn independently per (b, v).

    Returns keep (B, V, P) bool, True = visible; each (b, v) row keeps exactly ``n_kept(P, ratio)`` patches.
    Used for evaluation with a chosen ratio (e.g. 0.75 removed, as in the paper's reconstruction test).
    """
    k = n_kept(P, ratio)
    noise = torch.rand(B, V, P, generator=generator, device=_device(generator, device))
    return _first_k(noise, k)


def spatial_mask(B: int, V: int, P: int, *, generator=None, device=None) -> torch.Tensor:
    """Keep 25% of the patches of each volume (75% removed), drawn independently per volume. (B, V, P) bool."""
    return fixed_ratio_spatial_mask(B, V, P, SPATIAL_RATIO, generator=generator, device=device)


def diffusion_mask(B: int, V: int, P: int, *, generator=None, device=None) -> torch.Tensor:
    """Keep 50% of the volumes entirely (at least one), drawn per batch element. (B, V, P) bool, True = visible."""
    k = n_kept(V, DIFFUSION_RATIO)
    noise = torch.rand(B, V, generator=generator, device=_device(generator, device))
    return _first_k(noise, k)[..., None].expand(B, V, P).contiguous()


MASKING = {"spatial": spatial_mask, "diffusion": diffusion_mask}
STRATEGIES = (*MASKING, "alternating")


def strategy_for_epoch(name: str, epoch: int) -> str:
    """Resolve a strategy name for one epoch: "alternating" -> "spatial" on even epochs, "diffusion" on odd ones
    (it switches every epoch, counting from 0); "spatial" and "diffusion" are returned unchanged."""
    if name == "alternating":
        return "spatial" if epoch % 2 == 0 else "diffusion"
    if name not in MASKING:
        raise MaskingError(f"unknown masking strategy {name!r}; choose one of {', '.join(STRATEGIES)}")
    return name
