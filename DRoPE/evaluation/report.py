"""Evaluation outputs: CSV / JSON tables, Markdown reports and PNG figures (Agg, no pyplot state)."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..overview import MD_DISPLAY_MAX, grey_style, save_figure

SIGNAL_METRICS = ("psnr_masked", "ssim_masked", "psnr_whole", "ssim_whole", "mse_masked", "psnr_masked_half")
DTI_METRICS = ("fa_mae_wm", "md_mae_wm", "fa_mae_brain", "md_mae_brain")


def write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def write_json(path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def write_csv(path, rows: Sequence[dict], columns: Sequence[str] | None = None) -> Path:
    """Rows of dicts as CSV (columns: the given ones, else the union of keys in first-seen order)."""
    if columns is None:
        columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return write_text(path, buffer.getvalue())


def _cell(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def mean_std(values: Iterable) -> tuple[float | None, float | None, int]:
    """Mean and population std of the finite, non-None values, and their count."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None, 0
    return float(np.mean(finite)), float(np.std(finite)), len(finite)


def summarise(rows: Sequence[dict], group_keys: Sequence[str], metric_keys: Sequence[str]) -> list[dict]:
    """Mean / std over rows sharing ``group_keys`` (e.g. model, shell): keys METRIC_mean, METRIC_std, n."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in group_keys), []).append(row)
    out = []
    for key, members in groups.items():
        summary = dict(zip(group_keys, key))
        summary["n"] = len(members)
        for metric in metric_keys:
            mean, std, _ = mean_std(row.get(metric) for row in members)
            summary[f"{metric}_mean"], summary[f"{metric}_std"] = mean, std
        out.append(summary)
    return out


def fmt(mean, std=None, digits: int = 3) -> str:
    if mean is None:
        return "n/a"
    if std is None:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _shell_order(shell: str) -> tuple:
    return (1, 0.0) if shell == "dw" else (0, float(shell))


def table1(signal_summary: Sequence[dict], fid: dict, fid_label: str) -> str:
    """Markdown Table 1: per shell and model, PSNR / SSIM on masked patches (mean ± std over subjects) and FID."""
    rows = []
    for s in sorted(signal_summary, key=lambda r: (_shell_order(r["shell"]), r["model"])):
        rows.append([
            "all DW" if s["shell"] == "dw" else f"b={s['shell']}", s["model"], s["n"],
            fmt(s["psnr_masked_mean"], s["psnr_masked_std"], 2), fmt(s["ssim_masked_mean"], s["ssim_masked_std"], 3),
            fmt(s["psnr_whole_mean"], s["psnr_whole_std"], 2), fmt(s["ssim_whole_mean"], s["ssim_whole_std"], 3),
            fmt(fid.get(s["model"], {}).get(s["shell"]), None, 2),
        ])
    header = ["shell", "model", "subjects", "PSNR masked (dB)", "SSIM masked", "PSNR whole (dB)", "SSIM whole", fid_label]
    return markdown_table(header, rows)


def table2(dti_summary: Sequence[dict]) -> str:
    """Markdown Table 2: FA and MD errors (white matter and brain), mean ± std over subjects."""
    rows = [
        [s["model"], s["n"], fmt(s["fa_mae_wm_mean"], s["fa_mae_wm_std"]), fmt(s["md_mae_wm_mean"], s["md_mae_wm_std"]),
         fmt(s["fa_mae_brain_mean"], s["fa_mae_brain_std"]), fmt(s["md_mae_brain_mean"], s["md_mae_brain_std"])]
        for s in dti_summary
    ]
    header = ["model", "subjects", "FA error (WM)", "MD error (WM, 1e-3 mm²/s)", "FA error (brain)", "MD error (brain, 1e-3 mm²/s)"]
    return markdown_table(header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _centre_slice(mask: np.ndarray) -> int:
    """Axial index through the middle of the mask's bounding box (of the grid when the mask is empty)."""
    zs = np.flatnonzero(np.asarray(mask).any(axis=(0, 1)))
    return int((zs[0] + zs[-1]) // 2) if len(zs) else mask.shape[2] // 2


def slice_grid(rows, voxel_size, z: int, title: str = ""):
    """A grid of axial slices: rows of (name, volume (X, Y, Z), imshow style) cells, shown in neurological view
    (patient's right on the right, anterior up), each with a colour bar. No constrained layout (fast)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig = Figure(figsize=(3.2 * n_cols, 3.0 * n_rows + 0.4))
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.02, right=0.94, bottom=0.02, top=1 - 0.45 / (3.0 * n_rows + 0.4), wspace=0.25, hspace=0.25)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    aspect = voxel_size[1] / voxel_size[0]
    for r, row in enumerate(rows):
        for c in range(n_cols):
            axis = axes[r, c]
            axis.set_axis_off()
            if c >= len(row):
                continue
            name, volume, style = row[c]
            shown = axis.imshow(np.swapaxes(np.asarray(volume)[:, :, z], 0, 1), origin="lower", aspect=aspect,
                                interpolation="nearest", **style)
            axis.set_title(name, fontsize=8)
            fig.colorbar(shown, ax=axis, fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def montage_figure(result, original: np.ndarray, recon: np.ndarray, title: str = ""):
    """One row per shell (its first volume, at most 3 shells): encoder input (visible patches), original,
    reconstruction and |error| of the normalised signal, on the middle axial slice of the brain."""
    shells = result.dwi.gtab.shell_bvals
    order = [int(np.flatnonzero(shells == b)[0]) for b in np.unique(shells) if b > 0][:3] or [0]
    rows = []
    for k in order:
        style = dict(cmap="gray", vmin=0, vmax=max(grey_style(original[..., k])["vmax"], 1e-6))
        label = f"vol {result.volume_index[k]}, b={shells[k]:g}"
        rows.append([
            (f"encoder input, {label}", original[..., k] * result.visible[..., k], style),
            ("original", original[..., k], style),
            ("reconstruction", recon[..., k], style),
            ("|error|", np.abs(recon[..., k] - original[..., k]), dict(cmap="hot", vmin=0, vmax=style["vmax"] / 2)),
        ])
    return slice_grid(rows, result.dwi.voxel_size, _centre_slice(result.mask), title)


def dti_error_figure(result, title: str = ""):
    """FA of the original and the reconstruction and |FA error|; MD of both and |MD error| (1e-3 mm^2/s)."""
    maps = result.maps
    md = dict(cmap="magma", vmin=0, vmax=MD_DISPLAY_MAX)
    rows = [
        [("FA, original", maps["fa"], dict(cmap="gray", vmin=0, vmax=1)),
         ("FA, reconstruction", maps["fa_recon"], dict(cmap="gray", vmin=0, vmax=1)),
         ("|FA error|", maps["fa_error"], dict(cmap="hot", vmin=0, vmax=0.3))],
        [("MD, original (1e-3 mm$^2$/s)", maps["md"] * 1e3, md),
         ("MD, reconstruction", maps["md_recon"] * 1e3, md),
         ("|MD error| (1e-3 mm$^2$/s)", maps["md_error"] * 1e3, dict(cmap="hot", vmin=0, vmax=MD_DISPLAY_MAX / 3))],
    ]
    return slice_grid(rows, result.dwi.voxel_size, _centre_slice(result.mask), title)


def tract_bar_figure(tract_summary: Sequence[dict]):
    """Grouped horizontal bars of FA and MD error per tract and model (mean ± std over subjects)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tracts = sorted({r["tract"] for r in tract_summary})
    models = list(dict.fromkeys(r["model"] for r in tract_summary))
    lookup = {(r["tract"], r["model"]): r for r in tract_summary}
    fig = Figure(figsize=(11, 0.35 * max(len(tracts), 4) * max(1, len(models) / 2) + 1.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    height = 0.8 / max(len(models), 1)
    y = np.arange(len(tracts))
    for axis, (metric, label) in zip(axes, (("fa_mae", "FA error"), ("md_mae", "MD error (1e-3 mm$^2$/s)"))):
        for m, model in enumerate(models):
            means = [lookup.get((t, model), {}).get(f"{metric}_mean") or 0.0 for t in tracts]
            stds = [lookup.get((t, model), {}).get(f"{metric}_std") or 0.0 for t in tracts]
            axis.barh(y + m * height, means, height, xerr=stds, label=model)
        axis.set_xlabel(label)
        axis.set_yticks(y + height * (len(models) - 1) / 2, [t.replace("WM_", "").replace("_", " ") for t in tracts], fontsize=8)
        axis.invert_yaxis()
    axes[0].legend(fontsize=8)
    fig.suptitle("DTI errors per white-matter tract")
    return fig


def shell_bar_figure(signal_summary: Sequence[dict]):
    """PSNR and SSIM on masked patches per shell and model."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shells = sorted({r["shell"] for r in signal_summary}, key=_shell_order)
    models = list(dict.fromkeys(r["model"] for r in signal_summary))
    lookup = {(r["shell"], r["model"]): r for r in signal_summary}
    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(shells))
    for axis, metric, label in ((axes[0], "psnr_masked", "PSNR, masked patches (dB)"), (axes[1], "ssim_masked", "SSIM, masked patches")):
        for m, model in enumerate(models):
            means = [lookup.get((s, model), {}).get(f"{metric}_mean") or 0.0 for s in shells]
            stds = [lookup.get((s, model), {}).get(f"{metric}_std") or 0.0 for s in shells]
            axis.bar(x + m * width, means, width, yerr=stds, label=model)
        axis.set_xticks(x + width * (len(models) - 1) / 2, ["all DW" if s == "dw" else f"b={s}" for s in shells])
        axis.set_ylabel(label)
    axes[0].legend(fontsize=8)
    return fig


def save(fig, path) -> Path:
    return save_figure(fig, path)
