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
                 "predictionLabel", "weightsPathLineEdit", "useBundledWeightsCheckBox"):
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

class vtkMRMLDiffusionWeightedVolumeNode: pass
class vtkMRMLScalarVolumeNode: pass

module("qt")
module("vtk", vtkCommand=NS(ModifiedEvent=33))
slicer = module("slicer", vtkMRMLDiffusionWeightedVolumeNode=vtkMRMLDiffusionWeightedVolumeNode,
                vtkMRMLScalarVolumeNode=vtkMRMLScalarVolumeNode, mrmlScene=None)
slicer.i18n = module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
slicer.parameterNodeWrapper = module("slicer.parameterNodeWrapper", Choice=Choice, WithinRange=WithinRange,
                                     parameterNodeWrapper=lambda cls: cls)
slicer.ScriptedLoadableModule = module(
    "slicer.ScriptedLoadableModule", ScriptedLoadableModule=type("ScriptedLoadableModule", (Base,), {}),
    ScriptedLoadableModuleLogic=type("ScriptedLoadableModuleLogic", (Base,), {}),
    ScriptedLoadableModuleTest=type("ScriptedLoadableModuleTest", (Base,), {}),
    ScriptedLoadableModuleWidget=type("ScriptedLoadableModuleWidget", (Base,), {}))
slicer.util = module("slicer.util", VTKObservationMixin=type("VTKObservationMixin", (Base,), {}))
'''

PROBE = r'''
import typing
import DRoPEModule as M

result = {"heavy_imports": sorted(m for m in ("DRoPE", "torch", "nibabel", "dipy", "DRoPEModuleLib.mrml_io",
                                              "DRoPEModuleLib.results") if m in sys.modules)}
parent = NS()
M.DRoPEModule(parent)
result["title"], result["categories"] = parent.title, parent.categories
result["contributors"], result["help"], result["ack"] = parent.contributors, parent.helpText, parent.acknowledgementText
result["logic_base"] = [c.__name__ for c in M.DRoPEModuleLogic.__mro__]
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
widget.ui = NS(applyButton=W(), cancelButton=W(), weightsPathLineEdit=W(), statusLabel=W(), progressBar=W())
widget._run = None
params = NS(inputVolume=None, useBundledWeights=False, weightsPath=Path("."), device="auto", maskRatio=0.75,
            volumes=0, probePath=Path("."), outputDir=Path("."))
widget._parameterNode = params
states = []
def snapshot():
    widget._checkCanApply()
    states.append({"apply": widget.ui.applyButton.enabled, "tip": widget.ui.applyButton.toolTip,
                   "cancel": widget.ui.cancelButton.enabled, "weights_edit": widget.ui.weightsPathLineEdit.enabled})
snapshot()                                   # nothing chosen
params.inputVolume = vtkMRMLDiffusionWeightedVolumeNode()
params.weightsPath = Path(sys.argv[1])       # an existing weights file
snapshot()                                   # ready
params.maskRatio = 0.95
params.probePath = Path(sys.argv[1] + ".missing")
snapshot()                                   # probe missing
params.probePath = Path(".")
widget._run = NS(running=True)
snapshot()                                   # running
result["states"] = states
widget._onProgress(0.426, "encoding")
result["progress"] = [widget.ui.progressBar.value, widget.ui.statusLabel.text]
widget._onError("input has no b0 volume")
result["error"] = [widget.ui.statusLabel.text, widget.ui.statusLabel.style]
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
    assert "ScriptedLoadableModuleLogic" in module_probe["logic_base"]
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


def test_apply_button_state_and_tooltip(module_probe):
    nothing, ready, bad_probe, running = module_probe["states"]
    assert not nothing["apply"] and "Select an input DWI." in nothing["tip"] and "weights" in nothing["tip"]
    assert nothing["weights_edit"] and not nothing["cancel"]
    assert ready["apply"] and ready["tip"] == "Reconstruct the masked volumes and predict"
    assert not bad_probe["apply"] and "Probe file not found" in bad_probe["tip"]
    assert not running["apply"] and running["cancel"]


def test_worker_errors_and_progress_shown_in_the_panel(module_probe):
    assert module_probe["progress"] == [43, "encoding"]
    text, style = module_probe["error"]
    assert text == "Error: input has no b0 volume" and "color" in style


LOGIC_PROBE = r'''
import os, shutil, time
import DRoPEModule as M
import DRoPEModuleLib.process as P

tmp, fake_engine, sample, mode = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
os.environ["FAKE_ENGINE_MODE"] = mode
slicer.app = NS(temporaryPath=str(tmp))
exported = []
def export_dwi(node, directory):             # stands in for the MRML export (tested with slicer-core elsewhere)
    exported.append(Path(directory))
    return Path(shutil.copy(sample, Path(directory) / "input_dwi.nrrd"))
module("DRoPEModuleLib.mrml_io", export_dwi=export_dwi)
real_build = P.build_command
P.build_command = lambda request, python=None: real_build(request, prefix=[sys.executable, fake_engine])

events = []
weights = tmp / "w.safetensors"
weights.write_bytes(b"\0")
run = M.DRoPEModuleLogic().startReconstruction(
    object(), tmp / "out", weights, device="cpu", maskRatio=0.5, volumes=0, seed=4, probe=None,
    onProgress=lambda f, m: events.append(["progress", f]), onDone=lambda out: events.append(["done", out]),
    onError=lambda message: events.append(["error", message]), onCancel=lambda: events.append(["cancel"]))
outcome = run.wait(timeout=120)
print(json.dumps({"outcome": outcome, "events": events, "export_dir_left": exported[0].exists(),
                  "export_dir_in_temp": exported[0].parent == tmp, "command": run.command}))
'''


@pytest.mark.parametrize("mode", ["ok", "error"])
def test_logic_runs_the_engine_in_a_child_process(mode, tmp_path, sample_dir):
    pytest.importorskip("DRoPE.io")
    done = subprocess.run(
        [sys.executable, "-c", STUBS + LOGIC_PROBE, str(tmp_path), str(REPO_ROOT / "Testing" / "fake_engine.py"),
         str(sample_dir / "dwi.nrrd"), mode],
        capture_output=True, text=True, timeout=300, cwd=str(MODULE_DIR),
        env={**os.environ, "PYTHONPATH": str(MODULE_DIR)})
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["export_dir_in_temp"] and not report["export_dir_left"]  # the exported input is cleaned up
    command = report["command"]
    assert command[command.index("--seed") + 1] == "4" and command[command.index("--device") + 1] == "cpu"
    assert "--volumes" not in command and command[-2:] == ["--progress", "json"]
    if mode == "ok":
        assert report["outcome"] == "done" and report["events"][-1] == ["done", str(tmp_path / "out")]
        assert [e[1] for e in report["events"] if e[0] == "progress"] == [0.0, 0.5, 1.0]
    else:
        assert report["outcome"] == "error" and report["events"][-1][0] == "error"
        assert "no b0 volume" in report["events"][-1][1]


def test_module_file_stays_thin():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert len(source.splitlines()) < 500
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"DRoPEModule", "DRoPEModuleParameterNode", "DRoPEModuleWidget", "DRoPEModuleLogic",
            "DRoPEModuleTest"} <= classes
    assert 'loadUI(self.resourcePath("UI/DRoPEModule.ui"))' in source
