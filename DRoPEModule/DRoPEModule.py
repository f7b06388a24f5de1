"""DRoPE: diffusion-MRI masked-autoencoder transformer with D-RoPE, as a 3D Slicer module (Slicer >= 5.10).

Thin by design: the panel lives here; the work is done by ``DRoPEModuleLib`` (``logic.DRoPELogic``: export, the
engine process, results in the scene and the views) and by the headless ``DRoPE`` library, which runs in a separate
PythonSlicer process (``python -m DRoPE reconstruct ... --progress json``) so the GUI never freezes.
"""

import importlib.metadata
import logging
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLDiffusionWeightedVolumeNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DRoPEModuleLib import dependencies, paths, process
from DRoPEModuleLib.logic import DRoPELogic

PAPER_CODE_URL = "https://github.com/gustavochau/D-RoPE"  # the code link given in Chau et al.'s paper
RESEARCH_ONLY = "Research use only; not for clinical use."


#
# DRoPEModule
#


class DRoPEModule(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DRoPE")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Diffusion")]
        self.parent.dependencies = []
        self.parent.contributors = ["The DRoPE contributors"]
        self.parent.helpText = _(
            "Hides three quarters of a diffusion-weighted scan from a transformer with diffusion rotary position "
            "embedding (D-RoPE) and shows how well it fills them back in: original, reconstruction and error of "
            "each diffusion volume, FA and MD with their errors, where the model looks (attention) and how the "
            "diffusion volumes attend to each other. {research} Method: Chau et al., <i>Diffusion MRI Transformer "
            "with D-RoPE</i> (<a href='{code}'>the authors' code</a>). Runs in a background process; needs Slicer "
            "5.10 or later and the PyTorch extension."
        ).format(research=_(RESEARCH_ONLY), code=PAPER_CODE_URL)
        self.parent.acknowledgementText = _(
            "Based on the D-RoPE diffusion-MRI transformer of Chau et al. The sample DWI is a Canon 3T series from "
            "neurolabusc/dcm_qa_canon (BSD-2-Clause)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled sample DWI in the Sample Data module (a local ``file://`` source, nothing is downloaded)."""
    import SampleData

    sample = paths.sample_dwi_nrrd()
    if sample is None:
        return
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DRoPE", sampleName="DRoPESampleDWI", uris=sample.as_uri(), fileNames="DRoPESampleDWI.nrrd",
        nodeNames="DRoPESampleDWI", loadFileTypes="VolumeFile",
        thumbnailFileName=str(Path(__file__).parent / "Resources" / "Icons" / "DRoPEModule.png"))


#
# DRoPEModuleParameterNode
#


@parameterNodeWrapper
class DRoPEModuleParameterNode:
    """Panel state, saved with the scene. ``probePath`` "" means no probe."""

    inputVolume: vtkMRMLDiffusionWeightedVolumeNode
    anatomyVolume: vtkMRMLScalarVolumeNode
    weightsPath: Path = paths.bundled_weights() or Path()
    device: Annotated[str, Choice(list(process.DEVICES))] = "auto"
    outputRoot: Path = Path(tempfile.gettempdir(), "DRoPE")  # each run writes a new folder in it
    replacePrevious: bool = True
    maskRatio: Annotated[float, WithinRange(0.0, 0.95)] = 0.75
    volumes: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    draws: Annotated[int, WithinRange(1, 100)] = 1
    probePath: str = ""
    synthesisBvals: str = ""
    synthesisBvecs: str = ""
    driftDraws: Annotated[int, WithinRange(2, 50)] = 5


#
# DRoPEModuleWidget
#


class DRoPEModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._results = None
        self._gradientCheck = None  # (input node, the check's result) of the last gradient check
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DRoPEModule.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DRoPEModuleLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.loadNiftiButton.connect("clicked(bool)", self.onLoadNiftiButton)
        self.ui.probeBrowseButton.connect("clicked(bool)", self.onProbeBrowseButton)
        self.ui.showLogButton.connect("clicked(bool)", self.onShowLogButton)
        self.ui.volumeSliderWidget.connect("valueChanged(double)", self.onVolumeChanged)
        self.ui.checkGradientsButton.connect("clicked(bool)", self.onCheckGradientsButton)
        self.ui.correctedCopyButton.connect("clicked(bool)", self.onCorrectedCopyButton)
        self.ui.synthesisBrowseButton.connect("clicked(bool)", self.onSynthesisBrowseButton)
        self.ui.synthesizeButton.connect("clicked(bool)", self.onSynthesizeButton)
        self.ui.driftButton.connect("clicked(bool)", self.onDriftButton)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.stop()  # quitting Slicer or reloading the module: no engine is left behind

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.stop()
        self._results = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        acquired = self.logic.acquired_dwis()
        if acquired and (not p.inputVolume or self.logic.is_output(p.inputVolume)):
            p.inputVolume = acquired[0]
        self._hideReconstructionsFromInput()

    def setParameterNode(self, inputParameterNode: Optional[DRoPEModuleParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _hideReconstructionsFromInput(self) -> None:
        """The input selector lists acquired DWIs only."""
        nodes = slicer.mrmlScene.GetNodesByClass("vtkMRMLDiffusionWeightedVolumeNode")
        outputs = [n.GetID() for n in (nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems()))
                   if self.logic.is_output(n)]
        self.ui.inputSelector.sortFilterProxyModel().hiddenNodeIDs = outputs

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self.logic.run is not None and self.logic.run.running
        problems = process.check_inputs(
            has_input=p.inputVolume is not None, weights=paths.optional_path(p.weightsPath), device=p.device,
            mask_ratio=p.maskRatio, volumes=p.volumes, probe=paths.optional_path(p.probePath),
            out_dir=paths.optional_path(p.outputRoot), draws=p.draws)
        self.ui.applyButton.enabled = not problems and not running
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else _("Reconstruct the hidden patches")
        self.ui.cancelButton.enabled = running
        for button in ("checkGradientsButton", "synthesizeButton", "driftButton"):
            getattr(self.ui, button).enabled = not running  # what is missing is said when clicked

    # -- actions ---------------------------------------------------------------------------------------------

    def onLoadNiftiButton(self) -> None:
        image = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load a NIfTI DWI"), "", _("NIfTI images (*.nii *.nii.gz)"))
        if not image:
            return
        bval, bvec = paths.fsl_sidecars(image)
        folder = str(Path(image).parent)
        bval = bval or qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("b-value file"), folder,
                                                      _("FSL b-values (*.bval *.bvals);;All files (*)"))
        bvec = bvec or qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("b-vector file"), folder,
                                                      _("FSL b-vectors (*.bvec *.bvecs);;All files (*)"))
        if not bval or not bvec:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the DWI."), waitCursor=True):
            self.ensureDependencies()
            self._parameterNode.inputVolume = self.logic.loadNiftiDWI(image, bval, bvec)

    def onProbeBrowseButton(self) -> None:
        probe = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("Probe file"), "",
                                               _("Probe (*.json);;All files (*)"))
        if probe:
            self._parameterNode.probePath = probe

    def ensureDependencies(self) -> None:
        """First run: one dialog listing PyTorch (PyTorch extension) and the pip packages, then install them."""
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        plan = dependencies.plan_installation(
            dependencies.read_requirements(paths.requirements_file()), torchVersion())
        dependencies.ensure_dependencies(
            plan, torch_utils=PyTorchUtils, torch_version=torchVersion, testing=slicer.app.testingEnabled(),
            confirm=lambda text: slicer.util.confirmOkCancelDisplay(text, windowTitle=_("DRoPE: install packages")),
            install_packages=pipInstall)
        paths.ensure_library_importable()

    def onApplyButton(self) -> None:
        p = self._parameterNode
        self._startRun(
            self.logic.start, p.inputVolume, p.outputRoot, weights=paths.optional_path(p.weightsPath),
            device=p.device, mask_ratio=p.maskRatio, volumes=p.volumes, seed=p.seed,
            probe=paths.optional_path(p.probePath), draws=p.draws, replace=p.replacePrevious, on_done=self._onDone)

    def onCheckGradientsButton(self) -> None:
        node = self._parameterNode.inputVolume
        self._startRun(self.logic.check_gradients, node, on_done=lambda result: self._onGradientCheck(node, result))

    def onCorrectedCopyButton(self) -> None:
        node, result = self._gradientCheck
        with slicer.util.tryWithErrorDisplay(_("Failed to make the corrected copy."), waitCursor=True):
            copy = self.logic.corrected_copy(node, result["world_matrix"])
            self._parameterNode.inputVolume = copy
            self._setStatus(_("Made {name}; it is now the input.").format(name=copy.GetName()))

    def onSynthesisBrowseButton(self) -> None:
        bval = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("b-values to synthesise"), "",
                                              _("FSL b-values (*.bval *.bvals);;All files (*)"))
        if bval:
            self._parameterNode.synthesisBvals = bval
            bvec = paths.bvec_beside(bval)
            self._parameterNode.synthesisBvecs = str(bvec) if bvec else ""

    def onSynthesizeButton(self) -> None:
        p = self._parameterNode
        self._startRun(self.logic.synthesize, p.inputVolume, p.synthesisBvals, p.synthesisBvecs, p.outputRoot,
                       weights=paths.optional_path(p.weightsPath), device=p.device, on_done=self._onSynthesized)

    def onDriftButton(self) -> None:
        p = self._parameterNode
        self._startRun(self.logic.drift, list(self.ui.driftSelector.checkedNodes()), p.outputRoot,
                       weights=paths.optional_path(p.weightsPath), draws=p.driftDraws, device=p.device,
                       on_done=self._onDrift)

    def _startRun(self, start, *args, on_done, **options) -> None:
        """Install missing packages (first run), then ``start(*args, ...)`` one of the Logic's engine runs."""
        with slicer.util.tryWithErrorDisplay(_("Failed to start DRoPE."), waitCursor=True):
            self._setStatus(_("Checking the Python packages..."))
            self.ensureDependencies()
            self._setStatus(_("Exporting the DWI..."))
            slicer.app.processEvents()
            start(*args, on_progress=self._onProgress, on_done=on_done, on_error=self._onError,
                  on_cancel=self._onCancel, **options)
            self.ui.progressBar.value = 0
            self.ui.showLogButton.enabled = True
            self._setStatus(_("Starting the engine (loading PyTorch and the model)..."))
            self._timer.start()
        self._checkCanApply()

    def onCancelButton(self) -> None:
        self.logic.cancel()
        self._setStatus(_("Cancelling..."))

    def onShowLogButton(self) -> None:
        run = self.logic.run
        log = "\n".join(run.log_tail) if run is not None else ""
        slicer.util.infoDisplay(_("Engine output (last lines)"), windowTitle=_("DRoPE log"), detailedText=log)

    def onVolumeChanged(self, value: float) -> None:
        if self._results is not None:
            with slicer.util.tryWithErrorDisplay(_("Cannot show this volume."), waitCursor=True):
                self.logic.show_volume(self._results, int(value))

    def _onTimer(self) -> None:
        if self.logic.run is None or not self.logic.run.poll():
            self._timer.stop()
            self._checkCanApply()

    def _setStatus(self, text: str, error: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.setStyleSheet("color: #c0392b;" if error else "")

    def _onProgress(self, fraction: float, message: str) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self._setStatus(message)

    def _onError(self, message: str) -> None:
        logging.error("DRoPE failed: %s", message)
        run = self.logic.run
        last = [line for line in (run.log_tail if run is not None else []) if line.strip()][-3:]
        details = "\n" + "\n".join(last) if last and last[-1].strip() not in message else ""
        self._setStatus(_("Error: {message}").format(message=message) + details, error=True)

    def _onCancel(self) -> None:
        self._setStatus(_("Cancelled."))

    def _onDone(self, results) -> None:
        from DRoPEModuleLib import results as resultsLib

        self._results = results
        with slicer.util.tryWithErrorDisplay(_("Failed to show the results."), waitCursor=True):
            self.logic.show(results, anatomy=self._parameterNode.anatomyVolume if self._parameterNode else None)
            slicer.util.resetSliceViews()
        self._hideReconstructionsFromInput()
        self.ui.progressBar.value = 100
        slider = self.ui.volumeSliderWidget
        slider.blockSignals(True)
        slider.maximum = results.reconstruction.GetNumberOfGradients() - 1
        slider.value = results.volume_index or 0
        slider.blockSignals(False)
        slider.enabled = True
        warnings = resultsLib.summary_warnings(results.summary)
        self.ui.warningsLabel.text = "\n".join("⚠ " + w for w in warnings)
        self.ui.warningsLabel.visible = bool(warnings)
        self.ui.metricsLabel.text = "\n".join(resultsLib.summary_lines(results.summary)) or "-"
        self.ui.latentLabel.text = resultsLib.latent_summary(results.latent)
        self.ui.predictionLabel.text = resultsLib.prediction_summary(results.prediction) or _("(no probe)")
        folder = qt.QUrl.fromLocalFile(str(results.out_dir)).toString()
        self.ui.resultsFolderLabel.text = f"<a href='{folder}'>{results.out_dir}</a>"
        note = _(" Missing outputs: {names}.").format(names=", ".join(results.missing)) if results.missing else ""
        self._setStatus(_("Done.") + note)

    def _onGradientCheck(self, node, result: dict) -> None:
        from DRoPEModuleLib import results as resultsLib

        self._gradientCheck = (node, result)
        self.ui.gradientCheckLabel.text = resultsLib.gradient_check_text(result)
        self.ui.correctedCopyButton.enabled = not result["given_is_best"]
        self.ui.progressBar.value = 100
        self._setStatus(_("Gradient check done."))

    def _onSynthesized(self, node) -> None:
        self.ui.progressBar.value = 100
        self._setStatus(_("Synthesized {name}.").format(name=node.GetName()))

    def _onDrift(self, report) -> None:
        from DRoPEModuleLib import results as resultsLib

        figure = qt.QUrl.fromLocalFile(str(report.figure)).toString()
        lines = resultsLib.drift_lines(report.overall) + [f"<a href='{figure}'>{report.figure.name}</a>"]
        self.ui.driftLabel.text = "<br>".join(lines)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetActiveTableID(report.table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()
        self.ui.progressBar.value = 100
        self._setStatus(_("Drift report done: {path}").format(path=report.csv))


def torchVersion() -> Optional[str]:
    """The installed torch version (pip metadata, without importing torch), or None."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def pipInstall(requirements: list) -> None:
    """``slicer.packaging.pip_ensure`` (Slicer >= 5.12, already confirmed), else ``slicer.util.pip_install``."""
    packaging = getattr(slicer, "packaging", None)
    if packaging is not None and hasattr(packaging, "pip_ensure"):
        packaging.pip_ensure(requirements, prompt_install=False, requester="DRoPE")
    else:
        with slicer.util.WaitCursor():
            slicer.util.pip_install(requirements)


#
# DRoPEModuleLogic
#


class DRoPEModuleLogic(DRoPELogic, ScriptedLoadableModuleLogic):
    """``DRoPELogic`` on Slicer's scene and temporary folder, plus the module's parameter node. (DRoPELogic comes
    first: ScriptedLoadableModuleLogic.__init__ calls ``super().__init__()`` without arguments.)"""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        DRoPELogic.__init__(self, slicer.mrmlScene, slicer.app.temporaryPath)

    def getParameterNode(self):
        return DRoPEModuleParameterNode(super().getParameterNode())

    def loadNiftiDWI(self, image, bval=None, bvec=None):
        from DRoPEModuleLib import mrml_io

        paths.ensure_library_importable()
        return mrml_io.load_nifti_dwi(self.scene, image, bval, bvec)


#
# DRoPEModuleTest
#


class DRoPEModuleTest(ScriptedLoadableModuleTest):
    """Fast part (always): the bundled sample through export and the engine command. Reconstruction (bundled
    weights) only where PyTorch and the engine's packages are installed: a test never installs packages."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DRoPEModule_sample()

    def test_DRoPEModule_sample(self):
        import numpy as np

        from DRoPEModuleLib import mrml_io

        sample, weights = paths.sample_dwi_nrrd(), paths.bundled_weights()
        self.assertIsNotNone(sample, "Resources/Sample/dwi.nrrd is not installed")
        self.assertIsNotNone(weights, "Resources/model/model.safetensors is not installed")
        logic = DRoPEModuleLogic()
        dwi = mrml_io.read_dwi_nrrd(slicer.mrmlScene, sample)
        exported = mrml_io.export_dwi(dwi, Path(tempfile.mkdtemp(dir=slicer.app.temporaryPath)))
        again = mrml_io.read_dwi_nrrd(slicer.mrmlScene, exported)
        np.testing.assert_allclose(mrml_io.dwi_arrays(again).world_gradients(),
                                   mrml_io.dwi_arrays(dwi).world_gradients(), atol=1e-6)
        self.assertEqual(logic.acquired_dwis(), [dwi, again])
        self.assertTrue(process.engine_python().endswith(("PythonSlicer", "PythonSlicer.exe")))

        plan = dependencies.plan_installation(dependencies.read_requirements(paths.requirements_file()),
                                              torchVersion())
        if plan:
            self.delayDisplay("Reconstruction skipped; not installed:\n" + plan.describe())
            return
        results = logic.run_blocking(dwi, Path(slicer.app.temporaryPath) / "DRoPETest", weights=weights,
                                     device="cpu", seed=0)
        logic.show(results)
        self.assertEqual((results.missing, results.off_grid), ([], []))
        for node in results.volume_nodes():
            self.assertEqual(mrml_io.dimensions(node), mrml_io.dimensions(dwi), node.GetName())
            np.testing.assert_allclose(mrml_io.ijk_to_ras(node), mrml_io.ijk_to_ras(dwi), atol=1e-6)
        self.assertTrue(np.all(np.isfinite(results.latent)) and results.latent.size > 0)
        self.delayDisplay("Test passed")
