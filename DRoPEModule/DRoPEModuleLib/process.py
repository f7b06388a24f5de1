"""Run the headless engine (``python -m DRoPE reconstruct ... --progress json``) as a child process.

Four requests, each one engine command: ``ReconstructionRequest`` (``reconstruct``), ``GradientCheckRequest``
(``check-gradients``), ``SynthesisRequest`` (``synthesize``) and ``DriftRequest`` (``DRoPETrain/probe.py drift``).

The GUI never blocks: ``EngineProcess.start`` launches the process, reader threads queue its output lines, and
``poll`` (called by the widget's ``qt.QTimer``, or in a loop by ``wait``) hands them to plain callbacks in the
caller's thread; it never waits for the child::

    request = ReconstructionRequest(Path("dwi.nrrd"), Path("out"), weights=Path("model.safetensors"))
    run = EngineProcess(build_command(request, engine_prefix(engine_python())), on_progress=bar, on_done=load,
                        on_error=show)
    run.start()
    timer.timeout.connect(run.poll)   # run.poll() returns False once finished; run.cancel() stops it

``PythonSlicer`` is a launcher that runs ``python-real`` as its own child and forwards no signal, so the engine is
started in a new process group (POSIX session; Windows process group) and ``cancel``/``kill`` stop the whole tree.

Protocol (stdout, one JSON object per line): ``{"event": "progress", "fraction": 0.4, "message": "..."}``,
``{"event": "done", "out": DIR, ...}`` (further fields: the command's result, e.g. ``"result"`` of the gradient
check), ``{"event": "error", "message": "..."}``. Other lines are logged only.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEVICES = ("auto", "cpu", "cuda")
MIN_DRIFT_DRAWS = 2
KILL_AFTER_S = 2.0  # after cancel(), the process tree is killed if it has not stopped within this time
ENGINE_LAUNCHER = "PythonSlicer"


class RequestError(ValueError):
    """Invalid reconstruction parameters; the message lists every problem."""


class EngineNotFoundError(RuntimeError):
    """Slicer's Python launcher (PythonSlicer), which runs the engine, was not found."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters -> command line
# ---------------------------------------------------------------------------------------------------------------


def check_inputs(*, has_input: bool, weights: Path | None, device: str = "auto", mask_ratio: float = 0.75,
                 volumes: int = 0, probe: Path | None = None, out_dir: Path | None = None,
                 draws: int = 1) -> list[str]:
    """Every reason the engine cannot run with these parameters, as short sentences ([] when all is fine).

    ``weights`` None means none is available (no bundled file and none chosen); ``probe`` None means no probe.
    """
    problems = []
    if not has_input:
        problems.append("Select an input DWI.")
    if weights is None:
        problems.append("No model weights: choose a weights file (the extension's bundled weights were not found).")
    elif not Path(weights).exists():
        problems.append(f"Weights not found: {weights}")
    if device not in DEVICES:
        problems.append(f"Device must be one of {', '.join(DEVICES)}, not {device!r}.")
    if not (isinstance(mask_ratio, (int, float)) and math.isfinite(mask_ratio) and 0.0 <= mask_ratio < 1.0):
        problems.append(f"Mask ratio must be in [0, 1), not {mask_ratio}.")
    if not isinstance(volumes, int) or volumes < 0:
        problems.append(f"Number of volumes must be 0 (all) or positive, not {volumes}.")
    if not isinstance(draws, int) or draws < 1:
        problems.append(f"Uncertainty draws must be 1 (none) or more, not {draws}.")
    if probe is not None and not Path(probe).is_file():
        problems.append(f"Probe file not found: {probe}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        problems.append(f"Output folder is a file: {out_dir}")
    return problems


class _Request:
    """An engine command: ``problems()`` lists what is wrong, ``validate()`` raises, ``arguments()`` is the command
    line after the program; ``program`` says which ('cli': ``-m DRoPE``, 'probe': ``DRoPETrain/probe.py``)."""

    program = "cli"

    def problems(self) -> list[str]:
        raise NotImplementedError

    def validate(self) -> None:
        problems = self.problems()
        if problems:
            raise RequestError(" ".join(problems))


def _missing_files(**files) -> list[str]:
    return [f"{label} not found: {path}" for label, path in files.items() if path is None or not Path(path).is_file()]


@dataclass(frozen=True)
class ReconstructionRequest(_Request):
    """Parameters of one ``DRoPE reconstruct`` run.

    Attributes:
        input_path: DWI file the engine reads (the exported input node).
        out_dir: folder the engine writes its outputs into.
        weights: model weights (.safetensors file, or the folder holding model.safetensors + model.json);
            required here, the module resolves the bundled file itself.
        device: 'auto', 'cpu' or 'cuda'.
        mask_ratio: fraction of patches masked, in [0, 1).
        volumes: number of diffusion volumes the engine uses; 0 = the engine's default (all that fit).
        seed: random seed of the masking; None = the engine's default.
        probe: optional probe file; the engine then writes prediction.json.
        draws: number of masking draws; above 1 the engine also writes reconstruction_std and fa_std.
    """

    input_path: Path
    out_dir: Path
    weights: Path | None
    device: str = "auto"
    mask_ratio: float = 0.75
    volumes: int = 0
    seed: int | None = None
    probe: Path | None = None
    draws: int = 1

    def problems(self) -> list[str]:
        return _missing_files(**{"Input DWI file": self.input_path}) + check_inputs(
            has_input=True, weights=self.weights, device=self.device, mask_ratio=self.mask_ratio, volumes=self.volumes,
            probe=self.probe, out_dir=self.out_dir, draws=self.draws)

    def arguments(self) -> list[str]:
        """The engine command's arguments (after ``<python> -m DRoPE``)."""
        arguments = ["reconstruct", str(self.input_path), "--out", str(self.out_dir), "--weights", str(self.weights),
                     "--device", self.device, "--mask-ratio", repr(float(self.mask_ratio))]
        if self.volumes:
            arguments += ["--volumes", str(int(self.volumes))]
        if self.seed is not None:
            arguments += ["--seed", str(int(self.seed))]
        if self.probe is not None:
            arguments += ["--probe", str(self.probe)]
        if self.draws > 1:
            arguments += ["--draws", str(int(self.draws))]
        return arguments


@dataclass(frozen=True)
class GradientCheckRequest(_Request):
    """``DRoPE check-gradients``: are the b-vector signs and axis order consistent with the data?"""

    input_path: Path

    def problems(self) -> list[str]:
        return _missing_files(**{"Input DWI file": self.input_path})

    def arguments(self) -> list[str]:
        return ["check-gradients", str(self.input_path)]


@dataclass(frozen=True)
class SynthesisRequest(_Request):
    """``DRoPE synthesize``: volumes at the b-values / directions of ``bvals`` / ``bvecs`` (FSL files, image frame)."""

    input_path: Path
    bvals: Path | None
    bvecs: Path | None
    out_dir: Path
    weights: Path | None
    device: str = "auto"

    def problems(self) -> list[str]:
        problems = _missing_files(**{"Input DWI file": self.input_path, "b-value file": self.bvals,
                                     "b-vector file": self.bvecs})
        return problems + check_inputs(has_input=True, weights=self.weights, device=self.device, out_dir=self.out_dir)

    def arguments(self) -> list[str]:
        return ["synthesize", str(self.input_path), "--bvals", str(self.bvals), "--bvecs", str(self.bvecs),
                "--out", str(self.out_dir), "--weights", str(self.weights), "--device", self.device]


@dataclass(frozen=True)
class DriftRequest(_Request):
    """``probe.py drift``: latent spread under ``draws`` random protocol draws per scan against between-scan
    distances. ``data``: text list of DWI files; ``sessions``: CSV (subject_id = file path, session)."""

    data: Path
    sessions: Path
    out_csv: Path
    weights: Path | None
    draws: int = 5
    device: str = "auto"
    program = "probe"

    def problems(self) -> list[str]:
        problems = _missing_files(**{"DWI list": self.data, "Sessions file": self.sessions})
        if not isinstance(self.draws, int) or self.draws < MIN_DRIFT_DRAWS:
            problems.append(f"Protocol draws must be {MIN_DRIFT_DRAWS} or more, not {self.draws}.")
        return problems + check_inputs(has_input=True, weights=self.weights, device=self.device)

    def arguments(self) -> list[str]:
        return ["drift", "--checkpoint", str(self.weights), "--data", str(self.data), "--sessions", str(self.sessions),
                "--draws", str(int(self.draws)), "--out", str(self.out_csv), "--device", self.device]


def engine_python(which=shutil.which) -> str:
    """Path of Slicer's Python launcher, which runs the engine outside Slicer's process.

    Never ``sys.executable``: inside Slicer that is the Slicer application itself. Raises EngineNotFoundError.
    """
    found = which(ENGINE_LAUNCHER)
    if not found:
        raise EngineNotFoundError(
            f"{ENGINE_LAUNCHER} (Slicer's Python launcher) was not found on PATH; the DRoPE engine runs with it. "
            "Start Slicer from its own launcher, or reinstall Slicer.")
    return found


def engine_prefix(python: str) -> list[str]:
    """The command that starts the engine CLI: ``<python> -m DRoPE``."""
    return [python, "-m", "DRoPE"]


def probe_prefix(python: str, script: Path) -> list[str]:
    """The command that starts the probe script: ``<python> <script>`` (``DRoPETrain/probe.py``)."""
    return [python, str(script)]


def build_command(request, prefix: list[str]) -> list[str]:
    """Validate ``request`` and return ``prefix`` (``engine_prefix``, or ``probe_prefix`` for a DriftRequest) +
    the request's arguments + JSON progress."""
    request.validate()
    return [*prefix, *request.arguments(), "--progress", "json"]


def engine_environment(library_root: Path | None, base: dict | None = None) -> dict:
    """Environment for the child: unbuffered UTF-8 output and ``library_root`` (the folder holding ``DRoPE``) first
    on PYTHONPATH, since Slicer's Python launcher does not see extension folders by itself."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONUTF8"] = "1"
    if library_root is not None:
        parts = [str(library_root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(parts))
    return env


# ---------------------------------------------------------------------------------------------------------------
# Progress protocol
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProgressEvent:
    """One protocol line: ``kind`` 'progress' (fraction in [0, 1], message), 'done' (out) or 'error' (message)."""

    kind: str
    fraction: float | None = None
    message: str = ""
    out: str | None = None
    payload: dict | None = None  # 'done': every field of the event


def parse_progress_line(line: str) -> ProgressEvent | None:
    """Parse one stdout line; None for anything that is not a well-formed protocol event (plain log output)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        payload = json.loads(text)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    kind = payload.get("event")
    message = payload.get("message", "")
    message = message if isinstance(message, str) else str(message)
    if kind == "progress":
        fraction = payload.get("fraction")
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
            return None
        return ProgressEvent("progress", min(1.0, max(0.0, float(fraction))), message)
    if kind == "done":
        out = payload.get("out")
        return ProgressEvent("done", 1.0, message, None if out is None else str(out), payload)
    if kind == "error":
        return ProgressEvent("error", None, message or "the engine reported an error")
    return None


# ---------------------------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------------------------


def _last_meaningful(lines) -> str:
    """Last non-empty line (for a Python traceback: 'SomeError: message')."""
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return ""


class EngineProcess:
    """The engine running in a child process tree, reported through callbacks called from ``poll``.

    Exactly one of ``on_done(out_dir)``, ``on_error(message)`` or ``on_cancel()`` is called, once, when the run ends.
    ``on_progress(fraction, message)`` follows the progress lines; ``on_log(line)`` gets every other output line.
    Without ``on_cancel``, a cancelled run reports ``on_error("Cancelled.")``. ``log_tail`` keeps the last lines;
    ``result`` the fields of the ``done`` event.
    """

    def __init__(self, command: list[str], *, on_progress: Callable[[float, str], None] | None = None,
                 on_done: Callable[[str], None] | None = None, on_error: Callable[[str], None] | None = None,
                 on_cancel: Callable[[], None] | None = None, on_log: Callable[[str], None] | None = None,
                 env: dict | None = None, cwd: str | Path | None = None, kill_after: float = KILL_AFTER_S):
        self.command = [str(part) for part in command]
        self._on_progress, self._on_done, self._on_error = on_progress, on_done, on_error
        self._on_cancel, self._on_log = on_cancel, on_log
        self._env, self._cwd, self._kill_after = env, cwd, kill_after
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stderr_tail: deque = deque(maxlen=50)
        self.log_tail: deque = deque(maxlen=200)
        self._done_out: str | None = None
        self.result: dict = {}
        self._error: str | None = None
        self._cancel_time: float | None = None
        self._exit_time: float | None = None
        self._killed = False
        self.fraction = 0.0
        self.finished = False
        self.outcome: str | None = None  # 'done', 'error' or 'cancelled' once finished

    # -- control ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the child in its own process group (raises OSError if the executable cannot be started)."""
        if self._process is not None:
            raise RuntimeError("the engine process was already started")
        if sys.platform == "win32":
            group = {"creationflags": subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP}
        else:
            group = {"start_new_session": True}
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self._env, cwd=self._cwd, text=True, encoding="utf-8", errors="replace", bufsize=1, **group)
        for stream, name in ((self._process.stdout, "stdout"), (self._process.stderr, "stderr")):
            thread = threading.Thread(target=self._read, args=(stream, name), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _read(self, stream, name: str) -> None:
        for line in stream:
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    @property
    def running(self) -> bool:
        return self._process is not None and not self.finished

    @property
    def returncode(self) -> int | None:
        return None if self._process is None else self._process.returncode

    def _signal_tree(self, hard: bool) -> None:
        """SIGTERM (``hard``: SIGKILL) to the engine's process group; on Windows the tree is always killed."""
        pid = self._process.pid
        if sys.platform == "win32":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,
                           creationflags=subprocess.CREATE_NO_WINDOW)
            return
        try:
            os.killpg(pid, signal.SIGKILL if hard else signal.SIGTERM)  # the group id is the leader's pid
        except (ProcessLookupError, PermissionError):  # the whole group has already ended
            pass

    def cancel(self) -> None:
        """Ask the engine tree to stop (SIGTERM to its process group); it is killed ``kill_after`` s later if still
        there. Returns at once; ``poll`` reports the end."""
        if self._process is None or self.finished or self._cancel_time is not None:
            return
        if self._process.poll() is not None:  # already ended: poll() reports how
            return
        self._cancel_time = time.monotonic()
        self._signal_tree(hard=False)

    def kill(self) -> None:
        """Kill the engine tree now (scene close, module cleanup, quitting); the run then reports 'cancelled'."""
        if self._process is None or self.finished:
            return
        if self._cancel_time is None:
            self._cancel_time = time.monotonic()
        self._killed = True
        self._signal_tree(hard=True)

    # -- reporting -------------------------------------------------------------------------------------------

    def _handle(self, stream: str, line: str) -> None:
        self.log_tail.append(line)
        if stream == "stderr":
            self._stderr_tail.append(line)
            if self._on_log:
                self._on_log(line)
            return
        event = parse_progress_line(line)
        if event is None:
            if self._on_log:
                self._on_log(line)
        elif event.kind == "progress":
            self.fraction = event.fraction
            if self._on_progress:
                self._on_progress(event.fraction, event.message)
        elif event.kind == "done":
            self._done_out = event.out or ""
            self.result = event.payload
        elif event.kind == "error" and self._error is None:
            self._error = event.message

    def _drain(self) -> None:
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                return
            self._handle(stream, line)

    def poll(self) -> bool:
        """Process pending output and, once the child has exited and its output is read, report the outcome.

        True while still running. Never waits: a tree still holding the output pipes after the child exited (or
        after a cancel) is killed once ``kill_after`` has passed, and reported on a later call.
        """
        if self._process is None or self.finished:
            return False
        self._drain()
        now = time.monotonic()
        if self._process.poll() is None:
            if self._cancel_time is not None and not self._killed and now - self._cancel_time > self._kill_after:
                self.kill()
            return True
        if self._exit_time is None:
            self._exit_time = now
        if any(thread.is_alive() for thread in self._threads):
            if now - self._exit_time <= self._kill_after:
                return True
            if not self._killed:  # children of the engine outlived it and keep its output open
                self.kill()
                return True
            if now - self._exit_time <= 2 * self._kill_after:
                return True
        self._drain()
        self.finished = True
        self._report(self._process.returncode)
        return False

    def _report(self, returncode: int) -> None:
        if self._cancel_time is not None:
            self.outcome = "cancelled"
            if self._on_cancel:
                self._on_cancel()
            elif self._on_error:
                self._on_error("Cancelled.")
            return
        if self._error is not None:
            message = self._error
        elif returncode == 0 and self._done_out is not None:
            self.outcome = "done"
            if self._on_done:
                self._on_done(self._done_out)
            return
        elif returncode == 0:
            message = "The engine stopped without reporting a result."
        else:
            message = _last_meaningful(self._stderr_tail) or f"The engine failed (exit code {returncode})."
        self.outcome = "error"
        if self._on_error:
            self._on_error(message)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> str | None:
        """Poll until the run ends (for scripts, tests and the self-test); returns ``outcome``.

        On ``timeout`` (seconds) the run is cancelled and waited for.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(interval)
        return self.outcome
