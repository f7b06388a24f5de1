"""Acquisition-protocol utilities: seeded volume subsets and a JSON-safe protocol summary."""

from __future__ import annotations

import numpy as np

from .gradients import GradientTable, GradientTableError


def pick_volumes(
    gtab: GradientTable, k: int, seed: int | np.random.Generator | None, include_b0: bool = True
) -> np.ndarray:
    """Choose ``k`` distinct volumes at random. Returns (k,) int indices into the table, sorted ascending.

    include_b0=True: the subset holds at least one b0 (drawn first, at random among the b0s, so the signal can
    still be normalised); the other k-1 are drawn uniformly from all remaining volumes.
    include_b0=False: all k are drawn from the diffusion-weighted volumes only.
    The same ``seed`` (int) on the same table always gives the same indices.
    """
    rng = np.random.default_rng(seed)
    b0 = np.flatnonzero(gtab.b0s_mask)
    dw = np.flatnonzero(~gtab.b0s_mask)
    pool = len(gtab) if include_b0 else len(dw)
    if not 1 <= k <= pool:
        kind = "volumes" if include_b0 else "diffusion-weighted volumes"
        raise GradientTableError(f"{_where(gtab)}cannot pick {k} volumes: the table has {pool} {kind}")
    if include_b0 and len(b0) == 0:
        raise GradientTableError(f"{_where(gtab)}cannot include a b0: the table has no b0 volume")
    if not include_b0:
        return np.sort(rng.choice(dw, size=k, replace=False))
    first = rng.choice(b0)
    rest = np.setdiff1d(np.arange(len(gtab)), [first])
    return np.sort(np.concatenate([[first], rng.choice(rest, size=k - 1, replace=False)])).astype(np.int64)


def describe_protocol(gtab: GradientTable) -> dict:
    """JSON-safe summary of a table.

    Returns {"n_volumes", "n_b0", "max_b" (s/mm^2), "n_directions" (distinct axes over all shells),
    "shells": [{"b", "count", "directions"}, ...] sorted by b}.
    """
    shells = []
    for shell in gtab.shells:
        in_shell = gtab.shell_bvals == shell
        shells.append(
            {"b": float(shell), "count": int(in_shell.sum()), "directions": gtab.select(in_shell).n_directions}
        )
    return {
        "n_volumes": len(gtab),
        "n_b0": int(gtab.b0s_mask.sum()),
        "max_b": float(gtab.bvals.max()),
        "n_directions": int(gtab.n_directions),
        "shells": shells,
    }


def _where(gtab: GradientTable) -> str:
    return f"{gtab.source}: " if gtab.source else ""
