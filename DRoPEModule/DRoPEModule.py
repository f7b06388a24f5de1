"""DRoPE: diffusion-MRI masked-autoencoder transformer with D-RoPE, as a 3D Slicer module.

Thin by design: the panel and the Slicer-only glue live here, the work is done by ``DRoPEModuleLib`` (MRML I/O,
engine process, results) and by the headless ``DRoPE`` library, which runs in a separate PythonSlicer process
(``python -m DRoPE reconstruct ... --progress json``) so the GUI never freezes.
"""

import logging
import re
import shutil
import sys
import tempfile
import time
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

ATTENTION_OPACITY = 0.4


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
            "Reconstructs masked diffusion-weighted volumes with a transformer using diffusion rotary position "
            "embedding (D-RoPE). It shows FA and MD of the input and of the reconstruction with their error maps, "
            "the model's attention as an overlay, the attention over diffusion volumes as a plot, the latent "
            "(CLS) vector and, with a probe file, a prediction from it. Inference runs in a background process. "
            "See <a href='https://github.com/drope-project/SlicerDRoPE'>the project page</a>."
        )
        self.parent.acknowledgementText = _(
            "Based on the D-RoPE diffusion-MRI transformer of Chau et al. The sample DWI is a Canon 3T series from "
            "neurolabusc/dcm_qa_canon (BSD-2-Clause)."
        )


#
# DRoPEModuleParameterNode
#


@parameterNodeWrapper
class DRoPEModuleParameterNode:
    """Panel state, saved with the scene. Empty paths are ``Path('.')`` (see ``paths.optional_path``)."""

    inputVolume: vtkMRMLDiffusionWeightedVolumeNode
    anatomyVolume: vtkMRMLScalarVolumeNode
    useBundledWeights: bool = True
    weightsPath: Path
    device: Annotated[str, Choice(list(process.DEVICES))] = "auto"
    maskRatio: Annotated[float, WithinRange(0.0, 0.95)] = 0.75
    volumes: Annotated[int, WithinRange(0, 1000)] = 0
    seed: Annotated[int, WithinRange(0, 2**31 - 1)] = 0
    probePath: Path
    outputDir: Path


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
        self._run = None
        self._runInput = None
        self._startTime = 0.0
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
        if paths.bundled_weights() is None:
            self.ui.useBundledWeightsCheckBox.text = _("Use the bundled weights (not found in this installation)")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._run is not None and self._run.running:
            self._run.cancel()
        if self._timer is not None:
            self._timer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and self._run.running:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            node = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLDiffusionWeightedVolumeNode")
            if node:
                self._parameterNode.inputVolume = node

    def setParameterNode(self, inputParameterNode: Optional[DRoPEModuleParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._checkCanApply()

    def _weights(self):
        p = self._parameterNode
        return paths.bundled_weights() if p.useBundledWeights else paths.optional_path(p.weightsPath)

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._run is not None and self._run.running
        problems = process.check_inputs(
            has_input=p.inputVolume is not None, weights=self._weights(), device=p.device,
            mask_ratio=p.maskRatio, volumes=p.volumes, probe=paths.optional_path(p.probePath),
            out_dir=paths.optional_path(p.outputDir))
        self.ui.applyButton.enabled = not problems and not running
        ready = _("Reconstruct the masked volumes and predict")
        self.ui.applyButton.toolTip = "\n".join(problems) if problems else ready
        self.ui.cancelButton.enabled = running
        self.ui.weightsPathLineEdit.enabled = not p.useBundledWeights

    # -- actions ---------------------------------------------------------------------------------------------

    def onLoadNiftiButton(self) -> None:
        image = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Load a NIfTI DWI"), "", _("NIfTI images (*.nii *.nii.gz)"))
        if not image:
            return
        bval, bvec = paths.fsl_sidecars(image)
        if bval is None:
            bval = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("b-value file"), str(Path(image).parent),
                                                  _("FSL b-values (*.bval *.bvals);;All files (*)"))
        if bvec is None:
            bvec = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), _("b-vector file"), str(Path(image).parent),
                                                  _("FSL b-vectors (*.bvec *.bvecs);;All files (*)"))
        if not bval or not bvec:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the DWI."), waitCursor=True):
            self.logic.ensureDependencies()
            self._parameterNode.inputVolume = self.logic.loadNiftiDWI(image, bval, bvec)

    def onApplyButton(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start DRoPE."), waitCursor=True):
            self.logic.ensureDependencies()
            outDir = paths.optional_path(p.outputDir) or self.logic.defaultOutputDirectory(p.inputVolume)
            self._runInput = p.inputVolume
            self._run = self.logic.startReconstruction(
                p.inputVolume, outDir, weights=self._weights(), device=p.device, maskRatio=p.maskRatio,
                volumes=p.volumes, seed=p.seed, probe=paths.optional_path(p.probePath),
                onProgress=self._onProgress, onDone=self._onDone, onError=self._onError, onCancel=self._onCancel)
            self._startTime = time.time()
            self.ui.progressBar.value = 0
            self._setStatus(_("Starting the engine..."))
            self._timer.start()
        self._checkCanApply()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self._setStatus(_("Cancelling..."))

    def _onTimer(self) -> None:
        if self._run is None or not self._run.poll():
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
        self._setStatus(_("Error: {message}").format(message=message), error=True)

    def _onCancel(self) -> None:
        self._setStatus(_("Cancelled."))

    def _onDone(self, outDir: str) -> None:
        from DRoPEModuleLib import results as resultsLib

        try:
            with slicer.util.WaitCursor():
                results = self.logic.loadResults(outDir, self._runInput)
                self.logic.showResults(results, self._parameterNode.anatomyVolume if self._parameterNode else None)
        except Exception as error:  # shown in the panel; the details go to the log
            logging.exception("Loading the DRoPE results failed")
            self._onError(str(error))
            return
        self.ui.progressBar.value = 100
        self.ui.latentLabel.text = resultsLib.latent_summary(results.latent)
        self.ui.predictionLabel.text = resultsLib.prediction_summary(results.prediction) or _("(no probe)")
        folder = qt.QUrl.fromLocalFile(str(results.out_dir)).toString()
        self.ui.resultsFolderLabel.text = f"<a href='{folder}'>{results.out_dir}</a>"
        note = _(" Missing outputs: {names}.").format(names=", ".join(results.missing)) if results.missing else ""
        self._setStatus(_("Done in {seconds:.0f} s.").format(seconds=time.time() - self._startTime) + note)


#
# DRoPEModuleLogic
#


class DRoPEModuleLogic(ScriptedLoadableModuleLogic):
    """Runs DRoPE on MRML nodes; usable without the GUI (see DRoPEModuleTest)."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DRoPEModuleParameterNode(super().getParameterNode())

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Install PyTorch (PyTorch extension) and the engine's packages if needed; raise RuntimeError if impossible."""
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError(_("DRoPE needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                                 "restart Slicer and try again.")) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled() and torchLogic.installTorch(askConfirmation=askConfirmation) is None:
            raise RuntimeError(_("DRoPE needs PyTorch, which was not installed."))
        missing = dependencies.missing_requirements(dependencies.read_requirements(paths.requirements_file()))
        if missing:
            names = ", ".join(req.line for req in missing)
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("DRoPE needs these Python packages: {names}.\n\nInstall them now? This needs an internet "
                      "connection and can take a few minutes.").format(names=names)):
                raise RuntimeError(_("DRoPE cannot run without {names}.").format(names=names))
            try:
                with slicer.util.WaitCursor():
                    slicer.util.pip_install([req.line for req in missing])
            except Exception as error:
                raise RuntimeError(_("Installing {names} failed ({error}). Check the internet connection, or "
                                     "install them from the Python console with slicer.util.pip_install.")
                                   .format(names=names, error=error)) from error
        paths.ensure_library_importable()

    def loadNiftiDWI(self, image, bval=None, bvec=None):
        from DRoPEModuleLib import mrml_io

        paths.ensure_library_importable()
        return mrml_io.load_nifti_dwi(slicer.mrmlScene, image, bval, bvec)

    def defaultOutputDirectory(self, inputNode) -> Path:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", inputNode.GetName() if inputNode else "dwi")
        return Path(slicer.app.temporaryPath) / "DRoPE" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"

    def startReconstruction(self, inputNode, outDir, weights, device="auto", maskRatio=0.75, volumes=0, seed=None,
                            probe=None, onProgress=None, onDone=None, onError=None, onCancel=None):
        """Export ``inputNode`` and start the engine; returns the running ``process.EngineProcess``.

        The callbacks are called from ``EngineProcess.poll`` (the widget's timer). Raises RequestError (invalid
        parameters, with every reason) or OSError (the engine could not be started).
        """
        from DRoPEModuleLib import mrml_io

        if inputNode is None:
            raise process.RequestError(_("Select an input DWI."))
        exportDir = Path(tempfile.mkdtemp(prefix="DRoPE-input-", dir=slicer.app.temporaryPath))
        request = process.ReconstructionRequest(
            mrml_io.export_dwi(inputNode, exportDir), Path(outDir), Path(weights) if weights else None, device,
            float(maskRatio), int(volumes), None if seed is None else int(seed), Path(probe) if probe else None)

        def finished(callback):
            def call(*args):
                shutil.rmtree(exportDir, ignore_errors=True)
                if callback:
                    callback(*args)
            return call

        def done(out):
            if onDone:
                onDone(out or str(request.out_dir))

        try:
            command = process.build_command(request, python=shutil.which("PythonSlicer") or sys.executable)
            run = process.EngineProcess(
                command, on_progress=onProgress, on_done=finished(done), on_error=finished(onError),
                on_cancel=finished(onCancel) if onCancel else None, on_log=logging.info,
                env=process.engine_environment(paths.ensure_library_importable()))
            logging.info("DRoPE: %s", " ".join(command))
            run.start()
        except Exception:
            shutil.rmtree(exportDir, ignore_errors=True)
            raise
        return run

    def loadResults(self, outDir, inputNode):
        """Load the engine's output folder into the scene (``results.ReconstructionResults``)."""
        from DRoPEModuleLib import results

        paths.ensure_library_importable()
        return results.load_results(slicer.mrmlScene, outDir, inputNode)

    def showResults(self, results, anatomyNode=None) -> None:
        """Background: anatomy (or FA), foreground: attention at ATTENTION_OPACITY; the diffusion-attention plot."""
        from DRoPEModuleLib import mrml_io

        background = anatomyNode or results.fa or results.reconstruction
        mrml_io.set_slice_layers(slicer.mrmlScene, background, results.attention, ATTENTION_OPACITY)
        slicer.util.resetSliceViews()
        if results.diffusion_attention_chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(results.diffusion_attention_chart)

    def reconstructBlocking(self, inputNode, outDir, weights, timeout=1800.0, **options):
        """Run the engine and wait (self-test, scripting); returns the loaded results or raises RuntimeError."""
        messages = []
        run = self.startReconstruction(inputNode, outDir, weights, onError=messages.append, **options)
        if run.wait(timeout=timeout) != "done":
            raise RuntimeError(messages[-1] if messages else _("DRoPE did not finish."))
        return self.loadResults(outDir, inputNode)


#
# DRoPEModuleTest
#


class DRoPEModuleTest(ScriptedLoadableModuleTest):
    """Runs the bundled weights on the bundled sample DWI and checks the outputs' geometry."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DRoPEModule_sample()

    def test_DRoPEModule_sample(self):
        import numpy as np

        from DRoPEModuleLib import mrml_io

        self.delayDisplay("Starting the test")
        sample, weights = paths.sample_dwi_nrrd(), paths.bundled_weights()
        self.assertIsNotNone(sample, "Resources/Sample/dwi.nrrd is not installed")
        self.assertIsNotNone(weights, "Resources/model/model.safetensors is not installed")
        logic = DRoPEModuleLogic()
        logic.ensureDependencies(askConfirmation=False)
        dwi = mrml_io.read_dwi_nrrd(slicer.mrmlScene, sample)
        self.assertGreater(dwi.GetNumberOfGradients(), 6)

        outDir = Path(tempfile.mkdtemp(prefix="DRoPETest-", dir=slicer.app.temporaryPath))
        results = logic.reconstructBlocking(dwi, outDir, weights, device="cpu", seed=0)
        self.assertEqual(results.missing, [])
        self.assertEqual(results.off_grid, [])
        for node in results.volume_nodes():
            self.assertEqual(mrml_io.dimensions(node), mrml_io.dimensions(dwi), node.GetName())
            np.testing.assert_allclose(mrml_io.ijk_to_ras(node), mrml_io.ijk_to_ras(dwi), atol=1e-6)
        self.assertGreater(results.reconstruction.GetNumberOfGradients(), 0)
        self.assertTrue(np.all(np.isfinite(results.latent)) and results.latent.size > 0)
        shutil.rmtree(outDir, ignore_errors=True)
        self.delayDisplay("Test passed")
