"""Tests of the module's panel without Slicer: the .ui file (PySide6 QUiLoader, offscreen) and DRoPEModule.py.

DRoPEModule.py imports Slicer's Qt/PythonQt modules, so it is imported in a child process with small stand-ins
for ``qt``, ``vtk`` and ``slicer`` (kept out of this pytest process, which may also hold the real slicer-core).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO_ROOT / "DRoPEModule"
MODULE_FILE = MODULE_DIR / "DRoPEModule.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DRoPEModule.ui"

# parameter type -> the widget classes Slicer's parameterNodeWrapper can bind it to (guiConnectors.py)
BINDABLE = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider", "QComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "QComboBox"},
    "str": {"QLineEdit", "QComboBox", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def ui_names_used_by_module() -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def parameter_bindings() -> dict[str, ET.Element]:
    """SlicerParameterName -> widget element."""
    bindings = {}
    for widget in ui_widgets().values():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                assert prop.get("stdset") == "0", "SlicerParameterName must be a dynamic property (stdset=0)"
                bindings[prop.findtext("string")] = widget
    return bindings


# ---------------------------------------------------------------------------------------------------------------
# the .ui file
# ---------------------------------------------------------------------------------------------------------------


def test_ui_is_well_formed_and_declares_its_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    assert root.get("version") == "4.0" and root.findtext("class") == "DRoPEModule"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "DRoPEModule"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    qt_classes = {c for c in used if c.startswith("Q")}
    assert used - qt_classes <= declared, f"undeclared custom widgets: {used - qt_classes - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate objectName"


def test_ui_loads_with_quiloader_and_has_every_widget_the_module_uses():
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 is not installed")
    script = textwrap.dedent(f"""
        import json, os
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
        from PySide6.QtCore import QFile, qInstallMessageHandler
        from PySide6.QtUiTools import QUiLoader
        from PySide6.QtWidgets import QApplication, QWidget
        messages = []
        qInstallMessageHandler(lambda mode, context, text: messages.append(text))
        app = QApplication([])
        handle = QFile({str(UI_FILE)!r})
        handle.open(QFile.ReadOnly)
        widget = QUiLoader().load(handle)
        handle.close()
        names = [child.objectName() for child in widget.findChildren(QWidget)] + [widget.objectName()]
        print(json.dumps({{"names": names, "messages": messages}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    missing = ui_names_used_by_module() - set(report["names"])
    assert not missing, f"DRoPEModule.py uses widgets the .ui does not create: {sorted(missing)}"
    failures = [m for m in report["messages"] if "unable to create a widget" in m and "custom" not in m]
    assert not failures, failures


def test_module_uses_the_central_widgets():
    used = ui_names_used_by_module()
    for name in ("applyButton", "cancelButton", "progressBar", "statusLabel", "loadNiftiButton", "latentLabel",
                 "predictionLabel", "showLogButton", "volumeSliderWidget", "warningsLabel", "metricsLabel",
                 "probeBrowseButton", "inputSelector"):
        assert name in used, name
    widgets = ui_widgets()
    assert widgets["inputSelector"].get("class") == "qMRMLNodeComboBox"
    node_types = [s.text for p in widgets["inputSelector"].findall("property") if p.get("name") == "nodeTypes"
                  for s in p.iter("string")]
    assert node_types == ["vtkMRMLDiffusionWeightedVolumeNode"]


# ---------------------------------------------------------------------------------------------------------------
# DRoPEModule.py, imported in a child process with stand-ins for Slicer
# ---------------------------------------------------------------------------------------------------------------

STUBS = r'''
import json, sys, types
from pathlib import Path
from types import SimpleNamespace as NS

def module(name, **attrs):
    mod = types.ModuleType(name)
    mod.__dict__.update(attrs)
    sys.modules[name] = mod
    return mod

class Base:
    def __init__(self, parent=None, *args, **kwargs):
        self.parent = parent

class Choice:
    def __init__(self, choices):
        self.choices = list(choices)

class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

class ScriptedLoadableModuleLogic:
    def __init__(self, parent=None):
        super().__init__()  # as Slicer's does
        self.moduleName = "DRoPEModule"

class vtkMRMLDiffusionWeightedVolumeNode: pass
class vtkMRMLScalarVolumeNode: pass

module("qt")
vtk = module("vtk", vtkCommand=NS(ModifiedEvent=33))
vtk.util = module("vtk.util")
vtk.util.numpy_support = module("vtk.util.numpy_support")
app_connections = []
slicer = module("slicer", vtkMRMLDiffusionWeightedVolumeNode=vtkMRMLDiffusionWeightedVolumeNode,
                vtkMRMLScalarVolumeNode=vtkMRMLScalarVolumeNode, mrmlScene=None,
                app=NS(connect=lambda signal, slot: app_connections.append([signal, slot.__name__]),
                       temporaryPath="/tmp"))
slicer.i18n = module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
slicer.parameterNodeWrapper = module("slicer.parameterNodeWrapper", Choice=Choice, WithinRange=WithinRange,
                                     parameterNodeWrapper=lambda cls: cls)
slicer.ScriptedLoadableModule = module(
    "slicer.ScriptedLoadableModule", ScriptedLoadableModule=type("ScriptedLoadableModule", (Base,), {}),
    ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (Base,), {}),
    ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (Base,), {}))
slicer.util = module("slicer.util", VTKObservationMixin=type("VTKObservationMixin", (Base,), {}))
'''

PROBE = r'''
import typing
import DRoPEModule as M

result = {"heavy_imports": sorted(m for m in ("DRoPE", "torch", "nibabel", "dipy", "safetensors")
                                  if m in sys.modules)}
parent = NS()
M.DRoPEModule(parent)
result["app_connections"] = app_connections
sample_sources = []
module("SampleData", SampleDataLogic=NS(registerCustomSampleDataSource=lambda **kw: sample_sources.append(kw)))
M.registerSampleData()
result["sample_sources"] = sample_sources
result["title"], result["categories"] = parent.title, parent.categories
result["contributors"], result["help"], result["ack"] = parent.contributors, parent.helpText, parent.acknowledgementText
result["logic_base"] = [c.__name__ for c in M.DRoPEModuleLogic.__mro__]
logic = M.DRoPEModuleLogic()
result["logic_state"] = [logic.moduleName, str(logic.temp_dir), logic.run]
result["test_base"] = [c.__name__ for c in M.DRoPEModuleTest.__mro__]

fields = {}
for name, hint in M.DRoPEModuleParameterNode.__annotations__.items():
    extras = {}
    if typing.get_origin(hint) is typing.Annotated:
        hint, *meta = typing.get_args(hint)
        for item in meta:
            if isinstance(item, Choice):
                extras["choices"] = item.choices
            if isinstance(item, WithinRange):
                extras["range"] = [item.minimum, item.maximum]
    kind = "node" if hint.__name__.startswith("vtkMRML") else ("Path" if issubclass(hint, Path) else hint.__name__)
    default = repr(getattr(M.DRoPEModuleParameterNode, name, None))
    fields[name] = {"type": kind, "class": hint.__name__, "default": default, **extras}
result["fields"] = fields

# the panel logic, on fake widgets
class W(NS):
    def setStyleSheet(self, style):
        self.style = style

widget = M.DRoPEModuleWidget.__new__(M.DRoPEModuleWidget)
widget.ui = NS(applyButton=W(), cancelButton=W(), statusLabel=W(), progressBar=W(), checkGradientsButton=W(),
               synthesizeButton=W(), driftButton=W(), gradientCheckLabel=W(), correctedCopyButton=W())
widget.logic = NS(run=None)
params = NS(inputVolume=None, weightsPath=Path("."), device="auto", maskRatio=0.75, volumes=0, probePath="",
            outputRoot=Path(sys.argv[1]).parent, draws=1)
widget._parameterNode = params
states = []
def snapshot():
    widget._checkCanApply()
    states.append({"apply": widget.ui.applyButton.enabled, "tip": widget.ui.applyButton.toolTip,
                   "cancel": widget.ui.cancelButton.enabled,
                   "analyses": [widget.ui.checkGradientsButton.enabled, widget.ui.synthesizeButton.enabled,
                                widget.ui.driftButton.enabled]})
snapshot()                                   # nothing chosen
params.inputVolume = vtkMRMLDiffusionWeightedVolumeNode()
params.weightsPath = Path(sys.argv[1])       # an existing weights file
snapshot()                                   # ready
params.maskRatio = 0.95
params.probePath = sys.argv[1] + ".missing"
snapshot()                                   # probe missing
params.probePath = ""
params.draws = 0
snapshot()                                   # draws out of range
params.draws = 4
widget.logic.run = NS(running=True)
snapshot()                                   # running
result["states"] = states
widget._onProgress(0.426, "encoding")
result["progress"] = [widget.ui.progressBar.value, widget.ui.statusLabel.text]
widget.logic.run = NS(running=False, log_tail=["loading", "", "step 3", "Traceback (most recent call last):",
                                               "ValueError: input has no b0 volume"])
widget._onError("ValueError: input has no b0 volume")
result["error"] = [widget.ui.statusLabel.text, widget.ui.statusLabel.style]
widget._onError("the engine stopped")
result["error_with_log"] = widget.ui.statusLabel.text
checks = []
for given_is_best in (True, False):
    widget._onGradientCheck("node", {"given_is_best": given_is_best, "best": {"fix": "flip y"}, "message": "m"})
    checks.append([widget.ui.gradientCheckLabel.text, widget.ui.correctedCopyButton.enabled, widget._gradientCheck[0]])
result["gradient_checks"] = checks
print(json.dumps(result))
'''


@pytest.fixture(scope="module")
def module_probe(tmp_path_factory):
    weights = tmp_path_factory.mktemp("w") / "model.safetensors"
    weights.write_bytes(b"\0")
    done = subprocess.run([sys.executable, "-c", STUBS + PROBE, str(weights)], capture_output=True, text=True,
                          timeout=120, cwd=str(MODULE_DIR),
                          env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_module_metadata(module_probe):
    assert module_probe["title"] == "DRoPE" and module_probe["categories"] == ["Diffusion"]
    assert module_probe["contributors"] and "D-RoPE" in module_probe["help"] and "Chau" in module_probe["ack"]
    assert "not for clinical use" in module_probe["help"] and "Slicer 5.10" in module_probe["help"]
    assert "https://github.com/gustavochau/D-RoPE" in module_probe["help"]  # the code link the paper gives


def test_sample_is_registered_with_sample_data(module_probe, sample_dir):
    assert module_probe["app_connections"] == [["startupCompleted()", "registerSampleData"]]
    (source,) = module_probe["sample_sources"]
    assert source["uris"] == (sample_dir / "dwi.nrrd").as_uri() and source["uris"].startswith("file://")
    assert source["category"] == "DRoPE" and source["loadFileTypes"] == "VolumeFile"
    assert source["fileNames"].endswith(".nrrd") and Path(source["thumbnailFileName"]).is_file()
    assert "ScriptedLoadableModuleLogic" in module_probe["logic_base"] and "DRoPELogic" in module_probe["logic_base"]
    assert module_probe["logic_state"] == ["DRoPEModule", "/tmp", None]  # both bases initialised
    assert "ScriptedLoadableModuleTest" in module_probe["test_base"]


def test_module_import_is_light(module_probe):
    """The panel must load before torch/DIPY/the DRoPE library are installed: they are imported lazily."""
    assert module_probe["heavy_imports"] == []


def test_parameter_node_fields_are_bound_to_compatible_widgets(module_probe):
    fields, bindings = module_probe["fields"], parameter_bindings()
    assert set(fields) == set(bindings), (set(fields) ^ set(bindings))
    for name, field in fields.items():
        widget_class = bindings[name].get("class")
        assert widget_class in BINDABLE[field["type"]], f"{name}: {field['type']} cannot bind to {widget_class}"
        if widget_class == "qMRMLNodeComboBox":
            types = [s.text for p in bindings[name].findall("property") if p.get("name") == "nodeTypes"
                     for s in p.iter("string")]
            assert types == [field["class"]], name
        if widget_class in ("QComboBox",):
            assert "choices" in field, f"{name}: a QComboBox binding needs Choice(...)"
        if widget_class in ("ctkSliderWidget", "qMRMLSliderWidget"):
            assert "range" in field, f"{name}: a slider binding needs WithinRange(...)"
    assert fields["device"]["choices"] == ["auto", "cpu", "cuda"]
    assert fields["maskRatio"]["range"] == [0.0, 0.95] and fields["maskRatio"]["default"] == "0.75"
    assert fields["draws"]["range"][0] == 1 and fields["draws"]["default"] == "1"


def test_path_fields_start_with_real_defaults(module_probe):
    """No field starts as '.' (typing after the dot gave relative paths)."""
    fields = module_probe["fields"]
    weights = REPO_ROOT / "Resources" / "model" / "model.safetensors"
    if weights.is_file():
        assert fields["weightsPath"]["default"] == repr(weights)
    output_root = eval(fields["outputRoot"]["default"], {"PosixPath": Path, "WindowsPath": Path})
    assert output_root.is_absolute() and output_root.name == "DRoPE"
    assert fields["probePath"]["default"] == "''" and fields["probePath"]["type"] == "str"


def test_research_settings_are_in_a_collapsed_advanced_section():
    widgets = ui_widgets()
    advanced = widgets["advancedCollapsibleButton"]
    assert any(p.get("name") == "collapsed" and p.findtext("bool") == "true" for p in advanced.findall("property"))
    inside = {w.get("name") for w in advanced.iter("widget")}
    assert {"maskRatioSliderWidget", "volumesSpinBox", "seedSpinBox", "drawsSpinBox", "probePathLineEdit"} <= inside
    assert "inputSelector" not in inside and "applyButton" not in inside
    research = widgets["researchLabel"].find("property/string").text
    assert "not for clinical use" in research


def test_apply_button_state_and_tooltip(module_probe):
    nothing, ready, bad_probe, bad_draws, running = module_probe["states"]
    assert not nothing["apply"] and "Select an input DWI." in nothing["tip"] and "weights" in nothing["tip"]
    assert not nothing["cancel"]
    assert ready["apply"] and ready["tip"] == "Reconstruct the hidden patches"
    assert not bad_probe["apply"] and "Probe file not found" in bad_probe["tip"]
    assert not bad_draws["apply"] and "Uncertainty draws" in bad_draws["tip"]
    assert not running["apply"] and running["cancel"]
    assert nothing["analyses"] == [True] * 3 and running["analyses"] == [False] * 3  # one engine run at a time


def test_gradient_check_verdict_enables_the_corrected_copy_only_for_a_fix(module_probe):
    (best_text, best_copy, node), (fix_text, fix_copy, _) = module_probe["gradient_checks"]
    assert best_text == "m" and node == "node"
    assert fix_text.startswith("m\n") and "flip y" in fix_text and "corrected copy" in fix_text
    assert (best_copy, fix_copy) == (False, True)


def test_worker_errors_and_progress_shown_in_the_panel(module_probe):
    assert module_probe["progress"] == [43, "encoding"]
    text, style = module_probe["error"]
    assert text == "Error: ValueError: input has no b0 volume" and "color" in style  # no repeated last line
    assert module_probe["error_with_log"] == (
        "Error: the engine stopped\nstep 3\nTraceback (most recent call last):\nValueError: input has no b0 volume")


def test_module_file_stays_thin():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert len(source.splitlines()) < 500
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"DRoPEModule", "DRoPEModuleParameterNode", "DRoPEModuleWidget", "DRoPEModuleLogic",
            "DRoPEModuleTest"} <= classes
    assert 'loadUI(self.resourcePath("UI/DRoPEModule.ui"))' in source
