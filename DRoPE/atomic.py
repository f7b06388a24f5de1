"""Atomic file writing: write to a temporary file beside the target, then rename it into place."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def full_suffix(path: str | os.PathLike) -> str:
    """The format suffix of a file name: '.nii.gz' for 'dwi.nii.gz', '.nrrd' for 'a.b.nrrd'.

    Two suffixes are kept when the last one is a compression suffix (.gz, .bz2, .zst), else one.
    """
    suffixes = Path(path).suffixes
    if len(suffixes) >= 2 and suffixes[-1].lower() in {".gz", ".bz2", ".zst"}:
        return "".join(suffixes[-2:])
    return "".join(suffixes[-1:])


@contextmanager
def atomic_path(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the folder of ``final_path`` that ends with the same suffix(es).

    Write to the yielded path inside the ``with`` block (writers pick their format from the suffix,
    e.g. '.nii.gz'). On normal exit the temporary file replaces ``final_path`` with one ``os.replace``,
    so readers never see a half-written file; on an exception the temporary file is removed and
    ``final_path`` is left as it was. The temporary file is not created in advance, so the writer
    creates it with the usual permissions.
    """
    final = Path(final_path)
    suffix = full_suffix(final)
    stem = final.name[: len(final.name) - len(suffix)]
    tmp = final.parent / f".{stem}.{uuid.uuid4().hex[:12]}.tmp{suffix}"
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"{final}: nothing was written to the temporary file {tmp.name}")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
