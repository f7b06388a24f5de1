"""The module's Logic (DRoPEModuleLib.logic) end to end on real MRML (``slicer-core``) and the bundled sample DWI:
export -> engine (Testing/fake_engine.py, or the real one in the slow test) -> subject-hierarchy folder -> views.

The scene is set up as Slicer's application does it (default colours, slice orientation presets, a layout node
whose layouts create view nodes, and a slice logic per slice view), without Qt.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "DRoPEModule"))

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
pytest.importorskip("DRoPE.io")
import nibabel as nib  # noqa: E402
import vtk  # noqa: E402

from DRoPEModuleLib import mrml_io, process, results as results_lib, views  # noqa: E402
from DRoPEModuleLib.logic import INPUT_ATTRIBUTE, OUTPUT_ATTRIBUTE, DRoPELogic  # noqa: E402

TESTING = Path(__file__).resolve().parent
FAKE_ENGINE, FAKE_LAUNCHER = TESTING / "fake_engine.py", TESTING / "fake_launcher.py"


class AppScene:
    """A scene with what Slicer's application adds: colours, subject hierarchy, orientation presets, a layout node
    whose layouts create view nodes, and a slice logic (with its composite node) per slice view."""

    def __init__(self):
        self.scene = scene = slicer.vtkMRMLScene()
        self.logics = []
        for logic_class in (slicer.vtkSlicerColorLogic, slicer.vtkSlicerSubjectHierarchyModuleLogic):
            logic = logic_class()
            logic.SetMRMLScene(scene)
            self.logics.append(logic)
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)

        @vtk.calldata_type(vtk.VTK_OBJECT)
        def on_node_added(caller, event, node):
            if node.IsA("vtkMRMLSliceNode"):  # as qMRMLSliceWidget does
                logic = slicer.vtkMRMLSliceLogic()
                logic.SetMRMLScene(scene)
                logic.SetSliceNode(node)
                self.logics.append(logic)

        scene.AddObserver(scene.NodeAddedEvent, on_node_added)
        layout_logic = slicer.vtkMRMLLayoutLogic()
        layout_logic.SetMRMLScene(scene)
        self.logics.append(layout_logic)
        layout_logic.GetLayoutNode().SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)

    def close(self):
        for logic in reversed(self.logics):
            logic.SetMRMLScene(None)
        self.scene.Clear(1)


@pytest.fixture
def app_scene():
    app = AppScene()
    slicer.mrmlScene = app.scene
    yield app.scene
    app.close()


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0")
    return path


def fake_logic(scene, tmp_path, mode="ok", launcher=False):
    env = process.engine_environment(REPO_ROOT)
    env["FAKE_ENGINE_MODE"] = mode
    prefix = [sys.executable] + ([str(FAKE_LAUNCHER)] if launcher else []) + [str(FAKE_ENGINE)]
    return DRoPELogic(scene, tmp_path / "temp", engine_prefix=prefix, env=env)


def run_logic(logic, node, out_root, weights, **options):
    done, errors = [], []
    run = logic.start(node, out_root, weights=weights, on_done=done.append, on_error=errors.append, **options)
    assert run.wait(timeout=300) == "done", (errors, list(run.log_tail)[-10:])
    return done[0]


def sample_node(scene, sample_dir):
    return mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")


def composite(scene, tag):
    return views.composite_node(scene, tag)


def array(node):
    return slicer.util.arrayFromVolume(node)


def test_run_on_the_sample_loads_into_one_folder_and_shows_every_map(app_scene, sample_dir, tmp_path, weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "subject"), "study")
    sh.CreateItem(study, dwi)  # as the DICOM or Data module places a series
    logic = fake_logic(scene, tmp_path)
    res = run_logic(logic, dwi, tmp_path / "out", weights)

    # files: a per-run folder named after the input; the exported input is gone
    assert res.out_dir.parent == tmp_path / "out" and res.out_dir.name.startswith("dwi-")
    assert not list((tmp_path / "temp").glob("DRoPE-input-*"))
    assert res.missing == [] and res.off_grid == []

    # one folder under the input's study, holding every node of the run, named by run
    assert sh.GetItemParent(res.folder_item) == study and sh.GetItemName(res.folder_item) == "DRoPE 1: dwi"
    assert sh.GetItemAttribute(res.folder_item, INPUT_ATTRIBUTE) == dwi.GetID()
    nodes = res.nodes()
    assert len(nodes) == 12  # reconstruction, 7 maps, 2 tables, chart, series
    for node in nodes:
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == res.folder_item, node.GetName()
        assert node.GetName().startswith("dwi DRoPE 1 ") and node.GetAttribute(OUTPUT_ATTRIBUTE) == "1"
    assert logic.acquired_dwis() == [dwi]  # the reconstruction is not offered as an input

    # the attention map is zero outside the brain (MD = 0 there), the engine's values inside
    md = np.transpose(np.asarray(nib.load(res.out_dir / "md.nii.gz").dataobj), (2, 1, 0))
    attention = np.transpose(np.asarray(nib.load(res.out_dir / "attention.nii.gz").dataobj), (2, 1, 0))
    assert (md == 0).mean() > 0.1 and np.all(attention[md == 0] > 0)  # the premise: the file has no zeros
    np.testing.assert_array_equal(array(res.attention), np.where(md > 0, attention, 0))
    display = res.attention.GetDisplayNode()
    top = display.GetWindowLevelMax()
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1 * top)

    logic.show(res)
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    assert layout.GetViewArrangement() == views.LAYOUT_ID
    expected = {"DRoPEOriginal": dwi, "DRoPEReconstruction": res.reconstruction, "DRoPEError": res.volume_error,
                "DRoPEFA": res.fa, "DRoPEFAError": res.fa_error, "DRoPEMDError": res.md_error}
    for tag, node in expected.items():
        assert composite(scene, tag).GetBackgroundVolumeID() == node.GetID(), tag
    fa_view = composite(scene, "DRoPEFA")
    assert fa_view.GetForegroundVolumeID() == res.attention.GetID() and fa_view.GetForegroundOpacity() > 0
    assert composite(scene, "DRoPEStd") is None  # no uncertainty column without --draws
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(res.attention)
    fa_slice = scene.GetSingletonNode("DRoPEFA", "vtkMRMLSliceNode")
    assert legend is not None and legend.GetVisibility() and legend.GetViewNodeIDs() == (fa_slice.GetID(),)
    plot_view = scene.GetSingletonNode(views.PLOT_VIEW, "vtkMRMLPlotViewNode")
    assert plot_view.GetPlotChartNodeID() == res.diffusion_attention_chart.GetID()

    # volume 1 (the first diffusion-weighted one) in the first row; the fake "reconstruction" is input * (1 + v/100)
    original = mrml_io.dwi_arrays(dwi).data.astype(np.float32)
    assert res.volume_index == 1 and dwi.GetDisplayNode().GetDiffusionComponent() == 1
    np.testing.assert_allclose(array(res.volume_error), np.abs(original[..., 1]) / 100, rtol=1e-4, atol=1e-3)
    error_node = res.volume_error
    logic.show_volume(res, 7)
    assert res.volume_error is error_node and "volume 7" in error_node.GetName()  # refilled, not a new node
    assert res.reconstruction.GetDisplayNode().GetDiffusionComponent() == 7
    np.testing.assert_allclose(array(error_node), np.abs(original[..., 7]) * 7 / 100, rtol=1e-4, atol=1e-3)
    assert sh.GetItemParent(sh.GetItemByDataNode(error_node)) == res.folder_item
    with pytest.raises(ValueError, match="volume 13"):
        logic.show_volume(res, 13)

    # the panel's numbers and the engine's warnings
    assert results_lib.summary_lines(res.summary) == [
        "Masked MSE (normalised signal): 0.0125", "FA error (mean absolute, brain): 0.0625",
        "MD error (mean absolute, brain): 0.000125 mm²/s", "Time: 1.5 s on cpu"]
    assert results_lib.summary_warnings(res.summary) == ["input_dwi.nrrd: single-shell acquisition (fake)"]


def test_rerun_numbers_runs_and_replace_leaves_a_clean_scene(app_scene, sample_dir, tmp_path, weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    logic = fake_logic(scene, tmp_path)
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    first = run_logic(logic, dwi, tmp_path / "out", weights)
    logic.show(first)
    one_run = scene.GetNumberOfNodes()
    second = run_logic(logic, dwi, tmp_path / "out", weights)
    assert first.out_dir != second.out_dir
    assert second.fa.GetName() == "dwi DRoPE 2 FA" and len(logic.run_folders(dwi)) == 2
    third = run_logic(logic, dwi, tmp_path / "out", weights, replace=True)
    logic.show(third)
    assert logic.run_folders(dwi) == [third.folder_item] and third.fa.GetName() == "dwi DRoPE 1 FA"
    assert scene.GetNodeByID(first.fa.GetID()) is None and scene.GetNodeByID(second.reconstruction.GetID()) is None
    assert scene.GetNumberOfNodes() == one_run, "replace must remove every node of the earlier runs"
    assert logic.remove_runs(dwi) == 1
    left = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    assert not [n.GetID() for n in left if n.IsA("vtkMRMLDisplayNode") and n.GetDisplayableNode() is None]
    assert not [n.GetName() for n in left if (n.GetName() or "").startswith("dwi DRoPE")]
    kept = ("vtkMRMLAbstractViewNode", "vtkMRMLSliceCompositeNode", "vtkMRMLSubjectHierarchyNode",
            "vtkMRMLColorTableNode")  # the DRoPE views (with hidden slice models) and shared nodes stay
    assert not [n.GetID() for n in left if n.GetID() not in before and not any(n.IsA(c) for c in kept)
                and not n.GetHideFromEditors()]


def test_uncertainty_draws_add_a_column(app_scene, sample_dir, tmp_path, weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    logic = fake_logic(scene, tmp_path)
    res = run_logic(logic, dwi, tmp_path / "out", weights, draws=3)
    assert logic.run.command[logic.run.command.index("--draws") + 1] == "3"
    assert res.fa_std is not None and res.reconstruction_std is not None
    logic.show(res, volume=4)
    assert scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement() == views.LAYOUT_ID_UNCERTAINTY
    assert composite(scene, "DRoPEStd").GetBackgroundVolumeID() == res.volume_std.GetID()
    assert composite(scene, "DRoPEFAStd").GetBackgroundVolumeID() == res.fa_std.GetID()
    original = mrml_io.dwi_arrays(dwi).data.astype(np.float32)
    np.testing.assert_allclose(array(res.volume_std), np.abs(original[..., 4]) * 0.01, rtol=1e-5)


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_cancel_mid_run_behind_a_launcher_adds_nothing(app_scene, sample_dir, tmp_path, weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    logic = fake_logic(scene, tmp_path, mode="slow", launcher=True)
    nodes_before = scene.GetNumberOfNodes()
    progress, cancelled, done = [], [], []
    run = logic.start(dwi, tmp_path / "out", weights=weights, on_progress=lambda f, m: progress.append(f),
                      on_cancel=lambda: cancelled.append(True), on_done=done.append)
    deadline = time.monotonic() + 30
    while not progress and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    logic.cancel()
    started = time.monotonic()
    assert run.wait(timeout=10) == "cancelled" and time.monotonic() - started < 3
    assert cancelled == [True] and done == []
    assert scene.GetNumberOfNodes() == nodes_before and logic.run_folders(dwi) == []
    assert not list((tmp_path / "temp").glob("DRoPE-input-*"))


def test_stop_kills_a_running_engine(app_scene, sample_dir, tmp_path, weights):
    """Scene close and module cleanup: ``stop`` kills even an engine that ignores SIGTERM, at once."""
    logic = fake_logic(app_scene, tmp_path, mode="stubborn", launcher=True)
    run = logic.start(sample_node(app_scene, sample_dir), tmp_path / "out", weights=weights)
    deadline = time.monotonic() + 30
    while not list((tmp_path / "out").glob("*/engine.pid")) and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    engine_pid = int(next((tmp_path / "out").glob("*/engine.pid")).read_text())
    started = time.monotonic()
    logic.stop()
    assert not run.running and run.outcome == "cancelled" and time.monotonic() - started < 1.0
    stat = Path(f"/proc/{engine_pid}/stat")
    assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_failed_export_and_missing_launcher_leave_no_folder(app_scene, tmp_path, weights, monkeypatch, sample_dir):
    scene = app_scene
    empty = scene.AddNewNodeByClass("vtkMRMLDiffusionWeightedVolumeNode", "empty")
    logic = fake_logic(scene, tmp_path)
    with pytest.raises(ValueError, match="no image data"):
        logic.start(empty, tmp_path / "out", weights=weights)
    assert not list((tmp_path / "temp").glob("DRoPE-input-*"))
    monkeypatch.setattr(process.shutil, "which", lambda name: None)
    plain = DRoPELogic(scene, tmp_path / "temp")
    with pytest.raises(process.EngineNotFoundError):
        plain.start(sample_node(scene, sample_dir), tmp_path / "out", weights=weights)
    assert not list((tmp_path / "temp").glob("DRoPE-input-*"))


def test_scene_save_and_reload_keeps_the_run(app_scene, sample_dir, tmp_path, weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    logic = fake_logic(scene, tmp_path)
    res = run_logic(logic, dwi, tmp_path / "out", weights)
    logic.show(res)
    mrml = tmp_path / "saved" / "scene.mrml"
    mrml.parent.mkdir()
    # as Slicer's "Save" does: nodes changed since they were read (re-indexed, masked) or never stored are written
    saved = []
    for node in res.volume_nodes() + [res.volume_error]:
        if node.GetStorageNode() is None or node.GetModifiedSinceRead():
            storage = node.GetStorageNode() or node.CreateDefaultStorageNode() or node.GetStorageNode()
            if storage.GetScene() is None:
                scene.AddNode(storage)
                node.SetAndObserveStorageNodeID(storage.GetID())
            storage.SetFileName(str(mrml.parent / f"{node.GetName()}.nrrd"))
            assert storage.WriteData(node), node.GetName()
            saved.append(node.GetName())
    assert {"dwi DRoPE 1 attention", "dwi DRoPE 1 error (volume 1)"} <= set(saved)
    scene.SetRootDirectory(str(mrml.parent))
    scene.SetURL(str(mrml))
    assert scene.Commit()

    app = AppScene()
    loaded = app.scene
    loaded.SetURL(str(mrml))
    assert loaded.Import()
    sh = loaded.GetSubjectHierarchyNode()
    reloaded = DRoPELogic(loaded, tmp_path / "temp")
    reloaded_dwi = loaded.GetNodeByID(dwi.GetID())
    folders = reloaded.run_folders(reloaded_dwi)
    assert len(folders) == 1 and sh.GetItemName(folders[0]) == "DRoPE 1: dwi"
    children = []
    sh.GetItemChildren(folders[0], children)
    names = {sh.GetItemName(item) for item in children}
    assert {node.GetName() for node in res.nodes()} <= names
    for node in (res.fa, res.attention, res.volume_error):
        again = loaded.GetFirstNodeByName(node.GetName())
        assert mrml_io.match_geometry(again, reloaded_dwi), node.GetName()  # same voxels, maybe in file order
        np.testing.assert_array_equal(array(again), array(node))
    recon = loaded.GetFirstNodeByName("dwi DRoPE 1 reconstructed")
    assert recon.GetNumberOfGradients() == dwi.GetNumberOfGradients() and reloaded.is_output(recon)
    assert reloaded.acquired_dwis() == [reloaded_dwi]
    app.close()


@pytest.mark.slow
def test_real_engine_with_the_bundled_weights_on_the_sample(app_scene, sample_dir, tmp_path):
    """The real ``python -m DRoPE reconstruct`` with the bundled weights (about 1 min on 2 CPU cores)."""
    from DRoPEModuleLib import paths

    weights = paths.bundled_weights()
    if weights is None:
        pytest.skip("no bundled weights in Resources/model")
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    logic = DRoPELogic(scene, tmp_path / "temp", engine_prefix=[sys.executable, "-m", "DRoPE"],
                       env=process.engine_environment(REPO_ROOT))
    res = run_logic(logic, dwi, tmp_path / "out", weights, device="cpu", seed=0)
    logic.show(res)
    assert res.missing == [] and res.off_grid == []
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert results_lib.summary_lines(summary)[0].startswith("Masked MSE")
    md = array(res.md)
    assert np.all(array(res.attention)[md <= 0] == 0) and np.any(array(res.attention) > 0)
    assert composite(scene, "DRoPEReconstruction").GetBackgroundVolumeID() == res.reconstruction.GetID()


# ---------------------------------------------------------------------------------------------------------------
# the analyses: gradient check + corrected copy, synthesis, drift (the real engine, tiny or no weights)
# ---------------------------------------------------------------------------------------------------------------


def real_logic(scene, tmp_path):
    return DRoPELogic(scene, tmp_path / "temp", engine_prefix=[sys.executable, "-m", "DRoPE"],
                      probe_prefix=[sys.executable, str(REPO_ROOT / "DRoPETrain" / "probe.py")],
                      env=process.engine_environment(REPO_ROOT))


def wait_for(run, done, errors, timeout=600):
    assert run.wait(timeout=timeout) == "done", (errors, list(run.log_tail)[-10:])
    return done[0]


def test_gradient_check_finds_a_crafted_flip_and_the_copy_undoes_it(app_scene, sample_dir, tmp_path):
    """The sample with its b-vectors flipped along image y: the check names a fix whose corrected copy has the
    acquired gradients back (up to the global sign, which gives the same tensors); the checked node is unchanged."""
    from DRoPE.gradcheck import TableCandidate, world_fix
    from DRoPE.io import load_dwi

    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    acquired = mrml_io.dwi_arrays(dwi)
    flip_y = world_fix(load_dwi(sample_dir / "dwi.nrrd"), TableCandidate((0, 1, 2), (False, True, False)))
    crafted = mrml_io.create_dwi_node(scene, "crafted", acquired.data, acquired.ijk_to_ras, acquired.bvalues,
                                      acquired.world_gradients() @ flip_y.T)
    logic = real_logic(scene, tmp_path)
    verdicts, errors = [], []
    for node in (dwi, crafted):
        run = logic.check_gradients(node, on_done=verdicts.append, on_error=errors.append)
        wait_for(run, verdicts, errors, timeout=300)
    given, flipped = verdicts
    assert given["given_is_best"] and not flipped["given_is_best"] and flipped["margin"] > 0
    assert "flip" in results_lib.gradient_check_text(flipped) and not list((tmp_path / "temp").iterdir())
    before = mrml_io.dwi_arrays(crafted).world_gradients()
    copy = logic.corrected_copy(crafted, flipped["world_matrix"])
    fixed = mrml_io.dwi_arrays(copy).world_gradients()
    truth = acquired.world_gradients()
    assert np.allclose(fixed, truth, atol=1e-5) or np.allclose(fixed, -truth, atol=1e-5)
    np.testing.assert_array_equal(mrml_io.dwi_arrays(crafted).world_gradients(), before)
    np.testing.assert_array_equal(array(copy), array(crafted))
    assert not logic.is_output(copy) and copy in logic.acquired_dwis()


def test_synthesis_at_acquired_directions_gives_a_dwi_node_on_the_grid(app_scene, sample_dir, tmp_path,
                                                                      tiny_weights):
    scene = app_scene
    dwi = sample_node(scene, sample_dir)
    request = tmp_path / "request"
    request.mkdir()
    bvals = np.loadtxt(sample_dir / "dwi.bval")[1:4]
    np.savetxt(request / "new.bval", bvals[None], fmt="%g")
    np.savetxt(request / "new.bvec", np.loadtxt(sample_dir / "dwi.bvec")[:, 1:4], fmt="%.6f")
    logic = real_logic(scene, tmp_path)
    done, errors, fractions = [], [], []
    run = logic.synthesize(dwi, request / "new.bval", request / "new.bvec", tmp_path / "out", weights=tiny_weights,
                           device="cpu", on_done=done.append, on_error=errors.append,
                           on_progress=lambda f, m: fractions.append(f))
    node = wait_for(run, done, errors)
    assert node.GetNumberOfGradients() == 4  # a b0 first, then the three requested volumes
    np.testing.assert_allclose(mrml_io.dwi_arrays(node).bvalues, np.r_[0, bvals])
    np.testing.assert_allclose(mrml_io.ijk_to_ras(node), mrml_io.ijk_to_ras(dwi), atol=1e-4)
    assert mrml_io.dimensions(node) == mrml_io.dimensions(dwi)
    np.testing.assert_allclose(np.abs(mrml_io.dwi_arrays(node).world_gradients()[1:]),
                               np.abs(mrml_io.dwi_arrays(dwi).world_gradients()[1:4]), atol=1e-4)
    assert logic.is_output(node) and node not in logic.acquired_dwis()
    assert len(fractions) > 3 and fractions == sorted(fractions)


def test_synthesis_without_a_request_file_names_it(app_scene, sample_dir, tmp_path, tiny_weights):
    logic = real_logic(app_scene, tmp_path)
    with pytest.raises(process.RequestError, match="b-vector file not found"):
        logic.synthesize(sample_node(app_scene, sample_dir), sample_dir / "dwi.bval", tmp_path / "none.bvec",
                         tmp_path / "out", weights=tiny_weights)
    assert not list((tmp_path / "temp").iterdir())


@pytest.mark.slow
def test_drift_report_of_three_nodes_with_sessions_from_the_hierarchy(app_scene, sample_dir, tmp_path, tiny_weights):
    """Two nodes in one study folder (one session) and one on its own: the CSV rows, sessions and ratios come back
    as a table node and the overall ratios; K = 2 draws each with the tiny model."""
    scene = app_scene
    acquired = mrml_io.dwi_arrays(sample_node(scene, sample_dir))
    rng = np.random.default_rng(0)
    nodes = [mrml_io.create_dwi_node(scene, f"scan {i}", acquired.data * rng.uniform(0.8, 1.2, acquired.data.shape),
                                     acquired.ijk_to_ras, acquired.bvalues, acquired.world_gradients())
             for i in range(3)]
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "study A")
    for node in nodes[:2]:
        sh.SetItemParent(sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node), study)
    logic = real_logic(scene, tmp_path)
    assert logic.session_name(nodes[0]) == logic.session_name(nodes[1]) != logic.session_name(nodes[2])
    done, errors = [], []
    run = logic.drift(nodes, tmp_path / "out", weights=tiny_weights, draws=2, device="cpu", on_done=done.append,
                      on_error=errors.append)
    report = wait_for(run, done, errors, timeout=900)
    columns = mrml_io.table_columns(report.table)
    assert report.figure.is_file() and report.csv.is_file() and logic.is_output(report.table)
    assert {"DRoPE", "signal histogram"} <= set(report.overall)
    assert report.overall["DRoPE"]["ratio_session"] is not None  # two scans share a session
    assert set(columns["representation"]) == set(report.overall)
    with pytest.raises(process.RequestError, match="two DWIs"):
        logic.drift(nodes[:1], tmp_path / "out", weights=tiny_weights)
