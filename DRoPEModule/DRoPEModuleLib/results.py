"""Load everything the engine wrote into its output folder as MRML nodes on the input's grid."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import mrml_io

logger = logging.getLogger(__name__)

# output file -> (result attribute, node name suffix, display kind)
SCALAR_OUTPUTS = {
    "fa.nii.gz": ("fa", "FA", "fa"),
    "md.nii.gz": ("md", "MD", "md"),
    "fa_recon.nii.gz": ("fa_recon", "FA reconstructed", "fa"),
    "md_recon.nii.gz": ("md_recon", "MD reconstructed", "md"),
    "fa_error.nii.gz": ("fa_error", "FA error", "error"),
    "md_error.nii.gz": ("md_error", "MD error", "error"),
    "attention.nii.gz": ("attention", "attention", "attention"),
}
# written only with --draws K > 1 (never listed as missing)
UNCERTAINTY_OUTPUTS = {"fa_std.nii.gz": ("fa_std", "FA std", "error")}
RECONSTRUCTION_STD = "reconstruction_std.nii.gz"  # (I, J, K, N) on the input grid, kept as an array
RECONSTRUCTION = "reconstruction.nii.gz"
DIFFUSION_ATTENTION = "diffusion_attention.csv"
LATENT = "latent.npy"
PREDICTION = "prediction.json"
SUMMARY = "summary.json"


class ResultsError(ValueError):
    """The output folder does not hold a usable result."""


@dataclass
class ReconstructionResults:
    """Node references and values loaded from one engine run (missing outputs are None and listed in ``missing``)."""

    out_dir: Path
    reconstruction: object = None
    fa: object = None
    md: object = None
    fa_recon: object = None
    md_recon: object = None
    fa_error: object = None
    md_error: object = None
    attention: object = None
    fa_std: object = None
    reconstruction_std: np.ndarray | None = None  # (K, J, I, N), node array order
    diffusion_attention: object = None  # vtkMRMLTableNode: the CSV as written
    diffusion_attention_profile: object = None  # vtkMRMLTableNode: attention received per key volume
    diffusion_attention_chart: object = None  # vtkMRMLPlotChartNode
    latent: np.ndarray | None = None
    prediction: dict | None = None
    summary: dict = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    off_grid: list[str] = field(default_factory=list)  # outputs whose grid differs from the input's
    # set by DRoPELogic: the run's subject-hierarchy folder, the input DWI node and the per-volume maps shown
    folder_item: int = 0
    input_node: object = None
    volume_index: int | None = None
    volume_error: object = None
    volume_std: object = None

    def volume_nodes(self) -> list:
        """The volume nodes loaded (reconstruction first), skipping missing ones."""
        outputs = {**SCALAR_OUTPUTS, **UNCERTAINTY_OUTPUTS}
        names = ["reconstruction"] + [attr for attr, _, _ in outputs.values()]
        return [getattr(self, name) for name in names if getattr(self, name) is not None]

    def nodes(self) -> list:
        """Every data node of the run (volumes, tables, chart and its series)."""
        nodes = self.volume_nodes() + [self.diffusion_attention, self.diffusion_attention_profile,
                                       self.diffusion_attention_chart]
        if self.diffusion_attention_chart is not None:
            chart = self.diffusion_attention_chart
            nodes += [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        return [node for node in nodes if node is not None]


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path}: cannot be read as JSON ({error})") from error
    if not isinstance(value, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    return value


_VOLUME_LABEL = re.compile(r"^v(\d+)_b([-+0-9.eE]+)$")  # the engine's column labels, e.g. "v3_b1500"


def attention_profile(columns: dict) -> dict | None:
    """Attention received by each key volume from the engine's (V, V) diffusion-attention matrix.

    ``columns``: the CSV's columns (``mrml_io.table_columns``): first a string column of query labels, then one
    numeric column per key volume labelled ``v<index>_b<b-value>``. Returns ``{"volume", "b-value", "label",
    "mean attention"}`` columns (mean over queries, one row per key volume), or None for another layout.
    """
    names = list(columns)
    if len(names) < 2 or columns[names[0]].dtype.kind not in "US":
        return None
    keys = names[1:]
    if any(columns[key].dtype.kind != "f" for key in keys) or len(columns[names[0]]) != len(keys):
        return None
    matrix = np.stack([columns[key] for key in keys], axis=1)  # (query, key)
    parsed = [_VOLUME_LABEL.match(key) for key in keys]
    volume = [int(m.group(1)) if m else index for index, m in enumerate(parsed)]
    bvalue = [float(m.group(2)) if m else float("nan") for m in parsed]
    return {"volume": volume, "b-value": bvalue, "label": keys, "mean attention": matrix.mean(axis=0)}


def load_results(scene, out_dir, reference, name_prefix: str | None = None) -> ReconstructionResults:
    """Load every engine output of ``out_dir`` into ``scene``.

    ``reference`` is the input DWI node: outputs are named after it and, when on its grid (as the engine writes
    them), get exactly its IJK->RAS matrix. Raises ResultsError if the folder or the reconstruction is missing.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ResultsError(f"{out_dir}: output folder not found")
    prefix = name_prefix or reference.GetName()
    results = ReconstructionResults(out_dir)

    recon_path = out_dir / RECONSTRUCTION
    if not recon_path.is_file():
        raise ResultsError(f"{out_dir}: the engine wrote no {RECONSTRUCTION}")
    results.reconstruction = mrml_io.load_nifti_dwi(scene, recon_path, name=f"{prefix} reconstructed")
    if not mrml_io.match_geometry(results.reconstruction, reference):
        results.off_grid.append(RECONSTRUCTION)

    for filename, (attribute, suffix, kind) in {**SCALAR_OUTPUTS, **UNCERTAINTY_OUTPUTS}.items():
        path = out_dir / filename
        if not path.is_file():
            if filename in SCALAR_OUTPUTS:
                results.missing.append(filename)
            continue
        node = mrml_io.load_scalar_volume(scene, path, f"{prefix} {suffix}")
        if not mrml_io.match_geometry(node, reference):
            results.off_grid.append(filename)
        setattr(results, attribute, node)
    if results.attention is not None and results.md is not None and not (
            {"attention.nii.gz", "md.nii.gz"} & set(results.off_grid)):
        mask_outside_brain(results.attention, results.md)
    for filename, (attribute, _, kind) in {**SCALAR_OUTPUTS, **UNCERTAINTY_OUTPUTS}.items():
        if getattr(results, attribute) is not None:
            mrml_io.style_map(scene, getattr(results, attribute), kind)
    if (out_dir / RECONSTRUCTION_STD).is_file():
        results.reconstruction_std = read_volume_series(out_dir / RECONSTRUCTION_STD, reference)

    table_path = out_dir / DIFFUSION_ATTENTION
    if table_path.is_file():
        results.diffusion_attention = mrml_io.load_table_csv(scene, table_path, f"{prefix} diffusion attention")
        profile = attention_profile(mrml_io.table_columns(results.diffusion_attention))
        if profile is not None:
            results.diffusion_attention_profile = mrml_io.add_table(
                scene, f"{prefix} diffusion attention per volume", profile)
            results.diffusion_attention_chart = mrml_io.add_plot(
                scene, results.diffusion_attention_profile, "volume", "mean attention",
                f"{prefix} diffusion attention")
    else:
        results.missing.append(DIFFUSION_ATTENTION)

    latent_path = out_dir / LATENT
    if latent_path.is_file():
        results.latent = np.asarray(np.load(latent_path, allow_pickle=False), dtype=np.float64).reshape(-1)
    else:
        results.missing.append(LATENT)
    if (out_dir / PREDICTION).is_file():
        results.prediction = _read_json(out_dir / PREDICTION)
    if (out_dir / SUMMARY).is_file():
        results.summary = _read_json(out_dir / SUMMARY)
    else:
        results.missing.append(SUMMARY)
    if results.missing:
        logger.warning("%s: missing outputs: %s", out_dir, ", ".join(results.missing))
    if results.off_grid:
        logger.warning("%s: outputs not on the input's grid: %s", out_dir, ", ".join(results.off_grid))
    return results


def mask_outside_brain(node, brain_map) -> None:
    """Zero ``node`` where ``brain_map`` (MD, which the engine computes inside the brain mask only) is 0."""
    import slicer

    values = slicer.util.arrayFromVolume(node)
    values[slicer.util.arrayFromVolume(brain_map) <= 0] = 0
    slicer.util.arrayFromVolumeModified(node)


def read_volume_series(path: Path, reference) -> np.ndarray:
    """A 4-D NIfTI written on the grid of ``reference`` as a (K, J, I, N) array; ResultsError if it is not on it."""
    import nibabel as nib

    image = nib.load(str(path))
    dims = mrml_io.dimensions(reference)
    if image.ndim != 4 or tuple(image.shape[:3]) != dims or not np.allclose(
            image.affine, mrml_io.ijk_to_ras(reference), atol=mrml_io.GEOMETRY_ATOL_MM):
        raise ResultsError(f"{path}: not a 4-D map on the input's grid {dims}")
    return np.ascontiguousarray(np.transpose(np.asarray(image.dataobj, dtype=np.float32), (2, 1, 0, 3)))


def summary_lines(summary: dict) -> list[str]:
    """The run's key numbers for the panel: masked MSE, FA/MD error, time and device (those present)."""
    metrics = summary.get("metrics", {}) if isinstance(summary.get("metrics"), dict) else {}
    lines = []
    if metrics.get("mse_normalised_masked") is not None:
        lines.append(f"Masked MSE (normalised signal): {metrics['mse_normalised_masked']:.4g}")
    if metrics.get("fa_mae") is not None:
        lines.append(f"FA error (mean absolute, brain): {metrics['fa_mae']:.4g}")
    if metrics.get("md_mae_mm2_per_s") is not None:
        lines.append(f"MD error (mean absolute, brain): {metrics['md_mae_mm2_per_s']:.3g} mm²/s")
    if summary.get("seconds") is not None:
        lines.append(f"Time: {float(summary['seconds']):.1f} s on {summary.get('device', '?')}")
    return lines


def summary_warnings(summary: dict) -> list[str]:
    """The engine's warnings about the input (``summary.json`` "warnings"), as strings."""
    warnings = summary.get("warnings", [])
    return [str(w) for w in warnings] if isinstance(warnings, list) else [str(warnings)]


def latent_summary(latent: np.ndarray | None, count: int = 6) -> str:
    """One line for the panel: dimension, L2 norm and the first ``count`` values of the CLS latent vector."""
    if latent is None:
        return "no latent vector"
    latent = np.asarray(latent, dtype=np.float64).reshape(-1)
    first = ", ".join(f"{value:.3g}" for value in latent[:count])
    more = ", ..." if latent.size > count else ""
    return f"dimension {latent.size}, norm {np.linalg.norm(latent):.4g}; first values: {first}{more}"


def prediction_summary(prediction: dict | None) -> str:
    """The probe prediction as 'key: value' lines (nested values as compact JSON); '' without a probe."""
    if not prediction:
        return ""
    lines = []
    for key, value in prediction.items():
        if isinstance(value, float):
            text = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            text = json.dumps(value, separators=(",", ":"))
            text = text if len(text) <= 120 else text[:117] + "..."
        else:
            text = str(value)
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


def gradient_check_text(result: dict) -> str:
    """The gradient check's verdict for the panel: the engine's one-line message, then the fix to apply."""
    text = str(result.get("message", ""))
    if not result.get("given_is_best", True):
        text += f"\nSuggested fix (image frame): {result['best']['fix']}. 'Make corrected copy' applies it to a copy."
    return text


def drift_lines(overall: dict) -> list[str]:
    """Per representation: the within-scan (protocol draws) and same-session distances over between-brain ones."""
    def ratio(value):
        return "-" if value is None else f"{value:.3f}"

    return [f"{name}: protocol change / other brains {ratio(r.get('ratio_within'))}, same session / other brains "
            f"{ratio(r.get('ratio_session'))}" for name, r in overall.items()]
