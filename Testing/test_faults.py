"""Faults while writing: a full or read-only disk, SIGKILL in the write phase, leftovers of killed runs.

A full disk is simulated (the writer raises OSError(ENOSPC)): tests may run as root, for whom permissions block
nothing. SIGKILL is real: a subprocess pauses inside the write phase (a patched writer) and is killed there.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from conftest import crop_dwi
from DRoPE import cli
from DRoPE.atomic import STAGE_MARK, atomic_folder, remove_temporaries
from DRoPE.model import DRoPEMAE, model_config, save_model
from DRoPE.training.state import CheckpointError, TrainingState, read_checkpoint_meta, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DRoPETrain"))
import train  # noqa: E402  (DRoPETrain/train.py)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Runs ``python -m DRoPE`` with the N-th map writer of reconstruct patched: it raises ENOSPC, or writes the marker
# file FAULT_MARKER and sleeps (to be killed there); N = 0 patches the end of the write phase instead.
RUNNER = """
import errno, os, sys, time
from pathlib import Path
import DRoPE.reconstruct as r
from DRoPE import cli

fault, at = os.environ["FAULT"], int(os.environ["FAULT_AT"])
calls = []

def hit():
    if fault == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    Path(os.environ["FAULT_MARKER"]).write_text("in the write phase")
    time.sleep(300)

def wrap(original, count):
    def patched(*args, **kwargs):
        value = original(*args, **kwargs)
        calls.append(1)
        if count and len(calls) == at:
            hit()
        return value
    return patched

if at:
    r.save_scalar_nifti = wrap(r.save_scalar_nifti, True)
else:
    written = r._write_staged
    r._write_staged = lambda *a, **k: (written(*a, **k), hit())[0]
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def small_dwi(tmp_path_factory, sample_dir) -> Path:
    box = (slice(16, 64), slice(16, 64), slice(14, 22))
    return crop_dwi(sample_dir / "dwi.nii.gz", tmp_path_factory.mktemp("small") / "dwi.nii.gz", box)


def _argv(dwi, out, weights, *more) -> list[str]:
    return ["reconstruct", str(dwi), "--out", str(out), "--weights", str(weights), "--progress", "none",
            "--mask-ratio", "0.5", *more]


def _stages(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}{STAGE_MARK}*")) if out.parent.is_dir() else []


def _start(argv, fault: str, at: int, marker: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), FAULT=fault, FAULT_AT=str(at), FAULT_MARKER=str(marker),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", RUNNER, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


# --- full or read-only disk ----------------------------------------------------------------------------------


def test_a_full_disk_while_writing_reconstruct_outputs_is_one_line_and_leaves_nothing(tmp_path, small_dwi, tiny_weights):
    out = tmp_path / "new" / "deeper" / "out"  # its parents do not exist either
    proc = _start(_argv(small_dwi, out, tiny_weights), "enospc", 2, tmp_path / "unused")
    stdout, stderr = proc.communicate(timeout=300)
    lines = stderr.strip().splitlines()
    assert proc.returncode == 2, stderr
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert str(out) in lines[0] and "No space left on device" in lines[0]
    assert not (tmp_path / "new").exists()  # no empty output folder, no parent made for it, no staging folder


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_dti_on_a_full_or_read_only_disk_keeps_the_existing_folder_as_it_was(tmp_path, crops, monkeypatch, capsys, code):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(cli, "save_overview", fail)  # after the four maps are written
    assert cli.main(["dti", str(crops / "canon_oblique_all20d" / "dwi.nii.gz"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith("warning: ")]  # the DWI's own warnings
    assert len(errors) == 1 and str(out) in errors[0] and os.strerror(code) in errors[0], err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and not _stages(out)


def test_a_full_disk_while_saving_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    from DRoPE.training import state as tstate

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, model, optimizer, TrainingState(epoch=1, global_step=5))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a writer leaves when the disk fills up
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tstate, "save_file", full)
    with pytest.raises(CheckpointError) as error:
        save_checkpoint(tmp_path, model, optimizer, TrainingState(epoch=2, global_step=9))
    assert str(tmp_path / "checkpoint.safetensors") in str(error.value) and "No space left" in str(error.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporary file, nothing changed
    assert read_checkpoint_meta(tmp_path)["epoch"] == 1


def test_train_on_a_full_disk_is_one_line_and_exit_2(tmp_path, sample_dir, monkeypatch, capsys):
    from DRoPE.training import state as tstate

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(tstate, "save_file", full)
    run = tmp_path / "run"
    code = train.main(["--data", str(sample_dir / "dwi.nii.gz"), "--out", str(run), "--config", "tiny", "--epochs", "1",
                       "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(run / "checkpoint.safetensors") in err and "No space left" in err and "--resume" in err
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


# --- SIGKILL in the write phase ---------------------------------------------------------------------------------


def _kill_in_write_phase(argv, at: int, marker: Path) -> None:
    proc = _start(argv, "pause", at, marker)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the write phase"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.parametrize("at", [2, 0], ids=["mid-write", "all-written"])
def test_sigkill_in_the_write_phase_leaves_no_output_and_the_next_run_cleans_up(tmp_path, small_dwi, tiny_weights, at):
    out = tmp_path / "out"
    _kill_in_write_phase(_argv(small_dwi, out, tiny_weights), at, tmp_path / "marker")
    assert not out.exists()  # none of the outputs: they were all in the staging folder
    assert len(_stages(out)) == 1  # what the killed run left
    assert cli.main(_argv(small_dwi, out, tiny_weights)) == 0
    assert not _stages(out)
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["outputs"]) == sorted(p.name for p in out.iterdir())


def test_sigkill_into_an_existing_folder_keeps_the_previous_outputs(tmp_path, small_dwi, tiny_weights):
    out = tmp_path / "out"
    assert cli.main(_argv(small_dwi, out, tiny_weights)) == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _kill_in_write_phase(_argv(small_dwi, out, tiny_weights, "--seed", "5"), 2, tmp_path / "marker")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert cli.main(_argv(small_dwi, out, tiny_weights, "--seed", "5")) == 0
    assert not _stages(out) and (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 5


def test_atomic_folder_keeps_a_running_process_stage_and_removes_a_dead_one(tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out{STAGE_MARK}{int(dead.stdout)}-0000"
    running = tmp_path / f".out{STAGE_MARK}{os.getpid()}-1111"
    legacy = out / f"{STAGE_MARK}abcd1234"  # left inside --out by versions that staged there
    for folder in (stale, running, legacy):
        folder.mkdir(parents=True)
    with atomic_folder(out) as stage:
        (stage / "a.txt").write_text("a")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert not stale.exists() and running.is_dir()


# --- leftovers of a training run killed while writing ------------------------------------------------------------


def test_temporaries_of_a_killed_checkpoint_write_are_removed_at_the_next_start(tmp_path, sample_dir):
    run = tmp_path / "run"
    run.mkdir()
    leftovers = [run / f".checkpoint.{uuid.uuid4().hex[:12]}.tmp.safetensors",  # atomic_path's temporary
                 run / f".log.{uuid.uuid4().hex[:12]}.tmp.csv",
                 run / ".tmpAb12Cd"]  # safetensors writes here before its own rename
    kept = [run / "notes.tmp.txt", run / ".hidden", run / "checkpoint.safetensors.bak"]
    for path in leftovers + kept:
        path.write_text("x")
    assert train.main(["--data", str(sample_dir / "dwi.nii.gz"), "--out", str(run), "--config", "tiny", "--epochs", "1",
                       "--threads", "1", "--no-progress", "--resume"]) == 0
    assert not [p for p in leftovers if p.exists()] and all(p.exists() for p in kept)
    assert remove_temporaries(run) == []


# --- file modes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_safetensors_files_get_the_usual_mode(tmp_path, umask):
    model = DRoPEMAE(model_config("tiny"))
    previous = os.umask(umask)
    try:
        save_model(model, tmp_path)
        save_checkpoint(tmp_path, model, torch.optim.SGD(model.parameters()), TrainingState())
    finally:
        os.umask(previous)
    for name in ("model.safetensors", "model.json", "checkpoint.safetensors", "checkpoint.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
