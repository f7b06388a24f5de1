"""Render the DRoPE module's view layout to Resources/Screenshots/DRoPEModule.png without the Slicer application.

The scene is real MRML (``slicer-core``): the bundled sample DWI, a run of the engine with the bundled weights
(or an existing output folder), loaded and shown by the module's Logic (``DRoPEModuleLib.logic``). Each slice view
is the RGBA image its ``vtkMRMLSliceLogic`` reslices and blends (layers, colour tables, opacity, thresholds), taken
offscreen with VTK; matplotlib only arranges the views, the colour bar and the plot. The module panel (Qt) is not
in the picture.

    python Resources/Screenshots/make_module_screenshot.py [--out-dir EXISTING_RUN] [--png PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "DRoPEModule"))

import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from DRoPEModuleLib import mrml_io, paths, process, results as results_lib, views  # noqa: E402
from DRoPEModuleLib.logic import DRoPELogic  # noqa: E402

VIEW_PIXELS = 320


def app_scene():
    """A scene with the application's logics; returns (scene, {slice node ID: slice logic}, logics to keep)."""
    scene = slicer.vtkMRMLScene()
    slicer.mrmlScene = scene
    keep = []
    for logic_class in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSubjectHierarchyModuleLogic):
        logic = logic_class()
        logic.SetMRMLScene(scene)
        keep.append(logic)
    slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
    slice_logics = {}

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def on_node_added(caller, event, node):
        if node.IsA("vtkMRMLSliceNode"):
            logic = slicer.vtkMRMLSliceLogic()
            logic.SetMRMLScene(scene)
            logic.SetSliceNode(node)
            slice_logics[node.GetID()] = logic

    scene.AddObserver(scene.NodeAddedEvent, on_node_added)
    layout_logic = slicer.vtkMRMLLayoutLogic()
    layout_logic.SetMRMLScene(scene)
    keep.append(layout_logic)
    return scene, slice_logics, keep


def view_image(scene, slice_logics, tag: str, reference) -> np.ndarray:
    """(H, W, 3) RGB of slice view ``tag``, through the middle of ``reference``, as the slice logic blends it."""
    slice_node = scene.GetSingletonNode(tag, "vtkMRMLSliceNode")
    slice_node.SetDimensions(VIEW_PIXELS, VIEW_PIXELS, 1)
    logic = slice_logics[slice_node.GetID()]
    logic.FitSliceToVolume(reference, VIEW_PIXELS, VIEW_PIXELS)
    logic.SetSliceOffset(logic.GetSliceOffset())
    producer = logic.GetImageDataConnection().GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(0)
    width, height, _ = image.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)
    return rgba[::-1, :, :3]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, help="an existing reconstruct output folder of the sample")
    parser.add_argument("--png", type=Path, default=Path(__file__).with_name("DRoPEModule.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scene, slice_logics, _keep = app_scene()
    dwi = mrml_io.read_dwi_nrrd(scene, paths.sample_dwi_nrrd(), name="sample DWI")
    temp = Path(tempfile.mkdtemp(prefix="DRoPE-screenshot-"))
    logic = DRoPELogic(scene, temp, engine_prefix=[sys.executable, "-m", "DRoPE"],
                       env=process.engine_environment(REPO_ROOT))
    if args.out_dir is not None:
        results = logic.load_results(args.out_dir, dwi)
    else:
        results = logic.run_blocking(dwi, temp / "out", weights=paths.bundled_weights(), device="cpu", seed=0)
    logic.show(results)

    figure = plt.figure(figsize=(12, 9.2), facecolor="black")
    grid = figure.add_gridspec(3, 3, height_ratios=[1, 1, 0.75], hspace=0.12, wspace=0.03)
    for row, views_in_row in enumerate(views.ROWS):
        for column, (tag, title) in enumerate(views_in_row):
            axis = figure.add_subplot(grid[row, column])
            axis.imshow(view_image(scene, slice_logics, tag, dwi))
            if row == 0:
                title = f"{title} (volume {results.volume_index})"
            axis.set_title(title, color="white", fontsize=11)
            axis.axis("off")
    attention = results.attention.GetDisplayNode()
    bar = figure.add_axes([0.135, 0.345, 0.12, 0.012])
    table = attention.GetColorNode().GetLookupTable()  # the colours the slice view used
    lo, hi = table.GetRange()
    colours = []
    for t in np.linspace(0, 1, 256):
        rgb = [0.0, 0.0, 0.0]
        table.GetColor(lo + (hi - lo) * t, rgb)
        colours.append(rgb)
    bar.imshow(np.array(colours)[None, :, :], aspect="auto")
    bar.set_xticks([0, 255], [f"{attention.GetLowerThreshold():.3g}", f"{attention.GetWindowLevelMax():.3g}"])
    bar.tick_params(colors="white", labelsize=8)
    bar.set_yticks([])
    bar.set_title("attention", color="white", fontsize=8)
    plot = figure.add_subplot(grid[2, :])
    profile = mrml_io.table_columns(results.diffusion_attention_profile)
    plot.plot(profile["volume"], profile["mean attention"], "o-", color="#f39c12")
    plot.set_xlabel("diffusion volume", color="white")
    plot.set_ylabel("mean attention received", color="white")
    plot.set_facecolor("#202020")
    plot.tick_params(colors="white")
    lines = results_lib.summary_lines(results.summary)
    plot.set_title("Diffusion attention   |   " + "   ".join(lines[:2]), color="white", fontsize=10)
    figure.suptitle("DRoPE module layout on the bundled sample (research use only, not for clinical use)",
                    color="white", fontsize=12)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.png, dpi=100, facecolor="black")
    print(args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
