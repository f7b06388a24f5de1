"""The module's Logic: run the engine on DWI nodes and put its results into the scene. No GUI.

Runs inside Slicer and on ``slicer-core`` alike (scene and temporary folder are given)::

    logic = DRoPELogic(scene, temp_dir)
    run = logic.start(dwi_node, output_root, weights=w, on_done=lambda results: logic.show(results))
    run.wait()            # or: a timer calls run.poll() until it returns False; logic.cancel() stops it

Each run's nodes go into one subject-hierarchy folder ("DRoPE <n>") next to the input (under its study), named
"<input> DRoPE <n> <map>"; ``replace=True`` removes the input's earlier runs first.

The analyses run the same way, one engine run at a time: ``check_gradients`` (the b-vector check's verdict; then
``corrected_copy`` makes a new DWI node with the fix, the input is never changed), ``synthesize`` (a new DWI node at
requested b-values / directions) and ``drift`` (protocol-drift report of several DWI nodes: a table node, figure).
"""

from __future__ import annotations

import csv
import logging
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mrml_io, paths, process, results as results_lib, views

logger = logging.getLogger(__name__)

RUN_ATTRIBUTE = "DRoPE.Run"  # on a run's folder item: the run number
INPUT_ATTRIBUTE = "DRoPE.Input"  # on a run's folder item: the input node's ID
OUTPUT_ATTRIBUTE = "DRoPE.Output"  # on every node a run adds: its run number
ATTENTION_OPACITY = 0.6  # low attention is transparent (mrml_io.ATTENTION_THRESHOLD), so the rest can be opaque


@dataclass
class DriftReport:
    """A finished protocol-drift run: ``table`` (node of the CSV rows), ``figure`` (PNG path), ``overall``
    ({representation: {"ratio_within", "ratio_session"}}), ``csv`` (path)."""

    table: object
    figure: Path
    overall: dict
    csv: Path


class DRoPELogic:
    """Export DWI nodes, run the engine on them in a child process, load and show the results.

    Args:
        scene: the MRML scene.
        temp_dir: folder for the exported inputs (removed after the run).
        engine_prefix: command that starts the engine CLI; default ``PythonSlicer -m DRoPE``.
        probe_prefix: command that starts ``DRoPETrain/probe.py`` (drift); default ``PythonSlicer <its path>``.
        env: environment of the engine; default ``process.engine_environment`` with the DRoPE library first.
    """

    def __init__(self, scene, temp_dir, engine_prefix: list[str] | None = None,
                 probe_prefix: list[str] | None = None, env: dict | None = None):
        self.scene = scene
        self.temp_dir = Path(temp_dir)
        self._prefixes = {"cli": engine_prefix, "probe": probe_prefix}
        self._env = env
        self.run: process.EngineProcess | None = None

    # -- inputs ------------------------------------------------------------------------------------------------

    @staticmethod
    def is_output(node) -> bool:
        """Whether ``node`` was made by a DRoPE run (not an acquired DWI)."""
        return node is not None and node.GetAttribute(OUTPUT_ATTRIBUTE) is not None

    def acquired_dwis(self) -> list:
        """The scene's DWI nodes that are not DRoPE reconstructions."""
        nodes = self.scene.GetNodesByClass("vtkMRMLDiffusionWeightedVolumeNode")
        return [node for node in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems()))
                if not self.is_output(node)]

    @staticmethod
    def new_output_dir(output_root, name: str) -> Path:
        """A new folder for one run: ``<output_root>/<name>-<date-time>[-k]`` (``name`` made file-safe)."""
        base = Path(output_root) / f"{file_safe(name)}-{time.strftime('%Y%m%d-%H%M%S')}"
        out, k = base, 1
        while out.exists():
            k += 1
            out = base.with_name(f"{base.name}-{k}")
        return out

    # -- running -----------------------------------------------------------------------------------------------

    def start(self, input_node, output_root, *, weights, device="auto", mask_ratio=0.75, volumes=0, seed=None,
              probe=None, draws=1, replace=False, on_progress=None, on_done=None, on_error=None, on_cancel=None):
        """Export ``input_node`` and start the engine; returns the running ``process.EngineProcess``.

        Callbacks are called from ``poll`` (the caller's thread): ``on_done(results)`` after the outputs are
        loaded into the scene (``results_lib.ReconstructionResults``), ``on_error(message)``, ``on_cancel()``.
        Raises RequestError (invalid parameters), EngineNotFoundError, OSError or ValueError (export failed).
        """
        out_dir = self.new_output_dir(output_root, self._input_name(input_node))

        def request(export_dir):
            return process.ReconstructionRequest(
                mrml_io.export_dwi(input_node, export_dir), out_dir, Path(weights) if weights else None, device,
                float(mask_ratio), int(volumes), None if seed is None else int(seed), Path(probe) if probe else None,
                int(draws))

        return self._launch(request, lambda result: self.load_results(out_dir, input_node, replace=replace),
                            on_progress, on_done, on_error, on_cancel)

    def check_gradients(self, input_node, *, on_progress=None, on_done=None, on_error=None, on_cancel=None):
        """Run the gradient-table check on ``input_node``; ``on_done(result)`` gets the engine's JSON verdict
        (``given_is_best``, ``best`` {permutation, flip, fix}, ``margin``, ``message``, ``world_matrix``, ...)."""
        self._input_name(input_node)
        return self._launch(lambda export_dir: process.GradientCheckRequest(mrml_io.export_dwi(input_node, export_dir)),
                            lambda result: result["result"], on_progress, on_done, on_error, on_cancel)

    def corrected_copy(self, input_node, world_matrix):
        """A new DWI node beside ``input_node`` with its gradients fixed: world direction g -> ``world_matrix`` @ g
        (the check's ``world_matrix``). The input node is not changed."""
        arrays = mrml_io.dwi_arrays(input_node)
        fixed = arrays.world_gradients() @ np.asarray(world_matrix, dtype=np.float64).T
        node = mrml_io.create_dwi_node(self.scene, f"{input_node.GetName()} (gradients fixed)", arrays.data,
                                       arrays.ijk_to_ras, arrays.bvalues, fixed)
        sh = self.scene.GetSubjectHierarchyNode()
        sh.SetItemParent(subject_hierarchy_item(sh, node), sh.GetItemParent(subject_hierarchy_item(sh, input_node)))
        return node

    def synthesize(self, input_node, bvals, bvecs, output_root, *, weights, device="auto", on_progress=None,
                   on_done=None, on_error=None, on_cancel=None):
        """Predict volumes at the b-values / directions of the FSL files ``bvals`` / ``bvecs`` (image frame of the
        input, as its own .bvec) from every volume of ``input_node``; ``on_done(node)`` gets the new DWI node."""
        out_dir = self.new_output_dir(output_root, f"{self._input_name(input_node)}-synthesis")

        def request(export_dir):
            return process.SynthesisRequest(mrml_io.export_dwi(input_node, export_dir), paths.optional_path(bvals),
                                            paths.optional_path(bvecs), out_dir, Path(weights) if weights else None,
                                            device)

        return self._launch(request, lambda result: self.load_synthesis(out_dir, input_node), on_progress, on_done,
                            on_error, on_cancel)

    def drift(self, nodes, output_root, *, weights, draws=5, device="auto", on_progress=None, on_done=None,
              on_error=None, on_cancel=None):
        """Protocol-drift report of the DWI ``nodes`` (two at least): ``on_done(DriftReport)``.

        Sessions come from the subject hierarchy: nodes under the same parent item (a study or folder) are one
        session (the same brain, e.g. re-acquired with another slice geometry); a node directly under the scene is a
        session of its own.
        """
        if len(nodes) < 2 or None in nodes:
            raise process.RequestError("Select two DWIs or more for the drift report.")
        out_csv = self.new_output_dir(output_root, "drift") / "drift.csv"

        def request(export_dir):
            files = [mrml_io.export_dwi(node, export_dir, f"scan{i}_{file_safe(node.GetName())}")
                     for i, node in enumerate(nodes)]
            listing, sessions = export_dir / "dwis.txt", export_dir / "sessions.csv"
            listing.write_text("".join(f"{path}\n" for path in files), encoding="utf-8")
            with open(sessions, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["subject_id", "session"])
                writer.writerows([str(path), self.session_name(node)] for path, node in zip(files, nodes))
            return process.DriftRequest(listing, sessions, out_csv, Path(weights) if weights else None, int(draws),
                                        device)

        return self._launch(request, lambda result: self.load_drift(out_csv, result), on_progress, on_done,
                            on_error, on_cancel)

    def session_name(self, node) -> str:
        """The node's session for ``drift``: its subject-hierarchy parent (not the scene), else the node itself."""
        sh = self.scene.GetSubjectHierarchyNode()
        parent = sh.GetItemParent(subject_hierarchy_item(sh, node))
        if parent and parent != sh.GetSceneItemID():
            return f"{sh.GetItemName(parent)} [{parent}]"
        return node.GetID()

    @staticmethod
    def _input_name(input_node) -> str:
        if input_node is None:
            raise process.RequestError("Select an input DWI.")
        return input_node.GetName()

    def _launch(self, make_request, load, on_progress, on_done, on_error, on_cancel) -> process.EngineProcess:
        """Export into a temporary folder (``make_request(folder)`` returns the request), start the engine and
        return the run. When it is done, ``load(result)`` (the ``done`` event's fields) turns the outputs into what
        ``on_done`` receives; an exception there is reported through ``on_error``. The folder is removed at the end."""
        if self.run is not None and self.run.running:
            raise RuntimeError("A DRoPE run is already in progress.")
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        export_dir = Path(tempfile.mkdtemp(prefix="DRoPE-input-", dir=self.temp_dir))

        def finish(callback):
            def call(*args):
                shutil.rmtree(export_dir, ignore_errors=True)
                if callback:
                    callback(*args)
            return call

        def loaded(_out):
            try:
                value = load(run.result)
            except Exception as error:  # reported like an engine error; details go to the log
                logger.exception("Loading the DRoPE results failed")
                if on_error:
                    on_error(f"Loading the results failed: {error}")
                return
            if on_done:
                on_done(value)

        try:
            request = make_request(export_dir)
            run = process.EngineProcess(
                process.build_command(request, self._prefix(request.program)), on_progress=on_progress,
                on_done=finish(loaded), on_error=finish(on_error), on_cancel=finish(on_cancel) if on_cancel else None,
                on_log=logger.info, env=self._env or process.engine_environment(paths.ensure_library_importable()))
            logger.info("DRoPE: %s", " ".join(run.command))
            run.start()
        except Exception:
            shutil.rmtree(export_dir, ignore_errors=True)
            raise
        self.run = run
        return run

    def _prefix(self, program: str) -> list[str]:
        given = self._prefixes[program]
        if given:
            return given
        python = process.engine_python()
        return process.engine_prefix(python) if program == "cli" else process.probe_prefix(python, paths.probe_script())

    def cancel(self) -> None:
        """Ask a running engine to stop (returns at once; the run reports 'cancelled')."""
        if self.run is not None:
            self.run.cancel()

    def stop(self) -> None:
        """Kill a running engine tree now and report it (scene close, module cleanup, quitting Slicer)."""
        if self.run is not None and self.run.running:
            self.run.kill()
            self.run.wait(timeout=5)

    def run_blocking(self, input_node, output_root, timeout: float = 1800.0, **options):
        """Run and wait (self-test, scripting); returns the loaded results or raises RuntimeError."""
        messages, done = [], []
        run = self.start(input_node, output_root, on_error=messages.append, on_done=done.append, **options)
        if run.wait(timeout=timeout) != "done" or not done:
            raise RuntimeError(messages[-1] if messages else "DRoPE did not finish.")
        return done[0]

    # -- results -----------------------------------------------------------------------------------------------

    def run_folders(self, input_node) -> list[int]:
        """Subject-hierarchy folder items of the earlier runs on ``input_node``."""
        sh = self.scene.GetSubjectHierarchyNode()
        children = []
        sh.GetItemChildren(sh.GetSceneItemID(), children, True)
        return [item for item in children if sh.GetItemAttribute(item, INPUT_ATTRIBUTE) == input_node.GetID()]

    def remove_runs(self, input_node) -> int:
        """Remove every earlier run on ``input_node`` (folders and their nodes); returns how many."""
        sh = self.scene.GetSubjectHierarchyNode()
        folders = self.run_folders(input_node)
        for item in folders:
            children, helpers = [], []
            sh.GetItemChildren(item, children, True)
            for node in filter(None, (sh.GetItemDataNode(child) for child in children)):
                if node.IsA("vtkMRMLDisplayableNode"):
                    helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
                if node.IsA("vtkMRMLStorableNode"):
                    helpers.append(node.GetStorageNode())
            sh.RemoveItem(item, True, True)  # data nodes first: views would give a bare volume a new display node
            for helper in filter(None, helpers):  # MRML leaves these behind (the application's plugins do not)
                if self.scene.IsNodePresent(helper):
                    self.scene.RemoveNode(helper)
        return len(folders)

    def load_results(self, out_dir, input_node, replace: bool = False):
        """Load a finished run's folder into a new subject-hierarchy folder beside ``input_node``."""
        if replace:
            self.remove_runs(input_node)
        sh = self.scene.GetSubjectHierarchyNode()
        numbers = [int(sh.GetItemAttribute(item, RUN_ATTRIBUTE) or 0) for item in self.run_folders(input_node)]
        number = max(numbers, default=0) + 1
        results = results_lib.load_results(self.scene, out_dir, input_node, f"{input_node.GetName()} DRoPE {number}")
        parent = sh.GetItemParent(subject_hierarchy_item(sh, input_node))
        folder = sh.CreateFolderItem(parent, f"DRoPE {number}: {input_node.GetName()}")
        sh.SetItemAttribute(folder, RUN_ATTRIBUTE, str(number))
        sh.SetItemAttribute(folder, INPUT_ATTRIBUTE, input_node.GetID())
        results.folder_item, results.input_node = folder, input_node
        for node in results.nodes():
            add_to_run(sh, node, folder)
        return results

    def load_synthesis(self, out_dir, input_node):
        """The synthesised DWI of ``out_dir`` as a new node in a "DRoPE synthesis" folder beside ``input_node``."""
        out_dir = Path(out_dir)
        node = mrml_io.load_nifti_dwi(self.scene, out_dir / "synthesized.nii.gz",
                                      out_dir / "synthesized.bval", out_dir / "synthesized.bvec",
                                      name=f"{input_node.GetName()} synthesized")
        self._add_to_new_folder(node, input_node, f"DRoPE synthesis: {input_node.GetName()}")
        mrml_io.set_slice_layers(self.scene, background=node)
        return node

    def load_drift(self, out_csv, result: dict) -> DriftReport:
        """The drift CSV as a table node (in a "DRoPE drift" folder) and the figure beside it."""
        out_csv = Path(out_csv)
        table = mrml_io.load_table_csv(self.scene, out_csv, "DRoPE drift")
        self._add_to_new_folder(table, None, "DRoPE drift")
        return DriftReport(table, out_csv.with_suffix(".png"), result.get("overall", {}), out_csv)

    def _add_to_new_folder(self, node, beside, name: str) -> None:
        """Mark ``node`` as a DRoPE output and put it in a new folder (beside ``beside``'s item, else at the top)."""
        sh = self.scene.GetSubjectHierarchyNode()
        parent = sh.GetItemParent(subject_hierarchy_item(sh, beside)) if beside is not None else sh.GetSceneItemID()
        folder = sh.CreateFolderItem(parent, name)
        sh.SetItemAttribute(folder, RUN_ATTRIBUTE, "0")
        add_to_run(sh, node, folder)

    def show(self, results, volume: int | None = None, anatomy=None) -> None:
        """The DRoPE layout with every map of ``results`` (see ``views``), diffusion volume ``volume`` (default:
        the first diffusion-weighted one) and ``anatomy`` (default FA) under the attention overlay."""
        uncertainty = results.fa_std is not None or results.reconstruction_std is not None
        views.switch_layout(self.scene, uncertainty)
        self.show_volume(results, self.first_weighted_volume(results.input_node) if volume is None else volume)
        views.set_view(self.scene, "DRoPEFA", anatomy or results.fa, results.attention, ATTENTION_OPACITY)
        views.set_view(self.scene, "DRoPEFAError", results.fa_error)
        views.set_view(self.scene, "DRoPEMDError", results.md_error)
        views.set_view(self.scene, "DRoPEFAStd", results.fa_std)
        if results.attention is not None:
            views.add_color_legend(results.attention)
        plot_view = self.scene.GetSingletonNode(views.PLOT_VIEW, "vtkMRMLPlotViewNode")
        if plot_view is not None and results.diffusion_attention_chart is not None:
            plot_view.SetPlotChartNodeID(results.diffusion_attention_chart.GetID())

    @staticmethod
    def first_weighted_volume(dwi_node) -> int:
        bvalues = mrml_io.dwi_arrays(dwi_node).bvalues
        weighted = [i for i, b in enumerate(bvalues) if b >= 50]
        return weighted[0] if weighted else 0

    def show_volume(self, results, index: int) -> None:
        """Original, reconstruction, error (and std) of diffusion volume ``index`` in the first row of views."""
        original, reconstruction = results.input_node, results.reconstruction
        n = reconstruction.GetNumberOfGradients()
        if not 0 <= index < n:
            raise ValueError(f"volume {index} does not exist (0..{n - 1})")
        prefix = reconstruction.GetName().removesuffix(" reconstructed")
        for node in (original, reconstruction):
            views.show_component(node, index)
        results.volume_error = views.per_volume_node(
            self.scene, results.volume_error, f"{prefix} error (volume {index})",
            views.volume_error(original, reconstruction, index), "error", original)
        if results.reconstruction_std is not None:
            results.volume_std = views.per_volume_node(
                self.scene, results.volume_std, f"{prefix} std (volume {index})",
                results.reconstruction_std[..., index], "error", original)
        sh = self.scene.GetSubjectHierarchyNode()
        for node in (results.volume_error, results.volume_std):
            if node is not None and node.GetAttribute(OUTPUT_ATTRIBUTE) is None:
                add_to_run(sh, node, results.folder_item)
        results.volume_index = index
        views.set_view(self.scene, "DRoPEOriginal", original)
        views.set_view(self.scene, "DRoPEReconstruction", reconstruction)
        views.set_view(self.scene, "DRoPEError", results.volume_error)
        views.set_view(self.scene, "DRoPEStd", results.volume_std)


def file_safe(name: str) -> str:
    """``name`` with every run of characters other than letters, digits, '_', '.', '-' made one '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name or "dwi")


def subject_hierarchy_item(sh, node) -> int:
    """The node's subject-hierarchy item (made under the scene item where no application made one)."""
    return sh.GetItemByDataNode(node) or sh.CreateItem(sh.GetSceneItemID(), node)


def add_to_run(sh, node, folder: int) -> None:
    """Mark ``node`` as an output of the run whose folder is ``folder`` and move it there."""
    node.SetAttribute(OUTPUT_ATTRIBUTE, sh.GetItemAttribute(folder, RUN_ATTRIBUTE))
    sh.SetItemParent(subject_hierarchy_item(sh, node), folder)
