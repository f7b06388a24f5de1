"""Run the headless engine (``python -m DRoPE reconstruct ... --progress json``) as a child process.

The GUI never blocks: ``EngineProcess.start`` launches the process, reader threads queue its output lines, and
``poll`` (called by the widget's ``qt.QTimer``, or in a loop by ``wait``) hands them to plain callbacks in the
caller's thread::

    request = ReconstructionRequest(Path("dwi.nrrd"), Path("out"), weights=Path("model.safetensors"))
    run = EngineProcess(build_command(request, python), on_progress=bar, on_done=load, on_error=show)
    run.start()
    timer.timeout.connect(run.poll)   # run.poll() returns False once finished; run.cancel() sends SIGTERM

Protocol (stdout, one JSON object per line): ``{"event": "progress", "fraction": 0.4, "message": "..."}``,
``{"event": "done", "out": DIR}``, ``{"event": "error", "message": "..."}``. Other lines are logged only.
"""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEVICES = ("auto", "cpu", "cuda")
KILL_AFTER_S = 10.0  # after cancel(), SIGKILL if the engine has not stopped within this time


class RequestError(ValueError):
    """Invalid reconstruction parameters; the message lists every problem."""


# ---------------------------------------------------------------------------------------------------------------
# Parameters -> command line
# ---------------------------------------------------------------------------------------------------------------


def check_inputs(*, has_input: bool, weights: Path | None, device: str = "auto", mask_ratio: float = 0.75,
                 volumes: int = 0, probe: Path | None = None, out_dir: Path | None = None) -> list[str]:
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
    if probe is not None and not Path(probe).is_file():
        problems.append(f"Probe file not found: {probe}")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        problems.append(f"Output folder is a file: {out_dir}")
    return problems


@dataclass(frozen=True)
class ReconstructionRequest:
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
    """

    input_path: Path
    out_dir: Path
    weights: Path | None
    device: str = "auto"
    mask_ratio: float = 0.75
    volumes: int = 0
    seed: int | None = None
    probe: Path | None = None

    def problems(self) -> list[str]:
        problems = check_inputs(has_input=True, weights=self.weights, device=self.device,
                                mask_ratio=self.mask_ratio, volumes=self.volumes, probe=self.probe,
                                out_dir=self.out_dir)
        if not Path(self.input_path).is_file():
            problems.insert(0, f"Input DWI file not found: {self.input_path}")
        return problems

    def validate(self) -> None:
        """Raise RequestError listing every problem."""
        problems = self.problems()
        if problems:
            raise RequestError(" ".join(problems))


def engine_prefix(python: str | None = None) -> list[str]:
    """The command that starts the engine CLI: ``<python> -m DRoPE``."""
    return [python or sys.executable, "-m", "DRoPE"]


def build_command(request: ReconstructionRequest, python: str | None = None,
                  prefix: list[str] | None = None) -> list[str]:
    """Validate ``request`` and return the engine's argument list (``prefix`` replaces ``<python> -m DRoPE``)."""
    request.validate()
    command = list(prefix or engine_prefix(python))
    command += ["reconstruct", str(request.input_path), "--out", str(request.out_dir),
                "--weights", str(request.weights), "--device", request.device,
                "--mask-ratio", repr(float(request.mask_ratio))]
    if request.volumes:
        command += ["--volumes", str(int(request.volumes))]
    if request.seed is not None:
        command += ["--seed", str(int(request.seed))]
    if request.probe is not None:
        command += ["--probe", str(request.probe)]
    command += ["--progress", "json"]
    return command


def engine_environment(library_root: Path | None, base: dict | None = None) -> dict:
    """Environment for the child: unbuffered output and ``library_root`` (the folder holding ``DRoPE``) first on
    PYTHONPATH, since Slicer's Python launcher does not see extension folders by itself."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
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
        return ProgressEvent("done", 1.0, message, None if out is None else str(out))
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
    """The engine running in a child process, reported through callbacks called from ``poll``.

    Exactly one of ``on_done(out_dir)``, ``on_error(message)`` or ``on_cancel()`` is called, once, when the run ends.
    ``on_progress(fraction, message)`` follows the progress lines; ``on_log(line)`` gets every other output line.
    Without ``on_cancel``, a cancelled run reports ``on_error("Cancelled.")``.
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
        self._done_out: str | None = None
        self._error: str | None = None
        self._cancel_time: float | None = None
        self.fraction = 0.0
        self.finished = False
        self.outcome: str | None = None  # 'done', 'error' or 'cancelled' once finished

    # -- control ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        """Launch the child process (raises OSError if the executable cannot be started)."""
        if self._process is not None:
            raise RuntimeError("the engine process was already started")
        flags = subprocess.CREATE_NO_WINDOW if sys.platform == "win32" else 0
        self._process = subprocess.Popen(
            self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=self._env, cwd=self._cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
            creationflags=flags)
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

    def cancel(self) -> None:
        """Ask the engine to stop (SIGTERM; TerminateProcess on Windows). ``poll`` reports the end."""
        if self._process is None or self.finished or self._cancel_time is not None:
            return
        if self._process.poll() is not None:  # already ended: poll() reports how
            return
        self._cancel_time = time.monotonic()
        self._process.terminate()

    # -- reporting -------------------------------------------------------------------------------------------

    def _handle(self, stream: str, line: str) -> None:
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
        """Process pending output and, once the child has exited, report the outcome. True while still running."""
        if self._process is None or self.finished:
            return False
        self._drain()
        if self._process.poll() is None:
            if self._cancel_time is not None and time.monotonic() - self._cancel_time > self._kill_after:
                self._process.kill()
            return True
        for thread in self._threads:
            thread.join(timeout=5.0)
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
