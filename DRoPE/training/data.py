"""Training data: find DWIs, preprocess each subject once into a memory-mapped cache, draw slabs per epoch.

Pipeline::

    find_dwis(folder or list file) -> [Path]            (sorted; BIDS dwi/ folders found recursively)
    prepare_cache(paths, cache_dir, ...) -> [CachedSubject] (preprocess once; float16 .npy memmap + JSON)
    SlabDataset(subjects, DataConfig, seed, patch)      (item (epoch, index) -> one random slab sample)
    ShardedSampler(len(dataset), seed, rank, world)     (deterministic per-epoch order, split across processes)
    collate_samples(list of samples) -> batch dict

A sample is drawn from its own generator seeded by (seed, epoch, subject index, sample index), so the data of
an epoch do not depend on the number of DataLoader workers or processes, and a resumed run sees exactly the
samples an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from DRoPE.atomic import atomic_path, full_suffix
from DRoPE.gradients import B0_THRESHOLD, DWIError

from .config import DataConfig

log = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NRRD_SUFFIXES = (".nrrd", ".nhdr")
BVAL_SUFFIXES = (".bval", ".bvals")


class DataError(DWIError):
    """The training data cannot be used (empty folder, unreadable files, ...); the message names the files."""


# ---------------------------------------------------------------------------------------------------------------
# finding DWIs
# ---------------------------------------------------------------------------------------------------------------


def _stem(path: Path) -> Path:
    return path.with_name(path.name[: len(path.name) - len(full_suffix(path))])


def _has_bval(image: Path) -> bool:
    stem = _stem(image)
    return any(stem.with_name(stem.name + suffix).is_file() for suffix in BVAL_SUFFIXES)


def _is_dwi_candidate(path: Path) -> bool:
    """NIfTI with a sibling .bval, or any NRRD (its header is checked when read). Masks, T1w, maps: no."""
    suffix = full_suffix(path).lower()
    if suffix in NIFTI_SUFFIXES:
        return _has_bval(path)
    return suffix in NRRD_SUFFIXES


def find_dwis(data: str | os.PathLike) -> list[Path]:
    """A single DWI file, the DWI files under a folder (recursively) or those listed in a text file (one path per
    line, relative to the file).

    A DWI is a ``*.nii``/``*.nii.gz`` with a sibling ``.bval`` or a ``*.nrrd``/``*.nhdr``; in a folder, NIfTIs
    without b-values (brain masks, T1w, scalar maps) are ignored. In a list file, blank lines and lines starting
    with '#' are skipped; listed files are used as given (a missing one is reported when read).
    Returns absolute paths, sorted (folder) or in file order (list). Raises DataError if none is found.
    """
    root = Path(data)
    if root.is_file() and full_suffix(root).lower() in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        if not _is_dwi_candidate(root):
            raise DataError(f"{root}: no {_stem(root).name}.bval beside this NIfTI; a DWI needs its b-values")
        return [root.resolve()]
    if root.is_dir():
        try:
            found = sorted(
                p.resolve()
                for p in root.rglob("*")
                if p.is_file() and not p.name.startswith(".") and _is_dwi_candidate(p)
            )
        except OSError as error:
            raise DataError(f"{root}: cannot list the data folder ({error.strerror or error}: {error.filename})") from None
        if not found:
            raise DataError(
                f"{root}: no DWI found (looked recursively for *.nii/*.nii.gz with a .bval beside them and "
                "*.nrrd/*.nhdr); point --data at a folder of DWIs or a text file listing them"
            )
        return found
    if root.is_file():
        try:
            lines = root.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"{root}: cannot read the list of DWIs ({error})") from None
        found = []
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                path = Path(line).expanduser()
                found.append((path if path.is_absolute() else root.parent / path).resolve())
        if not found:
            raise DataError(f"{root}: the list of DWIs is empty (one path per line, relative to the list file)")
        return found
    raise DataError(f"{root}: no such folder or list file")


def subject_name(path: Path, root: Path | None) -> str:
    """Readable id of a DWI: its path relative to the data root, without the suffix ('sub-01/dwi/sub-01_dwi')."""
    stem = _stem(Path(path))
    if root is not None:
        base = root if root.is_dir() else root.parent
        try:
            return stem.relative_to(base.resolve()).as_posix()
        except ValueError:
            pass
    return stem.name


def subject_names(paths: Sequence[Path], root: Path | None) -> list[str]:
    """``subject_name`` of each path; where two coincide (x.nii.gz and x.nrrd), the file suffix is kept.

    Paths outside the data root (a list file naming DWIs elsewhere) are named relative to their common folder when
    their file names alone would coincide (many ``SERIES/dwi.nii.gz``).
    """
    names = [subject_name(p, root) for p in paths]
    if len(set(names)) < len(names) and len(paths) > 1:
        common = Path(os.path.commonpath([_stem(Path(p)).parent for p in paths]))
        names = [_stem(Path(p)).relative_to(common).as_posix() if n == _stem(Path(p)).name else n
                 for n, p in zip(names, paths)]
    return [name + full_suffix(p) if names.count(name) > 1 else name for name, p in zip(names, paths)]


def read_holdout(holdout: str | os.PathLike, paths: Sequence[Path], root: Path | None) -> tuple[list[Path], list[str]]:
    """Split ``paths`` into (kept, held-out names) using a holdout list file.

    Each line of the file (blank and '#' lines skipped) names held-out subjects as a path (relative to the list
    file, or absolute; a file or a folder holding DWIs) or as a subject name / folder relative to the data root
    (``subject_name``). Lines that match nothing are logged as warnings.
    """
    holdout = Path(holdout)
    try:
        lines = [ln.strip() for ln in holdout.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{holdout}: cannot read the holdout list ({error})") from None
    entries = [ln for ln in lines if ln and not ln.startswith("#")]
    names = {p: subject_name(p, root) for p in paths}
    held: set[Path] = set()
    for entry in entries:
        target = Path(entry).expanduser()
        target = (target if target.is_absolute() else holdout.parent / target).resolve()
        clean = entry.strip("/")
        hits = {
            p
            for p in paths
            if p == target
            or target in p.parents
            or names[p] == clean
            or names[p].startswith(clean + "/")
            or _stem(p).name == clean
        }
        if not hits:
            log.warning("%s: holdout entry '%s' matches no DWI in the training data", holdout, entry)
        held |= hits
    kept = [p for p in paths if p not in held]
    return kept, sorted(names[p] for p in held)


# ---------------------------------------------------------------------------------------------------------------
# the preprocessing cache
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachedSubject:
    """One preprocessed subject in the cache.

    Attributes:
        name: subject id (``subject_name``).
        source: the DWI file.
        signal_path: float16 .npy (N, X, Y, Z), normalised signal on the model grid (memory-mapped when read).
        mask_path: uint8 .npy (X, Y, Z), 1 = brain.
        bvals: (N,) b-values in s/mm^2; bvecs: (N, 3) unit b-vectors in the canonical voxel frame (0 for b0).
        shape: (N, X, Y, Z).
    """

    name: str
    source: str
    signal_path: Path
    mask_path: Path
    bvals: np.ndarray
    bvecs: np.ndarray
    shape: tuple[int, int, int, int]


def input_files(dwi_path: Path) -> list[Path]:
    """Files whose content defines a subject: the image, its .bval/.bvec, a detached NRRD data file."""
    dwi_path = Path(dwi_path)
    files = [dwi_path]
    suffix = full_suffix(dwi_path).lower()
    stem = _stem(dwi_path)
    for suffixes in (BVAL_SUFFIXES, (".bvec", ".bvecs")):
        for s in suffixes:
            if stem.with_name(stem.name + s).is_file():
                files.append(stem.with_name(stem.name + s))
                break
    if suffix == ".nhdr":
        try:
            import nrrd

            header = nrrd.read_header(str(dwi_path))
            names = header.get("data file") or header.get("datafile")
            for name in [names] if isinstance(names, str) else (names or []):
                candidate = dwi_path.parent / str(name).split()[0]
                if candidate.is_file():
                    files.append(candidate)
        except Exception:  # an unreadable header is reported when the DWI is read
            pass
    return files


def cache_key(dwi_path: Path, preprocessing: dict) -> str:
    """sha256 of the input files' contents and the preprocessing settings (hex, 64 characters)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": CACHE_FORMAT_VERSION, **preprocessing}, sort_keys=True).encode())
    for path in input_files(dwi_path):
        digest.update(path.suffix.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def preprocessing_settings(data: DataConfig, patch: Sequence[int]) -> dict:
    """The settings that change the preprocessed arrays (part of the cache key)."""
    from DRoPE import preprocess as pp

    return {"spacing": data.spacing, "patch": [int(p) for p in patch], "norm_range": list(pp.NORM_RANGE)}


def _entry_paths(cache_dir: Path, key: str) -> tuple[Path, Path, Path]:
    return cache_dir / f"{key}.signal.npy", cache_dir / f"{key}.mask.npy", cache_dir / f"{key}.json"


def _load_entry(cache_dir: Path, key: str, name: str, source: Path) -> CachedSubject | None:
    signal_path, mask_path, meta_path = _entry_paths(cache_dir, key)
    if not (meta_path.is_file() and signal_path.is_file() and mask_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        bvals = np.asarray(meta["bvals"], dtype=np.float64)
        bvecs = np.asarray(meta["bvecs"], dtype=np.float64).reshape(-1, 3)
        shape = tuple(int(s) for s in meta["shape"])
    except (OSError, ValueError, KeyError) as error:
        log.warning("%s: unreadable cache entry (%s); preprocessing again", meta_path, error)
        return None
    return CachedSubject(name, str(source), signal_path, mask_path, bvals, bvecs, shape)


def cache_subject(
    dwi_path: Path, cache_dir: Path, data: DataConfig, patch: Sequence[int], name: str
) -> CachedSubject:
    """Preprocess one DWI into the cache unless an entry with the same key is there. Raises DWIError if unreadable.

    The float16 signal (N, X, Y, Z) is written with ``np.lib.format.open_memmap`` into a temporary file and
    renamed into place (``atomic_path``); the JSON (gradient table, shape, source) is written last and marks the
    entry complete, so a killed run never leaves an entry that looks valid.
    """
    from DRoPE.io import load_dwi
    from DRoPE.preprocess import preprocess

    dwi_path = Path(dwi_path)
    if not dwi_path.is_file():
        raise DWIError(f"{dwi_path}: file not found")
    settings = preprocessing_settings(data, patch)
    key = cache_key(dwi_path, settings)
    hit = _load_entry(cache_dir, key, name, dwi_path)
    if hit is not None:
        return hit
    start = time.perf_counter()
    dwi = load_dwi(dwi_path)
    prep = preprocess(dwi, spacing=data.spacing, patch=tuple(patch))
    signal_path, mask_path, meta_path = _entry_paths(cache_dir, key)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(signal_path) as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=prep.signal.shape)
        out[...] = prep.signal
        out.flush()
        del out
    with atomic_path(mask_path) as tmp:
        np.save(tmp, prep.mask.astype(np.uint8))
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "source": str(dwi_path),
        "shape": list(prep.signal.shape),
        "bvals": prep.gtab.bvals.tolist(),
        "bvecs": prep.gtab.bvecs.tolist(),
        "affine": prep.affine.tolist(),
        "preprocessing": settings,
    }
    with atomic_path(meta_path) as tmp:
        tmp.write_text(json.dumps(meta), encoding="utf-8")
    log.info("cached %s (%s) in %.1f s", name, "x".join(map(str, prep.signal.shape)), time.perf_counter() - start)
    return CachedSubject(name, str(dwi_path), signal_path, mask_path, prep.gtab.bvals, prep.gtab.bvecs, tuple(prep.signal.shape))


def prepare_cache(
    paths: Sequence[Path],
    cache_dir: Path,
    data: DataConfig,
    patch: Sequence[int],
    *,
    names: Sequence[str] | None = None,
    indices: Sequence[int] | None = None,
    on_subject: Callable[[int, int], None] | None = None,
) -> tuple[dict[int, CachedSubject], dict[int, str]]:
    """Cache the subjects ``indices`` (default: all) of ``paths``.

    Returns ({index: CachedSubject}, {index: error message}) so the caller decides whether bad files are fatal
    (and, with several processes, can gather the failures of every process first).
    """
    names = list(names) if names is not None else [_stem(Path(p)).name for p in paths]
    done: dict[int, CachedSubject] = {}
    failed: dict[int, str] = {}
    todo = list(range(len(paths))) if indices is None else list(indices)
    for count, index in enumerate(todo):
        try:
            done[index] = cache_subject(Path(paths[index]), Path(cache_dir), data, patch, names[index])
        except (DWIError, OSError, ValueError, EOFError, MemoryError) as error:
            failed[index] = _one_line(error, paths[index])
        if on_subject is not None:
            on_subject(count + 1, len(todo))
    return done, failed


def _one_line(error: BaseException, path) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if str(path) in text else f"{path}: {text}"


def bad_files_message(failed: dict[int, str], total: int) -> str:
    """'2 of 5 DWIs could not be read: a (why); b (why)' — the body of the error / warning."""
    listing = "; ".join(failed[i] for i in sorted(failed))
    return f"{len(failed)} of {total} DWIs could not be read: {listing}"


# ---------------------------------------------------------------------------------------------------------------
# drawing samples
# ---------------------------------------------------------------------------------------------------------------


def slab_brain_fraction(mask: np.ndarray, slab: int, crop: tuple[int, int] | None) -> np.ndarray:
    """Share of brain voxels in every slab of ``slab`` contiguous slices. mask: (X, Y, Z) -> (max(Z - slab + 1, 1),).

    The share is relative to the sample's in-plane area (the crop if smaller than the field of view), capped
    at 1, so it says how much of a sample can be brain.
    """
    mask = np.asarray(mask, dtype=bool)
    X, Y, Z = mask.shape
    per_slice = mask.reshape(X * Y, Z).sum(axis=0).astype(np.float64)
    if Z <= slab:
        counts = np.array([per_slice.sum()])
    else:
        cumulative = np.concatenate([[0.0], np.cumsum(per_slice)])
        counts = cumulative[slab:] - cumulative[:-slab]
    area = X * Y if crop is None else min(X, crop[0]) * min(Y, crop[1])
    return np.minimum(counts / (area * slab), 1.0)


def choose_slab(fractions: np.ndarray, min_fraction: float, rng: np.random.Generator) -> int:
    """Start slice of a slab, uniform among slabs with at least ``min_fraction`` brain; if none reaches it,
    among slabs with at least half the best slab's share (so brains in large fields of view still train)."""
    candidates = np.flatnonzero(fractions >= min_fraction)
    if len(candidates) == 0:
        best = float(fractions.max())
        candidates = np.flatnonzero(fractions >= 0.5 * best) if best > 0 else np.arange(len(fractions))
    return int(rng.choice(candidates))


def _crop_start(size: int, crop: int, center: int | None, rng: np.random.Generator) -> int:
    """Start of a crop window of length ``crop`` on an axis of length ``size`` (negative: zero padding before).

    If the axis is shorter than the crop, the data are placed at a random offset in the padded window. Else the
    window is uniform among those inside the axis that contain ``center`` (a brain voxel), or uniform if None.
    """
    if size <= crop:
        return -int(rng.integers(0, crop - size + 1))
    if center is None:
        return int(rng.integers(0, size - crop + 1))
    lo, hi = max(0, center - crop + 1), min(center, size - crop)
    return int(rng.integers(lo, hi + 1))


def _window(array: np.ndarray, axis: int, start: int, length: int) -> np.ndarray:
    """array restricted to [start, start + length) along ``axis``; zero padding outside the array."""
    size = array.shape[axis]
    lo, hi = max(start, 0), min(start + length, size)
    index = [slice(None)] * array.ndim
    index[axis] = slice(lo, hi)
    part = array[tuple(index)]
    if lo - start == 0 and hi - lo == length:
        return part
    pad = [(0, 0)] * array.ndim
    pad[axis] = (lo - start, length - (hi - start))
    return np.pad(part, pad)


def draw_sample(
    signal: np.ndarray,
    mask: np.ndarray,
    data: DataConfig,
    rng: np.random.Generator,
    *,
    fractions: np.ndarray | None = None,
    volumes: int | None = None,
    candidates: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one sample: a slab of ``data.slab`` slices, ``data.volumes`` volumes, an optional in-plane crop.

    signal: (N, X, Y, Z) normalised signal; mask: (X, Y, Z) bool, True = brain.
    ``volumes`` overrides ``data.volumes`` (the augmentation draws all volumes); ``candidates`` (indices) are the
    volumes to draw from (default: all N).
    Returns (x, brain, volumes): x (V, X', Y', slab) float32 with V = min(volumes, len(candidates)) and
    (X', Y') = crop or (X, Y); brain (X', Y', slab) bool, the mask on the same window; volumes (V,) int, the drawn
    volume indices in draw order (a random permutation prefix of the candidates).
    """
    N, X, Y, Z = signal.shape
    if fractions is None:
        fractions = slab_brain_fraction(mask, data.slab, data.crop)
    z0 = choose_slab(fractions, data.min_brain_fraction, rng) if Z > data.slab else -int(rng.integers(0, data.slab - Z + 1))
    pool = np.arange(N) if candidates is None else np.asarray(candidates)
    volumes = pool[rng.permutation(len(pool))[: min(data.volumes if volumes is None else volumes, len(pool))]]
    slab_mask = _window(np.asarray(mask, dtype=bool), 2, z0, data.slab)
    x0, y0, cx, cy = 0, 0, X, Y
    if data.crop is not None:
        cx, cy = data.crop
        brain = np.argwhere(slab_mask.any(axis=2))
        center = brain[int(rng.integers(len(brain)))] if len(brain) else (None, None)
        x0 = _crop_start(X, cx, center[0], rng)
        y0 = _crop_start(Y, cy, center[1], rng)
    # Read only the needed volumes and slices from the memory map, then pad/crop.
    lo_z, hi_z = max(z0, 0), min(z0 + data.slab, Z)
    lo_x, hi_x = max(x0, 0), min(x0 + cx, X)
    lo_y, hi_y = max(y0, 0), min(y0 + cy, Y)
    order = np.argsort(volumes)
    part = np.asarray(signal[np.sort(volumes), lo_x:hi_x, lo_y:hi_y, lo_z:hi_z], dtype=np.float32)
    part = part[np.argsort(order)]
    x = np.zeros((len(volumes), cx, cy, data.slab), dtype=np.float32)
    x[:, lo_x - x0 : hi_x - x0, lo_y - y0 : hi_y - y0, lo_z - z0 : hi_z - z0] = part
    brain = _window(_window(slab_mask, 0, x0, cx), 1, y0, cy)
    return x, brain, volumes


class SlabDataset(torch.utils.data.Dataset):
    """Random slabs of cached subjects. Item ``(epoch, index)`` -> dict sample; ``len`` = subjects x samples.

    index i is subject ``i // samples_per_subject``, draw ``i % samples_per_subject``; the draw's generator is
    ``np.random.default_rng([seed, epoch, subject, draw])``. Sample dict: ``x`` (V, X, Y, slab) float32 tensor of
    diffusion-weighted volumes only (b0 is the normalisation reference, never a token or a target), ``brain``
    (X, Y, slab) bool, ``bvals`` (V,) float32, ``bvecs`` (V, 3) float32 unit, ``subject`` int.
    The memory maps are opened lazily in each process (DataLoader worker), never pickled.
    """

    def __init__(
        self,
        subjects: Sequence[CachedSubject],
        data: DataConfig,
        seed: int,
        *,
        augment: "ProtocolAugment | None" = None,
    ) -> None:
        if not subjects:
            raise DataError("no subjects to train on")
        self.subjects = list(subjects)
        self.data = data
        self.seed = int(seed)
        self.augment = augment
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.subjects) * self.data.samples_per_subject

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def _open(self, subject: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if subject not in self._arrays:
            entry = self.subjects[subject]
            signal = np.load(entry.signal_path, mmap_mode="r")
            mask = np.load(entry.mask_path).astype(bool)
            self._arrays[subject] = (signal, mask, slab_brain_fraction(mask, self.data.slab, self.data.crop))
        return self._arrays[subject]

    def __getitem__(self, item: tuple[int, int]) -> dict:
        epoch, index = item
        if not 0 <= int(index) < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples per epoch")
        subject, draw = divmod(int(index), self.data.samples_per_subject)
        rng = np.random.default_rng([self.seed, int(epoch), subject, draw])
        signal, mask, fractions = self._open(subject)
        entry = self.subjects[subject]
        if self.augment is not None:
            x, brain, volumes = draw_sample(signal, mask, self.data, rng, fractions=fractions, volumes=entry.shape[0])
            x, bvals, bvecs = self.augment(x, entry.bvals[volumes], entry.bvecs[volumes], rng)
        else:
            weighted = np.flatnonzero(entry.bvals >= B0_THRESHOLD)
            x, brain, volumes = draw_sample(signal, mask, self.data, rng, fractions=fractions, candidates=weighted)
            bvals, bvecs = entry.bvals[volumes], entry.bvecs[volumes]
        return {
            "x": torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            "brain": torch.from_numpy(np.ascontiguousarray(brain)),
            "bvals": torch.as_tensor(bvals, dtype=torch.float32),
            "bvecs": torch.as_tensor(bvecs, dtype=torch.float32),
            "subject": subject,
        }


def collate_samples(samples: Sequence[dict]) -> dict:
    """Stack samples into a batch: x (B, V, X, Y, Z), brain (B, X, Y, Z), bvals (B, V), bvecs (B, V, 3), subject (B,).

    V is the smallest volume count in the batch (each sample keeps its first V draws, still a random subset);
    X, Y are zero-padded to the largest in the batch (only differs without a crop).
    """
    V = min(s["x"].shape[0] for s in samples)
    X = max(s["x"].shape[1] for s in samples)
    Y = max(s["x"].shape[2] for s in samples)
    Z = max(s["x"].shape[3] for s in samples)
    x = torch.zeros((len(samples), V, X, Y, Z), dtype=torch.float32)
    brain = torch.zeros((len(samples), X, Y, Z), dtype=torch.bool)
    for i, s in enumerate(samples):
        _, sx, sy, sz = s["x"].shape
        x[i, :, :sx, :sy, :sz] = s["x"][:V]
        brain[i, :sx, :sy, :sz] = s["brain"]
    return {
        "x": x,
        "brain": brain,
        "bvals": torch.stack([s["bvals"][:V] for s in samples]),
        "bvecs": torch.stack([s["bvecs"][:V] for s in samples]),
        "subject": torch.as_tensor([s["subject"] for s in samples]),
    }


class ShardedSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` items: a permutation of the dataset seeded by (seed, epoch), split across processes.

    The permutation is padded by wrapping around to a multiple of ``world_size`` so every process gets the same
    number of items (and of optimizer steps); process ``rank`` takes items rank, rank + world, ... Call
    ``set_epoch`` before each epoch.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.seed, self.rank, self.world_size = int(size), int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def indices(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch, 7919]).permutation(self.size)
        total = len(self) * self.world_size
        order = np.resize(order, total)  # wraps around
        return order[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in self.indices()])


# ---------------------------------------------------------------------------------------------------------------
# protocol augmentation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtocolAugment:
    """Replace a sample's protocol by a random one simulated from a DTI fit of the sample (``DRoPE.phantom``).

    The sample must hold all of its subject's volumes (``SlabDataset`` draws them all when augmenting). The new
    protocol has one b0 and ``volumes`` diffusion-weighted volumes spread over 1 to 3 shells drawn from
    ``shells`` (directions by electrostatic repulsion), with Rician noise at ``snr`` (None: noiseless); the
    sample keeps the diffusion-weighted volumes (the b0 is the normalisation reference).
    """

    volumes: int
    snr: float | None = None
    shells: tuple[float, ...] = (1000.0, 2000.0, 3000.0)

    def protocol(self, rng: np.random.Generator):
        """A random GradientTable of one b0 and ``volumes`` weighted volumes (b-vectors in the sample's voxel frame)."""
        from DRoPE.phantom import make_gtab

        n_dw = max(self.volumes, 1)
        n_shells = int(rng.integers(1, min(len(self.shells), n_dw) + 1))
        chosen = sorted(rng.choice(self.shells, size=n_shells, replace=False).tolist())
        counts = np.full(n_shells, n_dw // n_shells)
        counts[: n_dw % n_shells] += 1
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few directions / single shell are intended here
            return make_gtab({float(b): int(c) for b, c in zip(chosen, counts)}, n_b0=1, seed=int(rng.integers(2**31)))

    def __call__(self, x: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, rng: np.random.Generator):
        """x: (N, X, Y, Z) all volumes of the sample -> (x', bvals', bvecs') with ``volumes`` simulated weighted volumes."""
        from DRoPE.dti import DTIModel
        from DRoPE.gradients import GradientTable
        from DRoPE.phantom import synthesize

        table = GradientTable(np.asarray(bvals, dtype=np.float64), np.asarray(bvecs, dtype=np.float64))
        if not table.b0s_mask.any() or table.b0s_mask.all():  # nothing to fit a tensor on: keep the weighted volumes
            weighted = np.flatnonzero(~table.b0s_mask)[: self.volumes]
            return x[weighted], bvals[weighted], bvecs[weighted]
        data = np.moveaxis(np.asarray(x, dtype=np.float64), 0, -1)  # (X, Y, Z, N)
        fit = DTIModel(table).fit(data, data[..., table.b0s_mask].mean(axis=-1) > 0, progress=False)
        new = self.protocol(rng)
        signal = synthesize(fit, new, snr=self.snr, seed=rng)
        order = rng.permutation(np.flatnonzero(~new.b0s_mask))
        out = np.moveaxis(signal, -1, 0)[order].astype(np.float32)
        return out, new.bvals[order], new.bvecs[order]
