"""Tests of the Slicer module's library (DRoPEModule/DRoPEModuleLib) without the Slicer application.

- process/paths/dependencies: plain Python; the engine is replaced by Testing/fake_engine.py (same CLI and
  JSON-lines protocol), run as a real child process.
- mrml_io/results: real MRML scenes from the ``slicer-core`` wheel (skipped when it is not installed), checked
  against independent readers (pynrrd, nibabel) and the engine's own reader (DRoPE.io.load_dwi).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "DRoPEModule"))

from DRoPEModuleLib import dependencies, paths, process  # noqa: E402

FAKE_ENGINE = Path(__file__).resolve().parent / "fake_engine.py"
FAKE_LAUNCHER = Path(__file__).resolve().parent / "fake_launcher.py"


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------


class Recorder:
    """Collects the EngineProcess callbacks."""

    def __init__(self):
        self.progress, self.done, self.errors, self.cancelled, self.log = [], [], [], 0, []

    def kwargs(self, with_cancel=True):
        kwargs = dict(on_progress=lambda f, m: self.progress.append((f, m)), on_done=self.done.append,
                      on_error=self.errors.append, on_log=self.log.append)
        if with_cancel:
            kwargs["on_cancel"] = self._cancel
        return kwargs

    def _cancel(self):
        self.cancelled += 1


def fake_command(request: process.ReconstructionRequest) -> list[str]:
    return process.build_command(request, prefix=[sys.executable, str(FAKE_ENGINE)])


def fake_env(mode: str) -> dict:
    env = process.engine_environment(REPO_ROOT)
    env["FAKE_ENGINE_MODE"] = mode
    return env


@pytest.fixture
def request_files(tmp_path):
    """A valid request whose input and weights exist (content is irrelevant to the fake engine's failure modes)."""
    dwi = tmp_path / "in.nrrd"
    dwi.write_bytes(b"NRRD0005\n")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0")
    return process.ReconstructionRequest(dwi, tmp_path / "out", weights, seed=3)


# ---------------------------------------------------------------------------------------------------------------
# process: protocol and command line
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"event": "progress", "fraction": 0.4, "message": "encoding"}',
         process.ProgressEvent("progress", 0.4, "encoding")),
        ('  {"event": "progress", "fraction": 1}\n', process.ProgressEvent("progress", 1.0, "")),
        ('{"event": "progress", "fraction": 1.7}', process.ProgressEvent("progress", 1.0, "")),
        ('{"event": "done", "out": "/tmp/x"}',
         process.ProgressEvent("done", 1.0, "", "/tmp/x", {"event": "done", "out": "/tmp/x"})),
        ('{"event": "done", "result": {"margin": 0.1}}',
         process.ProgressEvent("done", 1.0, "", None, {"event": "done", "result": {"margin": 0.1}})),
        ('{"event": "error", "message": "no b0"}', process.ProgressEvent("error", None, "no b0")),
        ('{"event": "error"}', process.ProgressEvent("error", None, "the engine reported an error")),
        ('{"event": "progress", "fraction": "half"}', None),
        ('{"event": "progress", "fraction": true}', None),
        ('{"event": "progress", "fraction": NaN}', None),
        ('{"event": "progress"}', None),
        ('{"event": "unknown", "fraction": 0.5}', None),
        ('[1, 2]', None),
        ('{"event": "progress", "fraction": 0.5', None),
        ("loading weights ...", None),
        ("", None),
    ],
)
def test_parse_progress_line(line, expected):
    assert process.parse_progress_line(line) == expected


def test_build_command_flags(request_files, tmp_path):
    probe = tmp_path / "probe.json"
    probe.write_text("{}")
    request = process.ReconstructionRequest(request_files.input_path, tmp_path / "o", request_files.weights,
                                            device="cpu", mask_ratio=0.5, volumes=12, seed=7, probe=probe, draws=8)
    command = process.build_command(request, process.engine_prefix("/opt/PythonSlicer"))
    assert command == [
        "/opt/PythonSlicer", "-m", "DRoPE", "reconstruct", str(request.input_path), "--out", str(tmp_path / "o"),
        "--weights", str(request.weights), "--device", "cpu", "--mask-ratio", "0.5", "--volumes", "12",
        "--seed", "7", "--probe", str(probe), "--draws", "8", "--progress", "json",
    ]
    # defaults: 0 volumes (= engine default), no seed, no probe, 1 draw -> flags left out
    minimal = process.ReconstructionRequest(request_files.input_path, tmp_path / "o", request_files.weights)
    command = process.build_command(minimal, process.engine_prefix("py"))
    assert not {"--volumes", "--seed", "--probe", "--draws"} & set(command)
    assert command[-2:] == ["--progress", "json"] and command[command.index("--mask-ratio") + 1] == "0.75"


def test_build_command_validates_and_lists_every_problem(tmp_path):
    request = process.ReconstructionRequest(tmp_path / "missing.nrrd", tmp_path / "o", tmp_path / "none.safetensors",
                                            device="tpu", mask_ratio=1.0, volumes=-1, probe=tmp_path / "p.json",
                                            draws=0)
    with pytest.raises(process.RequestError) as info:
        process.build_command(request, process.engine_prefix("py"))
    message = str(info.value)
    for part in ("missing.nrrd", "none.safetensors", "tpu", "Mask ratio", "Number of volumes", "p.json", "draws"):
        assert part in message


def test_check_inputs_names_what_is_missing(tmp_path):
    problems = process.check_inputs(has_input=False, weights=None)
    assert problems[0] == "Select an input DWI." and "weights" in problems[1] and len(problems) == 2
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0")
    assert process.check_inputs(has_input=True, weights=weights, mask_ratio=0.0) == []
    out_file = tmp_path / "file"
    out_file.write_text("x")
    assert process.check_inputs(has_input=True, weights=weights, out_dir=out_file) == [
        f"Output folder is a file: {out_file}"]


def test_engine_environment_puts_library_first():
    env = process.engine_environment(Path("/lib/root"), base={"PYTHONPATH": "/a" + __import__("os").pathsep + "/b"})
    assert env["PYTHONPATH"].split(__import__("os").pathsep) == ["/lib/root", "/a", "/b"]
    assert env["PYTHONUNBUFFERED"] == "1" and env["PYTHONUTF8"] == "1"


def test_engine_python_is_slicers_launcher_never_sys_executable():
    assert process.engine_python(which=lambda name: f"/slicer/bin/{name}") == "/slicer/bin/PythonSlicer"
    with pytest.raises(process.EngineNotFoundError, match="PythonSlicer"):
        process.engine_python(which=lambda name: None)


# ---------------------------------------------------------------------------------------------------------------
# process: the child process, with the fake engine
# ---------------------------------------------------------------------------------------------------------------


def test_engine_process_error_event_and_exit_code_2(request_files):
    rec = Recorder()
    run = process.EngineProcess(fake_command(request_files), env=fake_env("error"), **rec.kwargs())
    run.start()
    assert run.wait(timeout=60) == "error"
    assert run.returncode == 2
    assert rec.done == [] and len(rec.errors) == 1
    assert rec.errors[0].endswith("no b0 volume (b < 50 s/mm^2); the signal cannot be normalised")
    assert rec.progress == [(0.0, "loading the DWI")]
    assert json.loads((request_files.out_dir / "argv.json").read_text()) == fake_command(request_files)[2:]


def test_engine_process_crash_reports_last_line_not_traceback(request_files):
    rec = Recorder()
    run = process.EngineProcess(fake_command(request_files), env=fake_env("crash"), **rec.kwargs())
    run.start()
    assert run.wait(timeout=60) == "error"
    assert run.returncode == 1
    assert rec.errors == ["RuntimeError: CUDA out of memory (fake)"]
    assert any(line.startswith("Traceback") for line in rec.log)  # the traceback goes to the log only


def test_engine_process_exit_0_without_done_is_an_error(request_files):
    rec = Recorder()
    run = process.EngineProcess(fake_command(request_files), env=fake_env("nodone"), **rec.kwargs())
    run.start()
    assert run.wait(timeout=60) == "error"
    assert rec.errors == ["The engine stopped without reporting a result."] and rec.done == []
    # plain and malformed lines reach the log, not the progress callback
    assert [f for f, _ in rec.progress] == [0.0, 0.5]
    assert "fake_engine: plain log line, not JSON" in rec.log
    assert '{"event": "progress", "fraction": "half"}' in rec.log


def test_engine_process_missing_executable_raises(request_files):
    run = process.EngineProcess(["/nonexistent/PythonSlicer", "-m", "DRoPE"])
    with pytest.raises(OSError):
        run.start()
    assert not run.running and run.poll() is False


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX")
def test_engine_process_cancel_sends_sigterm_and_poll_does_not_block(request_files):
    rec = Recorder()
    run = process.EngineProcess(fake_command(request_files), env=fake_env("slow"), **rec.kwargs())
    run.start()
    deadline = time.monotonic() + 30
    while not rec.progress and time.monotonic() < deadline:
        started = time.monotonic()
        assert run.poll() is True
        assert time.monotonic() - started < 0.5  # poll never waits for the child
        time.sleep(0.02)
    assert rec.progress, "the fake engine never reported progress"
    run.cancel()
    assert run.wait(timeout=30) == "cancelled"
    assert rec.cancelled == 1 and rec.errors == [] and rec.done == []
    assert (request_files.out_dir / "terminated").read_text() == "SIGTERM"  # handled SIGTERM, not killed
    assert run.returncode == 143
    run.cancel()  # after the end: no effect, no second report
    assert run.poll() is False and rec.cancelled == 1


def pid_alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (an orphan's zombie may wait for a busy init)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.joinpath("self").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except FileNotFoundError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.skipif(sys.platform == "win32", reason="process groups and SIGTERM are POSIX")
@pytest.mark.parametrize("mode", ["slow", "stubborn"])
def test_cancel_stops_an_engine_behind_a_launcher_without_blocking_poll(mode, request_files, tmp_path):
    """PythonSlicer runs python-real as its own child and forwards no signal: cancel must stop the whole tree
    within 3 s (``stubborn`` ignores SIGTERM, so the kill after KILL_AFTER_S does it), and poll never blocks."""
    launcher_pid_file = tmp_path / "launcher.pid"
    command = process.build_command(request_files, prefix=[sys.executable, str(FAKE_LAUNCHER), str(FAKE_ENGINE)])
    rec = Recorder()
    run = process.EngineProcess(command, env={**fake_env(mode), "FAKE_LAUNCHER_PID_FILE": str(launcher_pid_file)},
                                **rec.kwargs())
    run.start()
    slowest = 0.0

    def timed_poll():
        nonlocal slowest
        started = time.monotonic()
        still = run.poll()
        slowest = max(slowest, time.monotonic() - started)
        return still

    pid_file = request_files.out_dir / "engine.pid"
    deadline = time.monotonic() + 30
    while not (rec.progress and pid_file.is_file()) and time.monotonic() < deadline:
        assert timed_poll()
        time.sleep(0.02)
    engine_pid, launcher_pid = int(pid_file.read_text()), int(launcher_pid_file.read_text())
    assert engine_pid != launcher_pid and pid_alive(engine_pid)
    run.cancel()
    cancelled = time.monotonic()
    while timed_poll() and time.monotonic() - cancelled < 10:
        time.sleep(0.02)
    stopped_after = time.monotonic() - cancelled
    assert run.outcome == "cancelled" and rec.cancelled == 1 and rec.errors == []
    assert not pid_alive(engine_pid) and not pid_alive(launcher_pid)
    assert stopped_after < 3.0 and slowest < 0.5, (stopped_after, slowest)
    print(f"{mode}: stopped {stopped_after:.2f} s after cancel; slowest poll {slowest * 1000:.1f} ms")


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_kill_stops_the_tree_at_once(request_files):
    command = process.build_command(request_files, prefix=[sys.executable, str(FAKE_LAUNCHER), str(FAKE_ENGINE)])
    rec = Recorder()
    run = process.EngineProcess(command, env=fake_env("stubborn"), **rec.kwargs())
    run.start()
    pid_file = request_files.out_dir / "engine.pid"
    deadline = time.monotonic() + 30
    while not pid_file.is_file() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    engine_pid = int(pid_file.read_text())
    run.kill()
    killed = time.monotonic()
    while pid_alive(engine_pid) and time.monotonic() - killed < 5:
        time.sleep(0.02)
    assert time.monotonic() - killed < 1.0
    assert run.wait(timeout=10) == "cancelled" and rec.cancelled == 1


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM semantics are POSIX")
def test_engine_process_cancel_without_cancel_callback_reports_error(request_files):
    rec = Recorder()
    run = process.EngineProcess(fake_command(request_files), env=fake_env("slow"), **rec.kwargs(with_cancel=False))
    run.start()
    run.cancel()
    assert run.wait(timeout=30) == "cancelled"
    assert rec.errors == ["Cancelled."]


# ---------------------------------------------------------------------------------------------------------------
# paths and dependencies
# ---------------------------------------------------------------------------------------------------------------


def test_paths_in_a_checkout(sample_dir):
    module_dir = REPO_ROOT / "DRoPEModule"
    assert paths.MODULE_DIR == module_dir
    assert paths.sample_dwi_nrrd() == sample_dir / "dwi.nrrd"
    assert paths.library_root(module_dir) == REPO_ROOT
    assert paths.requirements_file() == module_dir / "Resources" / "requirements.txt"
    expected_weights = REPO_ROOT / "Resources" / "model" / "model.safetensors"
    assert paths.bundled_weights() == (expected_weights if expected_weights.is_file() else None)
    assert paths.fsl_sidecars(sample_dir / "dwi.nii.gz") == (sample_dir / "dwi.bval", sample_dir / "dwi.bvec")


def test_paths_sidecar_variants_and_optional_path(tmp_path):
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "a.bvals").write_text("0")
    assert paths.fsl_sidecars(tmp_path / "a.nii") == (tmp_path / "a.bvals", None)
    assert [paths.optional_path(v) for v in (None, "", ".", Path(), " ")] == [None] * 5
    assert paths.optional_path("x/y") == Path("x/y")


def test_requirements_file_lists_the_engine_packages():
    requirements = dependencies.read_requirements(paths.requirements_file())
    names = {req.name.lower() for req in requirements}
    assert {"dipy", "nibabel", "pynrrd", "simpleitk", "safetensors", "tqdm", "pyyaml", "matplotlib"} <= names
    assert next(req for req in requirements if req.name == "SimpleITK").specifier == ""  # Slicer's own build
    assert "torch" not in names  # torch comes from the PyTorch extension
    imports = {req.name.lower(): req.import_name for req in requirements}
    assert imports["pynrrd"] == "nrrd" and imports["pyyaml"] == "yaml" and imports["simpleitk"] == "SimpleITK"
    assert dependencies.missing_requirements(requirements) == []  # this environment has them all


def test_missing_requirements_by_import_and_version():
    reqs = [dependencies.parse_requirement(line) for line in ("dipy>=1.9", "pynrrd>=1.0", "tqdm", "pyyaml >= 6.0")]
    assert reqs[3].specifier == ">=6.0" and reqs[3].line == "pyyaml >= 6.0"
    present = {"dipy", "yaml", "tqdm"}  # nrrd not importable
    versions = {"dipy": "1.8.0", "pyyaml": "6.0.1", "tqdm": None}
    missing = dependencies.missing_requirements(
        reqs, find_spec=lambda name: object() if name in present else None, installed_version=versions.get)
    assert [req.name for req in missing] == ["dipy", "pynrrd"]  # dipy too old, pynrrd not importable
    assert dependencies.parse_requirement("  # comment") is None and dependencies.parse_requirement("") is None
    with pytest.raises(ValueError):
        dependencies.parse_requirement("dipy ~~ 1")


class FakePyTorchUtils:
    """Stands in for the PyTorch extension's PyTorchUtils module: installTorch 'installs' ``installs``."""

    def __init__(self, installs: str | None):
        self.calls, self.installed, outer = [], None, self
        self._installs = installs

        class PyTorchUtilsLogic:
            def installTorch(self, askConfirmation=False, torchVersionRequirement=None):
                outer.calls.append(("installTorch", askConfirmation, torchVersionRequirement))
                outer.installed = outer._installs
                return None if outer._installs is None else object()

        self.PyTorchUtilsLogic = PyTorchUtilsLogic


def dependency_plan(torch_version, importable=("dipy", "nibabel", "nrrd", "scipy", "SimpleITK", "safetensors",
                                                "tqdm", "yaml", "matplotlib")):
    requirements = dependencies.read_requirements(paths.requirements_file())
    return dependencies.plan_installation(requirements, torch_version,
                                          find_spec=lambda name: object() if name in importable else None,
                                          installed_version=lambda name: None)


def test_install_plan_asks_for_torch_2_and_never_pip_installs_simpleitk():
    plan = dependency_plan("1.13.1", importable=("dipy", "SimpleITK", "tqdm", "yaml", "matplotlib", "scipy"))
    assert plan.torch == "PyTorch >=2.0 (with the PyTorch extension; 1.13.1 is installed)"
    assert [req.name for req in plan.packages] == ["nibabel", "pynrrd", "safetensors"]
    assert plan.describe().splitlines() == [
        "- PyTorch >=2.0 (with the PyTorch extension; 1.13.1 is installed)", "- nibabel>=5.2 (pip)",
        "- pynrrd>=1.0 (pip)", "- safetensors>=0.4 (pip)"]
    assert not dependency_plan("2.13.0")  # nothing to do
    assert dependency_plan(None).torch.startswith("PyTorch >=2.0")
    with pytest.raises(dependencies.DependencyError, match="SimpleITK ships with Slicer"):
        dependency_plan("2.1", importable=("dipy",))


def test_first_run_asks_once_then_installs_torch_then_the_rest():
    plan = dependency_plan(None, importable=("SimpleITK", "tqdm", "yaml", "matplotlib", "scipy", "dipy"))
    torch_utils, asked, pip = FakePyTorchUtils("2.4.0"), [], []
    dependencies.ensure_dependencies(plan, torch_utils=torch_utils, confirm=lambda text: asked.append(text) or True,
                                     install_packages=pip.append, torch_version=lambda: torch_utils.installed)
    assert len(asked) == 1 and "PyTorch >=2.0" in asked[0] and "nibabel>=5.2" in asked[0]
    assert torch_utils.calls == [("installTorch", False, ">=2.0")]
    assert pip == [["nibabel>=5.2", "pynrrd>=1.0", "safetensors>=0.4"]]


@pytest.mark.parametrize("case", ["declined", "no extension", "old torch", "testing", "pip fails"])
def test_first_run_failures_raise_and_install_nothing_more(case):
    plan = dependency_plan("1.13" if case == "old torch" else None, importable=("SimpleITK", "dipy"))
    torch_utils = None if case == "no extension" else FakePyTorchUtils("1.13" if case == "old torch" else "2.4")
    pip = []

    def install(lines):
        if case == "pip fails":
            raise OSError("no network")
        pip.append(lines)

    with pytest.raises(dependencies.DependencyError) as info:
        dependencies.ensure_dependencies(
            plan, torch_utils=torch_utils, confirm=lambda text: case != "declined", install_packages=install,
            torch_version=lambda: torch_utils.installed if torch_utils else None, testing=case == "testing")
    expected = {"declined": "cannot run without", "no extension": "PyTorch extension", "old torch": "found: 1.13",
                "testing": "Testing mode", "pip fails": "no network"}[case]
    assert expected in str(info.value)
    assert pip == []
    if case in ("declined", "testing", "no extension"):
        assert torch_utils is None or torch_utils.calls == []


# ---------------------------------------------------------------------------------------------------------------
# MRML (slicer-core)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def slicer_mod():
    return pytest.importorskip("slicer", reason="slicer-core is not installed")


@pytest.fixture
def scene(slicer_mod):
    scene = slicer_mod.vtkMRMLScene()
    slicer_mod.mrmlScene = scene
    yield scene
    scene.Clear(1)


@pytest.fixture
def colored_scene(scene, slicer_mod):
    logic = slicer_mod.vtkSlicerColorLogic()
    logic.SetMRMLScene(scene)  # the default colour nodes of a real Slicer scene
    yield scene
    logic.SetMRMLScene(None)


@pytest.fixture
def mrml_io(slicer_mod):
    from DRoPEModuleLib import mrml_io

    return mrml_io


def read_nrrd_reference(path: Path):
    """Independent reading with pynrrd: data (I, J, K, N), ijk_to_ras, b-values, world RAS unit gradients."""
    import nrrd

    data, header = nrrd.read(str(path))
    assert header["space"] == "right-anterior-superior" and header["kinds"][0] == "list"
    ijk = np.eye(4)
    ijk[:3, :3] = np.asarray(header["space directions"][1:], dtype=float).T
    ijk[:3, 3] = header["space origin"]
    frame = np.asarray(header["measurement frame"], dtype=float).T  # pynrrd rows are the columns of M
    grads = np.array([[float(x) for x in header[f"DWMRI_gradient_{i:04d}"].split()] for i in range(data.shape[0])])
    bvals = float(header["DWMRI_b-value"]) * np.sum(grads**2, axis=1)
    world = grads @ frame.T
    norms = np.linalg.norm(world, axis=1)
    world[norms > 0] /= norms[norms > 0, None]
    return np.moveaxis(data, 0, -1), ijk, bvals, world


def node_world_gradients(mrml_io, node):
    arrays = mrml_io.dwi_arrays(node)
    return arrays.world_gradients(), arrays


def crop_node(scene, mrml_io, source, name, box=(slice(14, 22), slice(30, 46), slice(28, 44)), volumes=None):
    """A small DWI node cut from ``source`` (K, J, I slices), keeping its oblique geometry and gradients."""
    arrays = mrml_io.dwi_arrays(source)
    ks, js, is_ = box
    origin = arrays.ijk_to_ras @ np.array([is_.start, js.start, ks.start, 1.0])
    ijk = arrays.ijk_to_ras.copy()
    ijk[:3, 3] = origin[:3]
    select = slice(None) if volumes is None else slice(0, volumes)
    return mrml_io.create_dwi_node(scene, name, arrays.data[ks, js, is_, select], ijk, arrays.bvalues[select],
                                   arrays.gradients[select], arrays.measurement_frame)


def test_read_dwi_nrrd_matches_pynrrd(scene, mrml_io, sample_dir):
    path = sample_dir / "dwi.nrrd"
    node = mrml_io.read_dwi_nrrd(scene, path)
    data, ijk, bvals, world = read_nrrd_reference(path)
    node_world, arrays = node_world_gradients(mrml_io, node)
    assert node.IsA("vtkMRMLDiffusionWeightedVolumeNode") and node.GetDisplayNode() is not None
    np.testing.assert_array_equal(arrays.data, np.transpose(data, (2, 1, 0, 3)))
    np.testing.assert_allclose(arrays.ijk_to_ras, ijk, atol=1e-9)
    np.testing.assert_allclose(arrays.bvalues, bvals, atol=1e-3)
    np.testing.assert_allclose(node_world, world, atol=1e-6)
    assert set(np.round(arrays.bvalues)) == {0.0, 1500.0}


def test_export_and_reread_keeps_everything(scene, mrml_io, sample_dir, tmp_path):
    node = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    path = mrml_io.export_dwi(node, tmp_path)
    assert path == tmp_path / "input_dwi.nrrd" and "DWMRI_b-value" in mrml_io.nrrd_header_keys(path)
    again = mrml_io.read_dwi_nrrd(scene, path)
    before, after = mrml_io.dwi_arrays(node), mrml_io.dwi_arrays(again)
    np.testing.assert_array_equal(after.data, before.data)
    np.testing.assert_allclose(after.ijk_to_ras, before.ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(after.gradients, before.gradients, atol=1e-12)
    np.testing.assert_allclose(after.measurement_frame, before.measurement_frame, atol=1e-12)
    np.testing.assert_allclose(after.bvalues, before.bvalues, atol=1e-6)


def test_slicer_writer_drops_dwi_keys_below_7_volumes(scene, mrml_io, slicer_mod, sample_dir, tmp_path):
    """Why export_dwi has its own writer: Slicer's NRRD writer silently loses the gradients of small DWIs."""
    source = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    small = crop_node(scene, mrml_io, source, "small", volumes=6)
    storage = slicer_mod.vtkMRMLNRRDStorageNode()
    storage.SetFileName(str(tmp_path / "slicer.nrrd"))
    assert storage.WriteData(small)
    assert "DWMRI_b-value" not in mrml_io.nrrd_header_keys(tmp_path / "slicer.nrrd")


@pytest.mark.parametrize("n_volumes", [2, 3, 4, 6, 7])
def test_export_few_volumes_keeps_gradient_table(scene, mrml_io, sample_dir, tmp_path, n_volumes):
    source = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    small = crop_node(scene, mrml_io, source, "small", volumes=n_volumes)
    path = mrml_io.export_dwi(small, tmp_path)
    keys = mrml_io.nrrd_header_keys(path)
    assert keys["kinds"] == "list domain domain domain" and keys["modality"] == "DWMRI"
    assert len([k for k in keys if k.startswith("DWMRI_gradient_")]) == n_volumes

    before = mrml_io.dwi_arrays(small)
    again = mrml_io.dwi_arrays(mrml_io.read_dwi_nrrd(scene, path))  # Slicer's own reader
    np.testing.assert_array_equal(again.data, before.data)
    np.testing.assert_allclose(again.ijk_to_ras, before.ijk_to_ras, atol=1e-12)
    np.testing.assert_allclose(again.world_gradients(), before.world_gradients(), atol=1e-9)
    np.testing.assert_allclose(again.bvalues, before.bvalues, atol=1e-6)

    _, ijk, bvals, world = read_nrrd_reference(path)  # an independent reader agrees too
    np.testing.assert_allclose(bvals, before.bvalues, atol=1e-6)
    np.testing.assert_allclose(world, before.world_gradients(), atol=1e-9)


def test_read_dwi_nrrd_rejects_a_scalar_volume(scene, mrml_io, tmp_path):
    import nrrd

    nrrd.write(str(tmp_path / "scalar.nrrd"), np.zeros((4, 5, 6), np.float32))
    with pytest.raises(ValueError, match="not a diffusion-weighted NRRD"):
        mrml_io.read_dwi_nrrd(scene, tmp_path / "scalar.nrrd")
    assert scene.GetNodesByClass("vtkMRMLDiffusionWeightedVolumeNode").GetNumberOfItems() == 0
    with pytest.raises(ValueError, match="file not found"):
        mrml_io.read_dwi_nrrd(scene, tmp_path / "nothing.nrrd")


def test_nifti_dwi_node_matches_the_nrrd_of_the_same_series(scene, mrml_io, sample_dir):
    """The bundled sample holds one oblique series as NIfTI + bval/bvec and as Slicer DWI NRRD."""
    pytest.importorskip("DRoPE.io")
    nifti = mrml_io.load_nifti_dwi(scene, sample_dir / "dwi.nii.gz")
    nrrd_node = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    a, b = mrml_io.dwi_arrays(nifti), mrml_io.dwi_arrays(nrrd_node)
    np.testing.assert_allclose(a.ijk_to_ras, b.ijk_to_ras, atol=1e-4)  # the file's own grid is kept
    np.testing.assert_array_equal(a.data, b.data.astype(np.float32))
    np.testing.assert_allclose(a.bvalues, b.bvalues, atol=1e-2)
    np.testing.assert_allclose(a.world_gradients(), b.world_gradients(), atol=1e-6)


def test_match_geometry_snaps_only_matching_grids(scene, mrml_io, slicer_mod):
    ijk = np.array([[0.0, 2, 0, 10], [-3, 0, 0, 20], [0, 0, 1.5, -5], [0, 0, 0, 1]])
    reference = slicer_mod.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), ijk, name="ref")
    near = slicer_mod.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), ijk + 1e-5, name="near")
    assert mrml_io.match_geometry(near, reference)
    np.testing.assert_array_equal(mrml_io.ijk_to_ras(near), ijk)
    shifted = ijk.copy()
    shifted[0, 3] += 0.5
    far = slicer_mod.util.addVolumeFromArray(np.zeros((4, 5, 6), np.float32), shifted, name="far")
    other = slicer_mod.util.addVolumeFromArray(np.zeros((4, 5, 7), np.float32), ijk, name="other")
    assert not mrml_io.match_geometry(far, reference) and not mrml_io.match_geometry(other, reference)
    np.testing.assert_array_equal(mrml_io.ijk_to_ras(far), shifted)


def test_match_geometry_reindexes_reversed_and_permuted_voxel_orders(scene, mrml_io, slicer_mod):
    """Same voxel centres stored in another order (as Slicer's ITK NIfTI reader does for det < 0 files)."""
    ijk = np.array([[0.0, 2, 0, 10], [-3, 0, 0, 20], [0, 0, 1.5, -5], [0, 0, 0, 1]])
    values = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)  # (K, J, I)
    reference = slicer_mod.util.addVolumeFromArray(values, ijk, name="ref")
    centres = lambda m, shape: {tuple(np.round(m @ [i, j, k, 1], 6)[:3]): values_at  # noqa: E731
                                for values_at in [None] for k in range(shape[0]) for j in range(shape[1])
                                for i in range(shape[2])}
    # K reversed: voxel k of the copy is voxel 3 - k of the reference
    k_flip = ijk.copy()
    k_flip[:3, 2] *= -1
    k_flip[:3, 3] = (ijk @ [0, 0, 3, 1])[:3]
    flipped = slicer_mod.util.addVolumeFromArray(np.ascontiguousarray(values[::-1]), k_flip, name="flipped")
    # I and J swapped and J reversed
    ij = ijk.copy()
    ij[:3, 0], ij[:3, 1] = -ijk[:3, 1], ijk[:3, 0]
    ij[:3, 3] = (ijk @ [0, 4, 0, 1])[:3]
    swapped_values = np.ascontiguousarray(np.transpose(values, (0, 2, 1))[:, :, ::-1])
    swapped = slicer_mod.util.addVolumeFromArray(swapped_values, ij, name="swapped")
    for node, matrix, shape in ((flipped, k_flip, (4, 5, 6)), (swapped, ij, (4, 6, 5))):
        assert centres(matrix, shape).keys() == centres(ijk, (4, 5, 6)).keys()  # the premise: same voxel centres
        assert mrml_io.match_geometry(node, reference)
        np.testing.assert_array_equal(mrml_io.ijk_to_ras(node), ijk)
        np.testing.assert_array_equal(slicer_mod.util.arrayFromVolume(node), values)


def test_robust_range():
    from DRoPEModuleLib.mrml_io import robust_range

    values = np.concatenate([np.zeros(1000), np.linspace(0.01, 1.0, 100)])
    assert robust_range(values) == (0.0, pytest.approx(np.percentile(np.linspace(0.01, 1.0, 100), 99)))
    assert robust_range(np.array([-2.0, 1.0, 0.0]))[0] < 0
    assert robust_range(np.zeros(10)) == (0.0, 1.0)


def test_heat_colour_fallback_without_colour_logic(scene, mrml_io):
    first = mrml_io.heat_color_node_id(scene)
    node = scene.GetNodeByID(first)
    assert node.GetName() == "DRoPE heat" and node.GetNumberOfColors() == 256
    assert mrml_io.heat_color_node_id(scene) == first  # made once
    rgba = [0.0] * 4
    node.GetColor(255, rgba)
    assert rgba[:3] == pytest.approx([1.0, 1.0, 1.0])


def test_set_slice_layers(scene, mrml_io, slicer_mod):
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    back = slicer_mod.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), name="back")
    fore = slicer_mod.util.addVolumeFromArray(np.ones((2, 2, 2), np.float32), name="fore")
    assert mrml_io.set_slice_layers(scene, back, fore, 0.4) == 3
    for view in views:
        assert view.GetBackgroundVolumeID() == back.GetID() and view.GetForegroundVolumeID() == fore.GetID()
        assert view.GetForegroundOpacity() == pytest.approx(0.4)


def test_load_table_csv(scene, mrml_io, tmp_path):
    (tmp_path / "t.csv").write_text("volume,shell,attention\n0,b0,0.25\n1,b1500,0.75\n")
    table = mrml_io.load_table_csv(scene, tmp_path / "t.csv").GetTable()
    assert table.GetNumberOfRows() == 2 and table.GetColumn(1).IsA("vtkStringArray")
    assert table.GetColumn(2).GetValue(1) == pytest.approx(0.75) and table.GetColumn(1).GetValue(0) == "b0"
    (tmp_path / "bad.csv").write_text("a,b\n1\n")
    with pytest.raises(ValueError, match="columns"):
        mrml_io.load_table_csv(scene, tmp_path / "bad.csv")


# ---------------------------------------------------------------------------------------------------------------
# The whole run: node -> export -> engine process -> results on the input's grid
# ---------------------------------------------------------------------------------------------------------------


def slicer_arrays(node):
    import slicer

    return slicer.util.arrayFromVolume(node)


def run_engine(command, env, timeout=300):
    rec = Recorder()
    run = process.EngineProcess(command, env=env, **rec.kwargs())
    run.start()
    outcome = run.wait(timeout=timeout)
    assert outcome == "done", f"engine outcome {outcome}: {rec.errors} {rec.log[-20:]}"
    return rec


def test_fake_run_outputs_load_on_the_input_grid(colored_scene, mrml_io, sample_dir, tmp_path):
    pytest.importorskip("DRoPE.io")
    import nibabel as nib

    from DRoPEModuleLib import results as results_lib

    scene = colored_scene
    source = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    node = crop_node(scene, mrml_io, source, "crop")
    probe = tmp_path / "probe.json"
    probe.write_text("{}")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"\0")
    out = tmp_path / "out"
    request = process.ReconstructionRequest(mrml_io.export_dwi(node, tmp_path / "in"), out, weights, probe=probe)
    rec = run_engine(fake_command(request), fake_env("ok"))
    assert rec.done == [str(out)] and [f for f, _ in rec.progress] == [0.0, 0.5, 1.0]

    res = results_lib.load_results(scene, out, node)
    assert res.missing == [] and res.off_grid == []
    nodes = res.volume_nodes()
    assert len(nodes) == 8
    for volume in nodes:
        assert mrml_io.dimensions(volume) == mrml_io.dimensions(node) == (16, 16, 8)
        np.testing.assert_allclose(mrml_io.ijk_to_ras(volume), mrml_io.ijk_to_ras(node), atol=1e-9)  # not 1e-3
    # independent check that the files really are on the input grid (float32 NIfTI affine)
    np.testing.assert_allclose(nib.load(out / "fa.nii.gz").affine, mrml_io.ijk_to_ras(node), atol=1e-3)
    for volume, name in ((res.fa, "fa"), (res.md_error, "md_error"), (res.attention, "attention")):
        on_disk = np.asarray(nib.load(out / f"{name}.nii.gz").dataobj)  # (I, J, K) in the file's order
        np.testing.assert_array_equal(slicer_arrays(volume), np.transpose(on_disk, (2, 1, 0)))

    recon, original = mrml_io.dwi_arrays(res.reconstruction), mrml_io.dwi_arrays(node)
    scale = 1 + np.arange(original.n_volumes) / 100  # the fake engine's "reconstruction" of volume v
    np.testing.assert_allclose(recon.data, original.data * scale, rtol=1e-5)
    np.testing.assert_allclose(recon.world_gradients(), original.world_gradients(), atol=1e-6)
    np.testing.assert_allclose(recon.bvalues, original.bvalues, atol=1e-3)

    fa_display, md_display = res.fa.GetDisplayNode(), res.md_recon.GetDisplayNode()
    assert not fa_display.GetAutoWindowLevel()
    assert (fa_display.GetWindow(), fa_display.GetLevel()) == pytest.approx((1.0, 0.5))
    assert (md_display.GetWindow(), md_display.GetLevel()) == pytest.approx((3e-3, 1.5e-3))
    error = np.asarray(nib.load(out / "fa_error.nii.gz").dataobj)
    p99 = np.percentile(np.abs(error[error != 0]), 99)
    error_display = res.fa_error.GetDisplayNode()
    assert (error_display.GetWindow(), error_display.GetLevel()) == pytest.approx((p99, p99 / 2), rel=1e-5)
    assert error_display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert res.attention.GetDisplayNode().GetColorNodeID() != "vtkMRMLColorTableNodeGrey"

    n = original.n_volumes
    table = res.diffusion_attention.GetTable()
    assert table.GetNumberOfRows() == n and table.GetNumberOfColumns() == n + 1
    assert table.GetColumnName(0) == "query\\key" and table.GetColumnName(2) == "v1_b1500"
    matrix = np.loadtxt(out / "diffusion_attention.csv", delimiter=",", skiprows=1, usecols=range(1, n + 1))
    profile = mrml_io.table_columns(res.diffusion_attention_profile)
    np.testing.assert_allclose(profile["mean attention"], matrix.mean(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(profile["volume"], np.arange(n))
    np.testing.assert_array_equal(profile["b-value"], [0.0] + [1500.0] * (n - 1))
    series = scene.GetNodeByID(res.diffusion_attention_chart.GetPlotSeriesNodeID())
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("volume", "mean attention")
    assert series.GetTableNodeID() == res.diffusion_attention_profile.GetID()
    np.testing.assert_array_equal(res.latent, np.arange(16) / 4.0)
    assert res.prediction == {"label": "control", "probability": 0.8125}
    assert results_lib.prediction_summary(res.prediction) == "label: control\nprobability: 0.8125"
    assert results_lib.latent_summary(res.latent).startswith(f"dimension 16, norm {np.linalg.norm(res.latent):.4g};")


def test_attention_profile_only_for_the_matrix_layout():
    from DRoPEModuleLib.results import attention_profile

    matrix = {"query\\key": np.array(["v0_b0", "v4_b1000"]), "v0_b0": np.array([0.2, 0.6]),
              "v4_b1000": np.array([0.8, 0.4])}
    profile = attention_profile(matrix)
    assert profile["volume"] == [0, 4] and profile["b-value"] == [0.0, 1000.0]
    np.testing.assert_allclose(profile["mean attention"], [0.4, 0.6])
    assert attention_profile({"volume": np.array([0.0, 1.0]), "attention": np.array([0.5, 0.5])}) is None
    assert attention_profile({"q": np.array(["a", "b", "c"]), "a": np.zeros(3), "b": np.zeros(3)}) is None


def test_results_missing_reconstruction_is_an_error(scene, mrml_io, slicer_mod, tmp_path):
    from DRoPEModuleLib import results as results_lib

    reference = slicer_mod.util.addVolumeFromArray(np.zeros((2, 2, 2), np.float32), name="ref")
    with pytest.raises(results_lib.ResultsError, match="reconstruction.nii.gz"):
        results_lib.load_results(scene, tmp_path, reference)
    with pytest.raises(results_lib.ResultsError, match="not found"):
        results_lib.load_results(scene, tmp_path / "absent", reference)


@pytest.fixture(scope="module")
def real_cli():
    """Skip unless the real engine has ``python -m DRoPE reconstruct ... --progress``."""
    pytest.importorskip("DRoPE.reconstruct")
    cli = subprocess.run([sys.executable, "-m", "DRoPE", "reconstruct", "--help"], capture_output=True, text=True,
                         env=process.engine_environment(REPO_ROOT), timeout=120)
    if cli.returncode != 0 or "--progress" not in cli.stdout:
        pytest.skip("the engine CLI has no 'reconstruct ... --progress' command yet")


def test_real_engine_reports_bad_input_as_one_message(real_cli, tmp_path):
    """The module's protocol against the real CLI: exit code 2 and an error event naming the file."""
    import nrrd

    bad = tmp_path / "not_dwi.nrrd"
    nrrd.write(str(bad), np.zeros((4, 5, 6, 7), np.float32))
    weights = paths.bundled_weights()  # the engine checks the weights before the input
    if weights is None:
        pytest.skip("no bundled weights")
    command = process.build_command(process.ReconstructionRequest(bad, tmp_path / "out", weights, device="cpu"),
                                    process.engine_prefix(sys.executable))
    rec = Recorder()
    run = process.EngineProcess(command, env=process.engine_environment(REPO_ROOT), **rec.kwargs())
    run.start()
    assert run.wait(timeout=300) == "error"
    assert run.returncode == 2 and len(rec.errors) == 1
    assert "not_dwi.nrrd" in rec.errors[0] and "Traceback" not in rec.errors[0] and "\n" not in rec.errors[0]


@pytest.mark.slow
def test_reconstruct_with_a_tiny_checkpoint(real_cli, colored_scene, mrml_io, sample_dir, tmp_path):
    """The real engine end to end: Slicer node -> export -> ``python -m DRoPE reconstruct`` -> nodes on the grid,
    with a randomly initialised tiny-preset checkpoint (the outputs' values are meaningless, their geometry not)."""
    from DRoPE.model import DRoPEMAE, model_config, save_model

    from DRoPEModuleLib import results as results_lib

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    weights = save_model(DRoPEMAE(model_config("tiny")), tmp_path / "tiny") / "model.safetensors"
    scene = colored_scene
    source = mrml_io.read_dwi_nrrd(scene, sample_dir / "dwi.nrrd")
    node = crop_node(scene, mrml_io, source, "crop", box=(slice(12, 24), slice(24, 56), slice(24, 56)))
    out = tmp_path / "out"
    request = process.ReconstructionRequest(mrml_io.export_dwi(node, tmp_path / "in"), out, weights,
                                            device="cpu", seed=0)
    run_engine(process.build_command(request, process.engine_prefix(sys.executable)), process.engine_environment(REPO_ROOT), 600)
    res = results_lib.load_results(scene, out, node)
    assert res.off_grid == [] and res.missing == []
    for volume in res.volume_nodes():
        assert mrml_io.dimensions(volume) == mrml_io.dimensions(node)
        np.testing.assert_allclose(mrml_io.ijk_to_ras(volume), mrml_io.ijk_to_ras(node), atol=1e-9)
    assert res.latent is not None and res.latent.size > 0 and np.all(np.isfinite(res.latent))
    assert res.reconstruction.GetNumberOfGradients() > 0
