"""A PNG overview of a DTI result: mid axial / coronal / sagittal slices of mean b0, colour FA, FA and MD.

Maps are canonical (RAS+) arrays (X, Y, Z); slices are shown in neurological view: the
patient's right on the right of the axial and coronal panels, anterior on the right of the sagittal panels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path

MD_DISPLAY_MAX = 3.0  # 1e-3 mm^2/s; free water at 37 C is about 3.0
VIEWS = ("axial", "coronal", "sagittal")


def colour_fa(fa: np.ndarray, v1_world: np.ndarray) -> np.ndarray:
    """RGB = |V1| * FA, red = left-right, green = anterior-posterior, blue = superior-inferior.

    fa: (X, Y, Z); v1_world: (X, Y, Z, 3) principal eigenvector in world RAS components -> (X, Y, Z, 3) in [0, 1].
    """
    return np.clip(np.abs(v1_world) * np.clip(fa, 0, 1)[..., None], 0, 1)


def _slices(volume: np.ndarray, centre, voxel_size) -> list[tuple[np.ndarray, float]]:
    """(image for imshow with origin='lower', aspect) for the axial, coronal and sagittal planes through ``centre``."""
    x, y, z = centre
    vx, vy, vz = voxel_size
    return [
        (np.swapaxes(volume[:, :, z], 0, 1), vy / vx),
        (np.swapaxes(volume[:, y, :], 0, 1), vz / vx),
        (np.swapaxes(volume[x, :, :], 0, 1), vz / vy),
    ]


def _centre(mask: np.ndarray | None, shape) -> tuple[int, int, int]:
    """Centre of the mask's bounding box (of the grid when the mask is empty or None)."""
    if mask is None or not mask.any():
        return tuple(n // 2 for n in shape[:3])
    index = np.argwhere(mask)
    return tuple(int(c) for c in (index.min(axis=0) + index.max(axis=0)) // 2)


def overview_figure(mean_b0, fa, md, v1_world, voxel_size, *, mask=None, title: str = ""):
    """Build the figure (4 rows: mean b0, colour FA, FA, MD (1e-3 mm^2/s); 3 columns: axial, coronal, sagittal).

    All maps are (X, Y, Z) canonical arrays, v1_world (X, Y, Z, 3); mask (X, Y, Z) bool picks the slices.
    Returns a matplotlib Figure (Agg, no pyplot state).
    """
    rows = [
        ("mean b0", mean_b0, grey_style(mean_b0)),
        ("colour FA (R: L-R, G: A-P, B: S-I)", colour_fa(fa, v1_world), {}),
        ("FA", fa, dict(cmap="gray", vmin=0, vmax=1)),
        ("MD (1e-3 mm$^2$/s)", np.asarray(md) * 1e3, dict(cmap="magma", vmin=0, vmax=MD_DISPLAY_MAX)),
    ]
    return panel_figure(rows, voxel_size, mask=mask, title=title)


def panel_figure(rows, voxel_size, *, mask=None, title: str = ""):
    """A grid of mid-brain slices: one row per (name, volume (X, Y, Z) or RGB (X, Y, Z, 3), imshow style dict),
    columns axial, coronal, sagittal through the centre of ``mask``. Rows with a style get a colour bar."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    centre = _centre(mask, np.shape(rows[0][1])[:3])
    fig = Figure(figsize=(10, 3.1 * len(rows) + 0.1), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(VIEWS), squeeze=False)
    for row, (name, volume, style) in enumerate(rows):
        for col, (image, aspect) in enumerate(_slices(np.asarray(volume), centre, voxel_size)):
            ax = axes[row, col]
            shown = ax.imshow(image, origin="lower", aspect=aspect, interpolation="nearest", **style)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}, {VIEWS[col]}", fontsize=9)
        if style:
            fig.colorbar(shown, ax=list(axes[row]), shrink=0.8)
    if title:
        fig.suptitle(title)
    return fig


def grey_style(volume) -> dict:
    """Grey-scale style from 0 to the 99.5th percentile of the positive values."""
    values = np.asarray(volume, dtype=np.float64)
    top = float(np.percentile(values[values > 0], 99.5)) if np.any(values > 0) else 1.0
    return dict(cmap="gray", vmin=0, vmax=top)


def save_figure(fig, path) -> Path:
    """Write a figure as PNG, atomically. Returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    return path


def save_overview(path, mean_b0, fa, md, v1_world, voxel_size, *, mask=None, title: str = "") -> Path:
    """Write the overview (see ``overview_figure``) as a PNG, atomically. Returns the path."""
    return save_figure(overview_figure(mean_b0, fa, md, v1_world, voxel_size, mask=mask, title=title), path)
