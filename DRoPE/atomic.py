"""Atomic writing: a file is written to a temporary file beside it, a set of files to a staging folder beside
their folder, then renamed into place; a killed run's leftovers are removed by the next run."""

from __future__ import annotations

import errno
import glob
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

STAGE_MARK = ".drope-partial-"  # staging folders: .<folder name>.drope-partial-<pid>-<random>
# atomic_path's temporaries (.<stem>.<12 hex>.tmp<suffix>) and those of safetensors (.tmp + 6 characters)
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{12}\.tmp(\..+)?|\.tmp[0-9A-Za-z]{6}")


def full_suffix(path: str | os.PathLike) -> str:
    """The format suffix of a file name: '.nii.gz' for 'dwi.nii.gz', '.nrrd' for 'a.b.nrrd'.

    Two suffixes are kept when the last one is a compression suffix (.gz, .bz2, .zst), else one.
    """
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in {".gz", ".bz2", ".zst"}:
        return "".join(suffixes[-2:])
    return "".join(suffixes[-1:])


def _file_mode() -> int:
    """0666 less the process umask: the mode ``open`` gives a new file."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``final_path`` that ends with the same suffix(es).

    Write to the yielded path inside the ``with`` block (writers pick their format from the suffix,
    e.g. '.nii.gz'). On normal exit the temporary file gets the usual mode (0666 less the umask, also when the
    writer chose another, as safetensors does with 0600) and replaces ``final_path`` with one ``os.replace``,
    so readers never see a half-written file; on an exception the temporary file is removed and
    ``final_path`` is left as it was.
    """
    final = Path(final_path)
    suffix = full_suffix(final)
    stem = final.name[: len(final.name) - len(suffix)]
    tmp = final.parent / f".{stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: nothing was written to the temporary file {tmp.name}")
        os.chmod(tmp, _file_mode())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed writers left in ``folder`` (not its subfolders); returns them."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_file() and _TEMPORARY.fullmatch(p.name)] if folder.is_dir() else []
    for path in found:
        path.unlink(missing_ok=True)
    return found


@contextmanager
def atomic_folder(folder: str | os.PathLike, *, last: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder beside ``folder``; on normal exit its files appear in ``folder``.

    When ``folder`` does not exist (or is an empty folder) the staging folder is renamed to it, so all files
    appear at once. When it already holds files, the staged files are moved in one by one (each atomically,
    replacing files of the same name, others kept), ``last`` after the rest, so ``last`` marks a complete set.
    On an exception or a signal the staging folder and the parent folders made for it are removed, and
    ``folder`` is left as it was. Staging folders of killed runs (whose process is gone) are removed first.
    """
    folder = Path(folder).absolute()
    _remove_stale_stages(folder)
    stage = folder.parent / f".{folder.name}{STAGE_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    made: list[Path] = []
    try:
        _make_parents(folder.parent, made)
        stage.mkdir()
        yield stage
        _publish(stage, folder, last)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for parent in reversed(made):
            with suppress(OSError):
                parent.rmdir()
        raise


def _remove_stale_stages(folder: Path) -> None:
    """Delete staging folders of ``folder`` whose process no longer runs (and, from DRoPE versions that staged
    inside the output folder, the ``.drope-partial-*`` folders in it)."""
    stale = list(folder.glob(f"{STAGE_MARK}*")) if folder.is_dir() else []
    if folder.parent.is_dir():
        for stage in folder.parent.glob(f".{glob.escape(folder.name)}{STAGE_MARK}*"):
            pid = stage.name[len(folder.name) + 1 + len(STAGE_MARK):].split("-")[0]
            if not pid.isdigit() or not _running(int(pid)):
                stale.append(stage)
    for stage in stale:
        shutil.rmtree(stage, ignore_errors=True)


def _running(pid: int) -> bool:
    """True while process ``pid`` exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        pass
    return True


def _make_parents(folder: Path, made: list[Path]) -> None:
    """mkdir -p ``folder``, appending each folder made to ``made`` (outermost first)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
        made.append(path)


def _publish(stage: Path, folder: Path, last: str | None) -> None:
    try:
        os.rename(stage, folder)  # atomic; replaces an empty folder
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR) or not folder.is_dir():
            raise
    for path in sorted(stage.iterdir(), key=lambda p: p.name == last):
        os.replace(path, folder / path.name)
    stage.rmdir()
