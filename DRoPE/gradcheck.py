"""Gradient-table check from the data itself: is a b-vector sign or axis order wrong?

A wrong sign or axis order of the b-vectors leaves FA and MD unchanged but turns every principal direction (V1) away
from the fibres, so V1 stops pointing at neighbours with the same V1. The check fits DTI once with the given table
and scores each candidate table by the *fibre coherence* of its V1 field (after the idea of Schilling et al. 2019,
"A fiber coherence index for quality control of B-table orientation in diffusion MRI scans"): for every voxel with
FA above a threshold, step from it along +-V1 to the neighbour voxel (of the 26, or of the 124 within two voxels)
whose direction in mm is closest to V1, and average |V1 . V1_neighbour| weighted by the FA of both voxels.

Candidates: the 48 signed permutations M of the b-vector axes, ``bvecs_fixed[a] = (-1 if flip[a] else 1) *
bvecs_given[permutation[a]]``, i.e. ``fixed = M @ given``. No refit is needed: changing the b-vectors by an
orthogonal M changes the fitted tensor to M D M^T exactly, so V1 becomes M V1. M and -M give the same tensor
(flipping all three axes changes nothing), so the 48 tables are 24 distinct ones; each is reported in its form with
at most one flip (flip z is the same fix as flip x and y).

Frame: candidates act on the b-vectors in the *image frame* of the input, the frame of an FSL ``.bvec`` on the
input's on-disk grid (voxel axes, x negated when det(affine) > 0). For an FSL input it is the ``.bvec`` as stored; for
a NRRD it is the ``.bvec`` that ``save_nifti`` would write for it.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import numpy as np

from .dti import DTIModel
from .dwi import DWI
from .gradients import DWIError
from .preprocess import brain_mask

log = logging.getLogger(__name__)

FA_THRESHOLD = 0.3  # voxels with FA above this are scored (white matter)
NEIGHBOUR_RADIUS = 2  # neighbours within this many voxels per axis (2: 124 offsets, finer than the 26 at radius 1)
MIN_VOXELS = 200  # fewer scored voxels than this make the verdict unreliable (reported as such)
MASK_SETTINGS = dict(median_radius=2, numpass=1)  # a quick median_otsu brain mask (the check only needs white matter)
AXES = "xyz"


class GradientCheckError(DWIError):
    """The data cannot support the check (too few directions, no b0, no white matter)."""


@dataclass(frozen=True)
class TableCandidate:
    """A signed permutation of the b-vector axes: ``fixed[a] = (-1 if flip[a] else 1) * given[permutation[a]]``.

    Attributes:
        permutation: (3,) source axis of each fixed axis.
        flip: (3,) True = that fixed axis is negated.
    """

    permutation: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def matrix(self) -> np.ndarray:
        """(3, 3) M with fixed = M @ given (one +-1 per row and column)."""
        matrix = np.zeros((3, 3))
        for axis, (source, flipped) in enumerate(zip(self.permutation, self.flip)):
            matrix[axis, source] = -1.0 if flipped else 1.0
        return matrix

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flip)

    def describe(self) -> str:
        """The fix in words: 'none', 'flip y (same as flipping x and z)', 'swap x and z', or '(x, y, z) -> (-y, x, z)'."""
        if self.is_identity:
            return "none"
        if self.permutation == (0, 1, 2):
            axis = self.flip.index(True)
            others = " and ".join(AXES[a] for a in range(3) if a != axis)
            return f"flip {AXES[axis]} (same as flipping {others})"
        moved = [a for a in range(3) if self.permutation[a] != a]
        if len(moved) == 2 and not any(self.flip):
            return f"swap {AXES[moved[0]]} and {AXES[moved[1]]}"
        terms = [("-" if f else "") + AXES[p] for p, f in zip(self.permutation, self.flip)]
        return f"(x, y, z) -> ({', '.join(terms)})"

    def to_json(self) -> dict:
        return {"permutation": list(self.permutation), "flip": list(self.flip), "fix": self.describe()}


def candidate_tables() -> tuple[TableCandidate, ...]:
    """The 24 distinct tables (6 permutations x {no flip, flip x, flip y, flip z}); the identity first."""
    flips = [(False, False, False)] + [tuple(a == b for b in range(3)) for a in range(3)]
    return tuple(TableCandidate(p, f) for p in itertools.permutations(range(3)) for f in flips)


def same_tensor(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two signed permutations (3, 3) give the same tensors (M D M^T), i.e. a = +-b."""
    return bool(np.array_equal(a, b) or np.array_equal(a, -b))


def image_to_canonical(dwi: DWI) -> np.ndarray:
    """(3, 3) T with canonical-voxel-frame b-vector = T @ image-frame (FSL .bvec) b-vector."""
    fsl_x = -1.0 if np.linalg.det(dwi.grid.affine[:3, :3]) > 0 else 1.0
    return dwi.grid.voxel_to_canonical @ np.diag([fsl_x, 1.0, 1.0])


def world_fix(dwi: DWI, candidate: TableCandidate) -> np.ndarray:
    """(3, 3) W with fixed world RAS b-vector = W @ given world RAS b-vector: ``candidate``'s image-frame fix for
    tools that keep gradients in world or measurement frames (Slicer's DWI nodes)."""
    to_world = dwi.rotation @ image_to_canonical(dwi)  # image frame -> world RAS
    return to_world @ candidate.matrix @ np.linalg.inv(to_world)


def neighbour_offsets(radius: int = NEIGHBOUR_RADIUS) -> np.ndarray:
    """(K, 3) int voxel offsets within ``radius`` per axis, one of each antipodal pair (K = 13 or 62)."""
    steps = range(-radius, radius + 1)
    return np.array([o for o in itertools.product(steps, steps, steps) if o > (0, 0, 0)])


def coherence_scores(v1, fa, fitted, voxel_size, matrices, *, fa_threshold=FA_THRESHOLD, radius=NEIGHBOUR_RADIUS):
    """Fibre coherence of the V1 field under each candidate table.

    v1: (X, Y, Z, 3) unit principal directions in an orthonormal voxel frame (axes along the array axes) fitted with
    the given table; fa: (X, Y, Z); fitted: (X, Y, Z) bool, True = fitted voxel; voxel_size: (3,) mm;
    matrices: (C, 3, 3) signed permutations in that frame (candidate V1 = M @ v1). Returns (C,) scores in [0, 1]:
    over voxels i with FA > fa_threshold and both neighbours j = i +- o (o: the offset whose mm direction is closest
    to M v1_i), sum of FA_i FA_j |v1_i . v1_j| / sum of FA_i FA_j (j fitted and inside the grid). |v1_i . v1_j| needs
    no M: an orthogonal M leaves it unchanged, only the neighbour reached changes.
    """
    seeds = np.argwhere(fitted & (fa > fa_threshold))
    if len(seeds) == 0:
        raise GradientCheckError(f"no fitted voxel has FA > {fa_threshold}: no white matter to check the table on")
    offsets = neighbour_offsets(radius)
    unit = offsets * np.asarray(voxel_size, dtype=np.float64)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    v_seed = v1[tuple(seeds.T)].astype(np.float64)
    fa_seed = fa[tuple(seeds.T)]
    scores = []
    for matrix in np.asarray(matrices, dtype=np.float64):
        nearest = np.argmax(np.abs(v_seed @ matrix.T @ unit.T), axis=1)
        total = weight = 0.0
        for sign in (1, -1):
            target = seeds + sign * offsets[nearest]
            inside = np.all((target >= 0) & (target < fa.shape), axis=1)
            j = tuple(target[inside].T)
            w = fa_seed[inside] * fa[j] * fitted[j]
            total += float(np.sum(w * np.abs(np.sum(v_seed[inside] * v1[j], axis=1))))
            weight += float(w.sum())
        scores.append(total / weight if weight > 0 else 0.0)
    return np.array(scores)


@dataclass(frozen=True)
class GradientCheck:
    """Result of ``check_gradients``.

    Attributes:
        candidates: the 24 distinct tables, best first.
        scores: (24,) their coherence scores, descending.
        voxels: number of scored voxels (FA > threshold).
        seconds: time taken (mask, fit, scoring).
    """

    candidates: tuple[TableCandidate, ...]
    scores: np.ndarray
    voxels: int
    seconds: float

    @property
    def best(self) -> TableCandidate:
        return self.candidates[0]

    @property
    def given_score(self) -> float:
        return float(self.scores[[c.is_identity for c in self.candidates].index(True)])

    @property
    def given_is_best(self) -> bool:
        return self.best.is_identity

    @property
    def margin(self) -> float:
        """Score of the best table minus that of the given one (0 when the given table is best)."""
        return float(self.scores[0]) - self.given_score

    @property
    def lead(self) -> float:
        """Score of the best table minus the runner-up's: how clearly the best one wins."""
        return float(self.scores[0] - self.scores[1])

    @property
    def reliable(self) -> bool:
        return self.voxels >= MIN_VOXELS

    def to_json(self) -> dict:
        """{"given_is_best", "best": {"permutation", "flip", "fix", "score"}, "margin", ...}; JSON-safe."""
        return {
            "given_is_best": self.given_is_best,
            "best": self.best.to_json() | {"score": round(float(self.scores[0]), 5)},
            "margin": round(self.margin, 5),
            "given_score": round(self.given_score, 5),
            "runner_up": self.candidates[1].to_json() | {"score": round(float(self.scores[1]), 5)},
            "lead": round(self.lead, 5),
            "voxels": self.voxels,
            "reliable": self.reliable,
            "seconds": round(self.seconds, 2),
            "frame": "image frame (FSL .bvec axes of the on-disk grid)",
        }

    def message(self) -> str:
        """One line: the verdict and, when the given table loses, the fix."""
        if self.given_is_best:
            text = (f"the given b-vector table is the most coherent of the 24 candidates (score {self.scores[0]:.3f}, "
                    f"next {self.lead:.3f} lower: {self.candidates[1].describe()})")
        else:
            text = (f"the b-vectors look wrong: '{self.best.describe()}' (image frame) makes the principal directions "
                    f"more coherent than the given table (score {self.scores[0]:.3f} vs {self.given_score:.3f}, margin "
                    f"{self.margin:.3f}); check the table, e.g. with `python -m DRoPE check-gradients --json`")
        if not self.reliable:
            text += f" [only {self.voxels} voxels with FA > {FA_THRESHOLD}: unreliable]"
        return text


def check_gradients(dwi: DWI, mask: np.ndarray | None = None, *, fa_threshold: float = FA_THRESHOLD,
                    radius: int = NEIGHBOUR_RADIUS) -> GradientCheck:
    """Score the 24 distinct signed permutations of the b-vectors of ``dwi`` by fibre coherence (one DTI fit).

    mask: (X, Y, Z) bool on the canonical grid, True = brain; default a quick median_otsu mask. Raises
    GradientCheckError when a tensor cannot be fitted (fewer than 6 directions, no b0) or no voxel has FA above the
    threshold.
    """
    started = time.perf_counter()
    if dwi.gtab.n_directions < 6 or not dwi.gtab.b0s_mask.any():
        raise GradientCheckError(
            f"{dwi.source}: the gradient check needs a tensor fit: at least one b0 and 6 directions, got {dwi.gtab.describe()}"
        )
    if mask is None:
        mask = brain_mask(dwi, **MASK_SETTINGS)
    fit = DTIModel(dwi.gtab).fit(dwi.data, mask, progress=False)
    to_canonical = image_to_canonical(dwi)
    candidates = candidate_tables()
    matrices = [to_canonical @ c.matrix @ to_canonical.T for c in candidates]
    scores = coherence_scores(fit.v1, fit.fa, fit.mask, dwi.voxel_size, matrices, fa_threshold=fa_threshold,
                              radius=radius)
    order = np.argsort(-scores, kind="stable")  # ties keep the identity (listed first) ahead
    voxels = int(np.count_nonzero(fit.mask & (fit.fa > fa_threshold)))
    result = GradientCheck(tuple(candidates[i] for i in order), scores[order], voxels, time.perf_counter() - started)
    log.info("gradient check of %s: %s", dwi.source, result.message())
    return result


def check_summary(dwi: DWI, mask: np.ndarray | None = None) -> tuple[dict, str | None]:
    """The check as the ``info`` and ``reconstruct`` commands report it: (JSON-safe record, warning or None).

    The warning is set when a reliable check finds a better table than the given one; the data are never changed.
    A protocol that cannot support the check gives {"skipped": reason} and no warning.
    """
    try:
        result = check_gradients(dwi, mask)
    except GradientCheckError as error:
        return {"skipped": str(error)}, None
    record = result.to_json() | {"message": result.message()}
    warning = None if result.given_is_best or not result.reliable else f"gradient check: {result.message()}"
    return record, warning
