"""Show a run's results: the DRoPE view layout, per-volume maps, the attention overlay and its colour legend.

Works on the scene's MRML view nodes only (layout node, slice nodes, slice composite nodes, plot view node), so it
runs with ``slicer-core`` as inside Slicer; in a scene without a layout node (no application) only the nodes change.

Layout (``LAYOUT_ID``; ``LAYOUT_ID_UNCERTAINTY`` adds the uncertainty column when the run has ``--draws`` maps)::

    Original (volume i) | Reconstruction (volume i) | Error (volume i)    [| Std (volume i)]
    FA + attention      | FA error                  | MD error            [| FA std]
    diffusion attention (plot)
"""

from __future__ import annotations

import numpy as np
import slicer

from . import mrml_io

LAYOUT_ID = 1401
LAYOUT_ID_UNCERTAINTY = 1402
ROWS = (
    (("DRoPEOriginal", "Original"), ("DRoPEReconstruction", "Reconstruction"), ("DRoPEError", "Error")),
    (("DRoPEFA", "FA + attention"), ("DRoPEFAError", "FA error"), ("DRoPEMDError", "MD error")),
)
UNCERTAINTY_COLUMN = (("DRoPEStd", "Std"), ("DRoPEFAStd", "FA std"))
PLOT_VIEW = "DRoPEPlot"


def layout_xml(uncertainty: bool) -> str:
    """Layout description: two rows of axial slice views (see the module docstring) above the plot view."""
    rows = []
    for row_index, row in enumerate(ROWS):
        views = list(row) + ([UNCERTAINTY_COLUMN[row_index]] if uncertainty else [])
        items = "".join(
            f'<item><view class="vtkMRMLSliceNode" singletontag="{tag}">'
            f'<property name="orientation" action="default">Axial</property>'
            f'<property name="viewlabel" action="default">{label}</property>'
            f'<property name="viewcolor" action="default">#808080</property></view></item>'
            for tag, label in views)
        rows.append(f'<item><layout type="horizontal">{items}</layout></item>')
    plot = (f'<item><view class="vtkMRMLPlotViewNode" singletontag="{PLOT_VIEW}">'
            f'<property name="viewlabel" action="default">P</property></view></item>')
    return f'<layout type="vertical">{"".join(rows)}{plot}</layout>'


def composite_node(scene, tag: str):
    """The slice composite node of the slice view ``tag``, or None when the view does not exist (yet)."""
    slice_node = scene.GetSingletonNode(tag, "vtkMRMLSliceNode")
    return None if slice_node is None else slicer.vtkMRMLSliceLogic.GetSliceCompositeNode(slice_node)


def switch_layout(scene, uncertainty: bool) -> bool:
    """Register and select the DRoPE layout on the scene's layout node; False when the scene has none."""
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    if layout is None:
        return False
    layout_id = LAYOUT_ID_UNCERTAINTY if uncertainty else LAYOUT_ID
    if not layout.IsLayoutDescription(layout_id):
        layout.AddLayoutDescription(layout_id, layout_xml(uncertainty))
    layout.SetViewArrangement(layout_id)
    return True


def set_view(scene, tag: str, background=None, foreground=None, opacity: float = 1.0) -> bool:
    """Show ``background`` (and ``foreground`` at ``opacity``) in slice view ``tag``; False if there is no such view."""
    composite = composite_node(scene, tag)
    if composite is None:
        return False
    composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
    composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
    composite.SetForegroundOpacity(opacity if foreground is not None else 0.0)
    return True


def add_color_legend(node, view_tags=("DRoPEFA",)):
    """A colour legend for ``node`` shown in the given slice views (all views when none of them exists)."""
    legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(node)
    scene = node.GetScene()
    for tag in view_tags:
        view = scene.GetSingletonNode(tag, "vtkMRMLSliceNode")
        if view is not None:
            legend.AddViewNodeID(view.GetID())
    legend.SetTitleText(node.GetName())
    return legend


def per_volume_node(scene, existing, name: str, values_kji: np.ndarray, kind: str, reference):
    """Create (or refill) the scalar node ``existing`` with ``values_kji`` on the grid of ``reference``."""
    node = existing
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(mrml_io.ijk_to_ras(reference)))
    node.SetName(name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(values_kji, dtype=np.float32))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    mrml_io.style_map(scene, node, kind)
    return node


def volume_error(original, reconstruction, index: int) -> np.ndarray:
    """|reconstruction - original| of diffusion volume ``index``, (K, J, I); both DWI nodes on the same grid."""
    a = slicer.util.arrayFromVolume(original)
    b = slicer.util.arrayFromVolume(reconstruction)
    if a.shape != b.shape:
        raise ValueError(f"{original.GetName()} and {reconstruction.GetName()} are not on the same grid")
    return np.abs(b[..., index].astype(np.float32) - a[..., index].astype(np.float32))


def show_component(dwi_node, index: int) -> None:
    """Show diffusion volume ``index`` of a DWI node in slice views."""
    display = dwi_node.GetDisplayNode()
    if display is not None:
        display.SetDiffusionComponent(int(index))
