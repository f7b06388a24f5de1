"""MRML glue: DWI nodes <-> files the DRoPE engine reads, and engine outputs -> display-ready nodes.

Every function takes the scene and nodes as arguments; nothing here needs ``slicer.app``, Qt or CTK, so it runs
under plain Python with the ``slicer-core`` wheel as well as inside Slicer.

Array layout: Slicer volume arrays are (K, J, I) for scalars and (K, J, I, N) for DWIs (``slicer.util``
convention); NIfTI/NRRD files store (I, J, K[, N]) with I fastest.

Gradient convention of a ``vtkMRMLDiffusionWeightedVolumeNode``: unit gradient directions g_i expressed in the
node's measurement frame M (world RAS direction = M @ g_i), plus one b-value per volume.
"""

from __future__ import annotations

import csv
import gzip
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

logger = logging.getLogger(__name__)

# vtkTeemNRRDWriter (Slicer's DWI writer) leaves out every DWMRI_* key when a DWI has fewer volumes than this.
SLICER_NRRD_MIN_VOLUMES = 7
GEOMETRY_ATOL_MM = 1e-3  # outputs within this of the input's IJK->RAS are snapped to it (float32 NIfTI affines)

# NRRD type names for numpy dtypes (little-endian data)
_NRRD_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.uint8): "uchar", np.dtype(np.int16): "short",
    np.dtype(np.uint16): "ushort", np.dtype(np.int32): "int", np.dtype(np.uint32): "uint",
    np.dtype(np.float32): "float", np.dtype(np.float64): "double",
}

# Display presets: (window minimum, window maximum) in the map's units, or None = from the data.
FA_RANGE = (0.0, 1.0)
MD_RANGE = (0.0, 3e-3)  # mm^2/s
HEAT_COLOR_IDS = ("vtkMRMLPETProceduralColorNodePET-Heat", "vtkMRMLColorTableNodeIron")
ATTENTION_COLOR_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLPETProceduralColorNodePET-Rainbow2",
                       "vtkMRMLColorTableNodeRainbow")
GREY_COLOR_ID = "vtkMRMLColorTableNodeGrey"
ATTENTION_THRESHOLD = 0.1  # attention below this fraction of its window maximum is transparent in slice views


# ---------------------------------------------------------------------------------------------------------------
# Node geometry and arrays
# ---------------------------------------------------------------------------------------------------------------


def ijk_to_ras(node) -> np.ndarray:
    """(4, 4) IJK -> RAS matrix of a volume node."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def dimensions(node) -> tuple[int, int, int]:
    """(I, J, K) voxel counts of a volume node."""
    return tuple(int(d) for d in node.GetImageData().GetDimensions())


@dataclass(frozen=True)
class DWIArrays:
    """Everything needed to write a DWI node to a file.

    Attributes:
        data: (K, J, I, N) voxel values in the node's scalar type.
        ijk_to_ras: (4, 4) voxel -> world RAS (mm).
        bvalues: (N,) b-values in s/mm^2.
        gradients: (N, 3) unit directions in the measurement frame (zero rows for b0).
        measurement_frame: (3, 3) M with world RAS direction = M @ gradient.
    """

    data: np.ndarray
    ijk_to_ras: np.ndarray
    bvalues: np.ndarray
    gradients: np.ndarray
    measurement_frame: np.ndarray

    @property
    def n_volumes(self) -> int:
        return int(self.data.shape[3])

    def world_gradients(self) -> np.ndarray:
        """(N, 3) gradient directions in world RAS coordinates."""
        return self.gradients @ self.measurement_frame.T


def dwi_arrays(node) -> DWIArrays:
    """Copy the voxels, geometry and gradient table out of a ``vtkMRMLDiffusionWeightedVolumeNode``."""
    if node is None or not node.IsA("vtkMRMLDiffusionWeightedVolumeNode"):
        raise ValueError("a diffusion-weighted volume node (vtkMRMLDiffusionWeightedVolumeNode) is required")
    if node.GetImageData() is None:
        raise ValueError(f"DWI node '{node.GetName()}' has no image data")
    data = np.array(slicer.util.arrayFromVolume(node))
    if data.ndim == 3:  # a single-volume DWI comes back without the volume axis
        data = data[..., None]
    n_volumes = data.shape[3]
    gradients = numpy_support.vtk_to_numpy(node.GetDiffusionGradients()).reshape(-1, 3).astype(np.float64)
    bvalues = numpy_support.vtk_to_numpy(node.GetBValues()).astype(np.float64).reshape(-1)
    if len(gradients) != n_volumes or len(bvalues) != n_volumes:
        raise ValueError(
            f"DWI node '{node.GetName()}' has {n_volumes} volumes but {len(gradients)} gradients and "
            f"{len(bvalues)} b-values"
        )
    frame = vtk.vtkMatrix4x4()
    node.GetMeasurementFrameMatrix(frame)
    measurement_frame = slicer.util.arrayFromVTKMatrix(frame)[:3, :3].copy()
    return DWIArrays(data, ijk_to_ras(node), bvalues, gradients, measurement_frame)


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64).reshape(-1, 3)
    norms = np.linalg.norm(vectors, axis=1)
    unit = np.zeros_like(vectors)
    unit[norms > 0] = vectors[norms > 0] / norms[norms > 0, None]
    return unit


def create_dwi_node(scene, name: str, data_kjin: np.ndarray, ijk_to_ras_matrix: np.ndarray, bvalues,
                    gradients, measurement_frame=None):
    """Add a ``vtkMRMLDiffusionWeightedVolumeNode`` (with display node) built from arrays.

    data_kjin: (K, J, I, N); gradients: (N, 3) directions in ``measurement_frame`` (default identity, i.e. world
    RAS), normalised here because Slicer rejects non-unit gradients; bvalues: (N,).
    """
    data_kjin = np.asarray(data_kjin)
    n_volumes = data_kjin.shape[3]
    gradients = _unit_rows(gradients)
    bvalues = np.asarray(bvalues, dtype=np.float64).reshape(-1)
    if len(gradients) != n_volumes or len(bvalues) != n_volumes:
        raise ValueError(f"{n_volumes} volumes but {len(gradients)} gradients and {len(bvalues)} b-values")
    node = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", name)
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(np.asarray(ijk_to_ras_matrix, dtype=np.float64)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data_kjin))
    frame = np.eye(4)
    frame[:3, :3] = np.eye(3) if measurement_frame is None else measurement_frame
    node.SetMeasurementFrameMatrix(slicer.util.vtkMatrixFromArray(frame))
    node.SetNumberOfGradients(n_volumes)
    node.SetDiffusionGradients(numpy_support.numpy_to_vtk(gradients, deep=1))
    node.SetBValues(numpy_support.numpy_to_vtk(bvalues, deep=1))
    node.CreateDefaultDisplayNodes()
    return node


# ---------------------------------------------------------------------------------------------------------------
# DWI files -> nodes
# ---------------------------------------------------------------------------------------------------------------


def _name_from_path(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def read_dwi_nrrd(scene, path, name: str | None = None):
    """Load a Slicer DWI NRRD (``modality:=DWMRI``) into a new DWI node, gradients and b-values included.

    Uses ``vtkMRMLNRRDStorageNode`` directly: ``vtkSlicerVolumesLogic.AddArchetypeVolume`` would return a vector
    volume and drop the gradients. Raises ValueError if the file cannot be read as a DWI.
    """
    return _read_node(
        scene, path, name, "vtkMRMLDiffusionWeightedVolumeNode", "vtkMRMLNRRDStorageNode",
        lambda node: node.GetNumberOfGradients() > 0,
        "not a diffusion-weighted NRRD (no DWMRI gradient table could be read)",
    )


def _read_node(scene, path, name, node_class: str, storage_class: str, is_valid, problem: str):
    """A new ``node_class`` node read from ``path`` by a new ``storage_class`` node, with display nodes.

    Raises ValueError (naming the file and ``problem``) when the file is missing, the read fails, or
    ``is_valid(node)`` is False; the half-made nodes are removed from the scene first.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    node = scene.AddNewNodeByClass(node_class, name or _name_from_path(path))
    storage = scene.AddNewNodeByClass(storage_class)
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None or not is_valid(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise ValueError(f"{path}: {problem}")
    node.CreateDefaultDisplayNodes()
    return node


def load_nifti_dwi(scene, path, bval=None, bvec=None, name: str | None = None):
    """Load NIfTI + FSL bval/bvec (found beside the image when not given) into a new DWI node.

    Reading is done by ``DRoPE.io.load_dwi`` (the engine's own reader, so FSL conventions are handled once). The
    node keeps the file's own voxel grid; gradients are stored as world RAS directions (identity measurement
    frame). Raises the library's DWIError (a ValueError) with the file and the problem.
    """
    from DRoPE.io import load_dwi  # the library is imported lazily: the panel loads before its dependencies

    path = Path(path)
    dwi = load_dwi(path, bval, bvec)
    data_xyzn = np.asarray(dwi.to_input_grid(dwi.data), dtype=np.float32)
    return create_dwi_node(scene, name or _name_from_path(path), np.transpose(data_xyzn, (2, 1, 0, 3)),
                           dwi.grid.affine, dwi.gtab.bvals, dwi.world_bvecs())


# ---------------------------------------------------------------------------------------------------------------
# DWI node -> file for the engine
# ---------------------------------------------------------------------------------------------------------------


def nrrd_header_keys(path) -> dict[str, str]:
    """Fields and key/value pairs of a NRRD header (``field: value`` and ``key:=value``), read up to the blank line."""
    keys: dict[str, str] = {}
    with open(path, "rb") as handle:
        for raw in handle:
            line = raw.decode("latin-1").rstrip("\r\n")
            if not line:
                break
            if line.startswith("#") or line.startswith("NRRD"):
                continue
            if ":=" in line:
                key, value = line.split(":=", 1)
            elif ": " in line:
                key, value = line.split(": ", 1)
            else:
                continue
            keys[key.strip()] = value.strip()
    return keys


def _vector(values) -> str:
    return "(" + ",".join(f"{float(v):.17g}" for v in values) + ")"


def write_dwi_nrrd(path, arrays: DWIArrays, compress: bool = False) -> Path:
    """Write a Slicer-layout DWI NRRD from arrays, for any number of volumes.

    Same layout as Slicer's writer: space RAS, gradient (list) axis first, ``measurement frame`` columns = M,
    ``DWMRI_b-value`` = largest b and gradients scaled by sqrt(b / b_max), so that b = b_max |g|^2 (NA-MIC).
    Raises ValueError when no volume is diffusion weighted or a volume has b > 0 but no gradient direction.
    """
    path = Path(path)
    data = np.ascontiguousarray(arrays.data)
    if data.dtype not in _NRRD_TYPES:
        data = data.astype(np.float32)
    b_max = float(arrays.bvalues.max())
    if b_max <= 0:
        raise ValueError("the DWI has no diffusion-weighted volume (all b-values are 0)")
    unit = _unit_rows(arrays.gradients)
    no_direction = (arrays.bvalues > 0) & (np.linalg.norm(unit, axis=1) == 0)
    if np.any(no_direction):
        raise ValueError(f"volumes {np.flatnonzero(no_direction).tolist()} have b > 0 but no gradient direction")
    scaled = unit * np.sqrt(np.clip(arrays.bvalues, 0, None) / b_max)[:, None]
    k, j, i, n = data.shape
    lines = [
        "NRRD0005",
        "# written by DRoPEModuleLib.mrml_io.write_dwi_nrrd",
        f"type: {_NRRD_TYPES[data.dtype]}",
        "dimension: 4",
        "space: right-anterior-superior",
        f"sizes: {n} {i} {j} {k}",
        "space directions: none " + " ".join(_vector(arrays.ijk_to_ras[:3, c]) for c in range(3)),
        "kinds: list domain domain domain",
        "endian: little",
        f"encoding: {'gzip' if compress else 'raw'}",
        "space origin: " + _vector(arrays.ijk_to_ras[:3, 3]),
        "measurement frame: " + " ".join(_vector(arrays.measurement_frame[:, c]) for c in range(3)),
        "modality:=DWMRI",
        f"DWMRI_b-value:={b_max:.17g}",
    ]
    lines += [f"DWMRI_gradient_{index:04d}:=" + " ".join(f"{x:.17g}" for x in g) for index, g in enumerate(scaled)]
    payload = data.astype(data.dtype.newbyteorder("<"), copy=False).tobytes()  # (K, J, I, N): N fastest, then I
    with open(path, "wb") as handle:
        handle.write(("\n".join(lines) + "\n\n").encode("ascii"))
        handle.write(gzip.compress(payload, compresslevel=1) if compress else payload)
    return path


def export_dwi(node, directory, basename: str = "input_dwi") -> Path:
    """Write a DWI node as ``<directory>/<basename>.nrrd`` for the engine and return the path.

    Slicer's NRRD storage node is used when it keeps the gradient table; with fewer than
    ``SLICER_NRRD_MIN_VOLUMES`` volumes (where it silently drops the DWMRI keys), or if its file lacks them
    anyway, the file is written by ``write_dwi_nrrd`` instead.
    """
    arrays = dwi_arrays(node)
    path = Path(directory) / f"{basename}.nrrd"
    path.parent.mkdir(parents=True, exist_ok=True)
    if arrays.n_volumes >= SLICER_NRRD_MIN_VOLUMES:
        storage = slicer.vtkMRMLNRRDStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(False)
        if storage.WriteData(node) and "DWMRI_b-value" in nrrd_header_keys(path):
            return path
        logger.warning("Slicer's NRRD writer lost the gradient table of %s; writing it directly", node.GetName())
    return write_dwi_nrrd(path, arrays)


# ---------------------------------------------------------------------------------------------------------------
# Engine outputs -> nodes
# ---------------------------------------------------------------------------------------------------------------


def voxel_order_to(node_matrix: np.ndarray, node_dims, reference_matrix: np.ndarray, reference_dims,
                   atol: float = GEOMETRY_ATOL_MM):
    """How to re-index a grid onto a reference grid made of the same voxel centres, or None if it is not.

    Returns (axes, flips): the reference's axis r is the node's axis ``axes[r]``, reversed where ``flips[r]``.
    Grids match when every reference voxel centre lies on a node voxel centre within ``atol`` mm. (Slicer's
    ITK NIfTI reader, for one, may return a file with det < 0 with its K axis reversed.)
    """
    transform = np.linalg.solve(node_matrix, reference_matrix)  # node IJK = transform @ reference IJK
    rotation, shift = transform[:3, :3], transform[:3, 3]
    perm = np.round(rotation)
    if not (np.all(np.abs(perm).sum(axis=0) == 1) and np.all(np.abs(perm).sum(axis=1) == 1)):
        return None
    # position error in mm of the reference corner voxels mapped through the rounded transform
    corners = np.array([[x, y, z, 1.0] for x in (0, reference_dims[0] - 1) for y in (0, reference_dims[1] - 1)
                        for z in (0, reference_dims[2] - 1)]).T
    exact = np.eye(4)
    exact[:3, :3], exact[:3, 3] = perm, np.round(shift)
    if np.abs(node_matrix @ exact @ corners - reference_matrix @ corners).max() > atol:
        return None
    axes, flips = [], []
    for r in range(3):
        n = int(np.flatnonzero(perm[:, r])[0])
        flip = perm[n, r] < 0
        expected_shift = node_dims[n] - 1 if flip else 0
        if node_dims[n] != reference_dims[r] or round(shift[n]) != expected_shift:
            return None
        axes.append(n)
        flips.append(bool(flip))
    return axes, flips


def match_geometry(node, reference, atol: float = GEOMETRY_ATOL_MM) -> bool:
    """Put a scalar ``node`` exactly on the grid of ``reference`` when it holds the same voxel centres.

    Handles float32 rounding of NIfTI affines (matrices within ``atol``) and voxel orders that differ by axis
    permutations or reversals: the voxels are re-indexed and the node gets the reference's IJK->RAS matrix.
    Returns False, changing nothing, when the grids differ.
    """
    target, target_dims = ijk_to_ras(reference), dimensions(reference)
    order = voxel_order_to(ijk_to_ras(node), dimensions(node), target, target_dims, atol)
    if order is None:
        return False
    axes, flips = order
    if axes != [0, 1, 2] or any(flips):
        values = np.asarray(slicer.util.arrayFromVolume(node))  # (K, J, I[, C])
        xyz = np.swapaxes(values, 0, 2)  # (I, J, K[, C])
        xyz = np.transpose(xyz, axes + list(range(3, xyz.ndim)))
        for axis, flip in enumerate(flips):
            if flip:
                xyz = np.flip(xyz, axis=axis)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(target))
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(np.swapaxes(xyz, 0, 2)))
    else:
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(target))
    return True


def robust_range(values: np.ndarray, percentile: float = 99.0) -> tuple[float, float]:
    """Display window for a map: (0, p) for non-negative data, (-p, p) for signed data, with p the
    ``percentile`` of |value| over finite non-zero voxels (1.0 when there are none)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values) & (values != 0)]
    if finite.size == 0:
        return 0.0, 1.0
    top = float(np.percentile(np.abs(finite), percentile))
    if top <= 0:
        top = float(np.abs(finite).max())
    return (-top if finite.min() < 0 else 0.0), top


def heat_color_node_id(scene, preferred=HEAT_COLOR_IDS) -> str:
    """ID of the first ``preferred`` colour node in the scene, else of a black-red-yellow-white table made here."""
    for color_id in preferred:
        if scene.GetNodeByID(color_id) is not None:
            return color_id
    existing = scene.GetFirstNodeByName("DRoPE heat")
    if existing is not None:
        return existing.GetID()
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "DRoPE heat")
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    for index, t in enumerate(np.linspace(0.0, 1.0, 256)):
        table.SetColor(index, f"{t:.3f}", min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), max(0.0, 3 * t - 2), 1.0)
    table.SetHideFromEditors(False)
    return table.GetID()


def set_display(node, window: tuple[float, float], color_node_id: str | None = None) -> None:
    """Fix a scalar volume's window to ``window`` (min, max), auto window/level off, and set its colour table."""
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(float(window[0]), float(window[1]))
    if color_node_id is not None:
        display.SetAndObserveColorNodeID(color_node_id)


def load_scalar_volume(scene, path, name: str | None = None, reference=None):
    """Load a NIfTI/NRRD map into a new ``vtkMRMLScalarVolumeNode`` (with display and storage nodes).

    With ``reference``, a node on the same grid gets exactly the reference's IJK->RAS (see ``match_geometry``).
    Raises ValueError when the file cannot be read.
    """
    node = _read_node(
        scene, path, name, "vtkMRMLScalarVolumeNode", "vtkMRMLVolumeArchetypeStorageNode",
        lambda node: True, "cannot be read as a volume",
    )
    if reference is not None and not match_geometry(node, reference):
        logger.warning("%s is not on the grid of %s", Path(path).name, reference.GetName())
    return node


def style_map(scene, node, kind: str) -> None:
    """Display preset by map kind: 'fa' (grey 0..1), 'md' (grey 0..3e-3 mm^2/s), 'error' (heat, 99th percentile),
    'attention' (colour, 99th percentile, values below ATTENTION_THRESHOLD of it transparent)."""
    values = slicer.util.arrayFromVolume(node)
    if kind == "fa":
        set_display(node, FA_RANGE, GREY_COLOR_ID if scene.GetNodeByID(GREY_COLOR_ID) else None)
    elif kind == "md":
        set_display(node, MD_RANGE, GREY_COLOR_ID if scene.GetNodeByID(GREY_COLOR_ID) else None)
    elif kind == "error":
        set_display(node, robust_range(values), heat_color_node_id(scene))
    elif kind == "attention":
        window = robust_range(values)
        set_display(node, window, heat_color_node_id(scene, ATTENTION_COLOR_IDS + HEAT_COLOR_IDS))
        display = node.GetDisplayNode()
        display.SetThreshold(ATTENTION_THRESHOLD * window[1], max(float(np.max(values)), window[1]))
        display.ApplyThresholdOn()
    else:
        raise ValueError(f"unknown map kind {kind!r}; use fa, md, error or attention")


def add_table(scene, name: str, columns: dict):
    """Add a ``vtkMRMLTableNode`` from ``{column name: values}``: numeric values become a double column, anything
    else a string column. All columns must have the same length."""
    lengths = {len(values) for values in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"table {name!r}: columns of different lengths {sorted(lengths)}")
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    for title, values in columns.items():
        try:
            numbers = np.array([float(value) for value in values], dtype=np.float64)
            array = numpy_support.numpy_to_vtk(numbers, deep=1)
        except (TypeError, ValueError):
            array = vtk.vtkStringArray()
            for value in values:
                array.InsertNextValue(str(value))
        array.SetName(str(title).strip())
        table.AddColumn(array)
    table_node.Modified()
    return table_node


def load_table_csv(scene, path, name: str | None = None):
    """Load a CSV file (header row) into a new ``vtkMRMLTableNode``: all-numeric columns become double arrays,
    the others string arrays. Raises ValueError on an empty file or ragged rows."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise ValueError(f"{path}: empty CSV file")
    header, body = rows[0], rows[1:]
    ragged = [index + 2 for index, row in enumerate(body) if len(row) != len(header)]
    if ragged:
        raise ValueError(f"{path}: rows {ragged[:5]} do not have {len(header)} columns")
    columns = {title: [row[index] for row in body] for index, title in enumerate(header)}
    return add_table(scene, name or _name_from_path(path), columns)


def table_columns(table_node) -> dict:
    """``{name: numpy array}`` of a table node (numeric columns as float arrays, string columns as str arrays)."""
    table = table_node.GetTable()
    columns = {}
    for index in range(table.GetNumberOfColumns()):
        column = table.GetColumn(index)
        if column.IsA("vtkStringArray"):
            columns[column.GetName()] = np.array([column.GetValue(i) for i in range(column.GetNumberOfValues())])
        else:
            columns[column.GetName()] = numpy_support.vtk_to_numpy(column).astype(np.float64)
    return columns


def add_plot(scene, table_node, x_column: str, y_column: str, name: str):
    """Add a scatter plot series of ``y_column`` against ``x_column`` and a chart showing it; returns the chart."""
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} series")
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetXColumnName(x_column)
    series.SetYColumnName(y_column)
    series.SetPlotType(series.PlotTypeScatter)
    series.SetMarkerStyle(series.MarkerStyleCircle)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name)
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(name)
    chart.SetXAxisTitle(x_column)
    chart.SetYAxisTitle(y_column)
    chart.SetLegendVisibility(False)
    return chart


def set_slice_layers(scene, background=None, foreground=None, foreground_opacity: float | None = None) -> int:
    """Show volumes in every slice view of the scene (its slice composite nodes); returns how many views changed.

    Only the layers given are changed. In a scene without views (no application) nothing happens.
    """
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    count = composites.GetNumberOfItems()
    for index in range(count):
        composite = composites.GetItemAsObject(index)
        if background is not None:
            composite.SetBackgroundVolumeID(background.GetID())
        if foreground is not None:
            composite.SetForegroundVolumeID(foreground.GetID())
        if foreground_opacity is not None:
            composite.SetForegroundOpacity(float(foreground_opacity))
    return count
