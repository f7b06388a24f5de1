"""Protocol drift of scan latents (the paper's Table 7 question, asked on real scans): does a scan's representation
move less when its acquisition protocol changes than between brains?

For each scan: the latent of the full protocol and of K random protocol draws (every b0 kept, a random subset of the
diffusion-weighted volumes whose size is drawn uniformly in [``min_volumes``, W - 1]), each the brain-weighted mean
of the slabs' CLS vectors (``reconstruct.scan_latent``). Euclidean distances, per scan:

- within: mean pairwise distance between the K draws (protocol change, same acquisition);
- session: mean distance of the full-protocol latent to the other scans of its session (the same brain re-acquired,
  e.g. with another slice geometry); NaN when the session has one scan;
- between: mean distance of the full-protocol latent to the scans of the other sessions (other brains);
- ratio_within = within / between and ratio_session = session / between: below 1 when a protocol or geometry change
  moves the representation less than a change of brain. Overall: the same ratios of the means over scans.

Representations: any ``(paths) -> latents`` function; ``encoder_latents`` (a checkpoint, or the same architecture
untrained as a baseline) and ``signal_histogram`` (a non-learned baseline: the histogram of the brain's mean
b0-normalised diffusion-weighted signal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..dwi import DWI
from ..preprocess import brain_mask
from ..reconstruct import scan_latent
from .extract import ExtractError, draw_seed, prepare_subject

HISTOGRAM_BINS = 32  # bins of the signal-histogram baseline over [0, 1]
MIN_VOLUMES = 6  # fewest diffusion-weighted volumes of a draw (a tensor needs 6)


def drift_draw(dwi: DWI, min_volumes: int, seed) -> np.ndarray:
    """(V,) sorted volume indices: every b0 plus a random subset of the W weighted volumes, of a size drawn
    uniformly in [min_volumes, W - 1]. Raises ExtractError when W <= min_volumes."""
    rng = np.random.default_rng(seed)
    weighted = np.flatnonzero(~dwi.gtab.b0s_mask)
    if len(weighted) <= min_volumes:
        raise ExtractError(f"{dwi.source}: {len(weighted)} weighted volumes leave no draw of {min_volumes} to "
                           f"{len(weighted) - 1}; lower the minimum")
    size = int(rng.integers(min_volumes, len(weighted)))
    chosen = rng.choice(weighted, size=size, replace=False)
    return np.sort(np.concatenate([np.flatnonzero(dwi.gtab.b0s_mask), chosen])).astype(np.int64)


@dataclass(frozen=True)
class ScanDraws:
    """One scan's protocols: ``full`` (N,) every volume, ``draws`` K index arrays (see ``drift_draw``)."""

    subject: str
    dwi: DWI
    mask: np.ndarray
    draws: tuple[np.ndarray, ...]

    @property
    def protocols(self) -> list[np.ndarray]:
        """[full, draw 1, ..., draw K]."""
        return [np.arange(self.dwi.n_volumes), *self.draws]


def make_draws(subject: str, dwi: DWI, draws: int, min_volumes: int, seed: int) -> ScanDraws:
    """K seeded draws (seeded by seed, subject and draw index, as ``extract``) and the brain mask of the full scan."""
    picked = tuple(drift_draw(dwi, min_volumes, draw_seed(seed, subject, k)) for k in range(draws))
    return ScanDraws(subject, dwi, brain_mask(dwi), picked)


def encoder_latents(model, slab: int, device="cpu") -> Callable[[ScanDraws], np.ndarray]:
    """Representation: (1 + K, D) CLS latents of the full protocol and the draws (``scan_latent``)."""

    def represent(scan: ScanDraws) -> np.ndarray:
        rows = []
        for index in scan.protocols:
            prep = prepare_subject(scan.dwi, index, model.config.patch_size, scan.mask)
            rows.append(scan_latent(model, prep, slab, device).float().cpu().numpy())
        return np.stack(rows)

    return represent


def signal_histogram(scan: ScanDraws) -> np.ndarray:
    """Baseline representation: (1 + K, HISTOGRAM_BINS) density of the brain's mean b0-normalised weighted signal
    (mean over the protocol's weighted volumes, clipped to [0, 1])."""
    data, gtab = scan.dwi.data, scan.dwi.gtab
    b0 = data[..., gtab.b0s_mask].mean(-1)
    inside = scan.mask & (b0 > 0)
    rows = []
    for index in scan.protocols:
        weighted = index[~gtab.b0s_mask[index]]
        mean = np.clip(data[inside][:, weighted].mean(-1) / b0[inside], 0.0, 1.0)
        rows.append(np.histogram(mean, bins=HISTOGRAM_BINS, range=(0.0, 1.0), density=True)[0])
    return np.stack(rows)


def _pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(n, D), (m, D) -> (n, m) Euclidean distances."""
    return np.linalg.norm(a[:, None] - b[None], axis=-1)


def drift_rows(latents: dict[str, np.ndarray], sessions: dict[str, str]) -> list[dict]:
    """Per-scan distances and ratios (see the module docstring) and a final "overall" row.

    latents: {subject: (1 + K, D)} full protocol first, then the K draws; sessions: {subject: session}.
    """
    subjects = list(latents)
    full = np.stack([latents[s][0] for s in subjects])
    rows = []
    for i, s in enumerate(subjects):
        draws = latents[s][1:]
        k = len(draws)
        within = _pairwise(draws, draws)[np.triu_indices(k, 1)].mean() if k > 1 else np.nan
        to_full = _pairwise(draws, latents[s][:1]).mean() if k else np.nan
        same = [j for j, t in enumerate(subjects) if t != s and sessions[t] == sessions[s]]
        other = [j for j, t in enumerate(subjects) if sessions[t] != sessions[s]]
        distance = _pairwise(full[i : i + 1], full)[0]
        session = distance[same].mean() if same else np.nan
        between = distance[other].mean() if other else np.nan
        rows.append({"scan": s, "session": sessions[s], "draws": k, "within": within, "draws_to_full": to_full,
                     "session_other_scans": session, "between_brains": between,
                     "ratio_within": _ratio(within, between), "ratio_session": _ratio(session, between)})
    means = {key: float(np.nanmean([r[key] for r in rows])) for key in
             ("within", "draws_to_full", "session_other_scans", "between_brains")}
    rows.append({"scan": "overall", "session": "", "draws": rows[0]["draws"] if rows else 0, **means,
                 "ratio_within": _ratio(means["within"], means["between_brains"]),
                 "ratio_session": _ratio(means["session_other_scans"], means["between_brains"])})
    return rows


def _ratio(a: float, b: float) -> float:
    """a / b, NaN where b is 0 (identical scans listed in two sessions) or NaN."""
    return float(a) / float(b) if b > 0 else np.nan


def session_of(path, subject: str, given: dict[str, str] | None = None) -> str:
    """A scan's session: ``given[subject]`` (or given[path]) when listed, else the ``dcm_qa_*`` source folder above
    it (every series of one source is one volunteer in one session), else the scan itself."""
    given = given or {}
    for key in (subject, str(path)):
        if key in given:
            return given[key]
    parts = [p for p in str(path).replace("\\", "/").split("/") if p.startswith("dcm_qa_")]
    return parts[-1] if parts else subject


def drift_figure(results: dict[str, list[dict]], latents: dict[str, np.ndarray], sessions: dict[str, str], title: str):
    """Left: per-scan ratio_within (bars, one colour per representation) and ratio_session (black markers) for the
    first representation; right: PCA of the first representation's latents (full protocol: large, draws: small),
    coloured by session."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .figures import pca_2d

    fig = Figure(figsize=(13, 5), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    names = list(results)
    scans = [r["scan"] for r in results[names[0]]]
    width = 0.8 / len(names)
    for n, name in enumerate(names):
        values = [r["ratio_within"] for r in results[name]]
        left.bar(np.arange(len(scans)) + (n - (len(names) - 1) / 2) * width, values, width, label=f"{name}: within / between")
    first = results[names[0]]
    left.scatter(range(len(scans)), [r["ratio_session"] for r in first], color="k", marker="D", zorder=3,
                 label=f"{names[0]}: same session, other scans / between")
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xticks(range(len(scans)), scans, rotation=35, ha="right", fontsize=7)
    left.set_ylabel("distance ratio (below 1: moves less than between brains)")
    left.legend(fontsize=7)
    subjects = list(latents)
    stacked = np.concatenate([latents[s] for s in subjects])
    points, explained = pca_2d(stacked)
    start = 0
    colours = {s: f"C{i % 10}" for i, s in enumerate(dict.fromkeys(sessions[t] for t in subjects))}
    for s in subjects:
        n = len(latents[s])
        block = points[start : start + n]
        right.scatter(block[1:, 0], block[1:, 1], s=12, color=colours[sessions[s]], alpha=0.6)
        right.scatter(block[:1, 0], block[:1, 1], s=60, color=colours[sessions[s]], edgecolor="k")
        start += n
    for session, colour in colours.items():
        right.scatter([], [], color=colour, label=session)
    right.legend(fontsize=7)
    right.set_xlabel(f"PC1 ({explained[0]:.0%})")
    right.set_ylabel(f"PC2 ({explained[1]:.0%})")
    right.set_title(f"{names[0]} latents (large: full protocol, small: draws)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig


def untrained_like(model, seed: int = 0):
    """The same architecture freshly initialised (seeded): the untrained-encoder baseline."""
    torch.manual_seed(seed)
    fresh = type(model)(model.config).to(next(model.parameters()).device)
    return fresh.eval()


def represent_all(scans: Sequence[ScanDraws], represent: Callable[[ScanDraws], np.ndarray]) -> dict[str, np.ndarray]:
    """{subject: (1 + K, D)} for every scan."""
    return {scan.subject: represent(scan) for scan in scans}
