"""Angular synthesis: DWI volumes at (b, g) that were not acquired, predicted from all acquired volumes.

The engine behind ``python -m DRoPE synthesize DWI --bvals B --bvecs G --out OUT``. Slab by slab (as in training),
the encoder sees every acquired diffusion-weighted volume; each requested (b, g) is then appended to the decoder
as a volume hidden in every patch (the mask token plus its q-space code), and the output head predicts it
(``DRoPEMAE.synthesize``). With the bundled copy head, every synthesised patch is a learned weighting of the
acquired patches at the same position (scored by decoder features, D-RoPE distance and a shell gate) times a learned
gain plus a learned correction: it can re-weight acquired signal, not create the contrast of a b-value that was
never acquired (a request outside the acquired shells is recorded as a warning in the summary).

Outputs lie on the input's grid, in its units (prediction x the voxel's mean b0), 0 outside the brain mask;
b0 rows of the request get the mean acquired b0. When the request has no b0, a mean-b0 volume is put first so that
the written DWI is a complete one that any tool (DRoPE included) can read.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .atomic import atomic_folder
from .dti import mean_b0
from .dwi import DWI
from .gradients import B0_THRESHOLD, SHELL_TOLERANCE, DWIError, DWIWarning, GradientTable, GradientTableError
from .io import _read_bvals, _read_bvecs, input_files, refuse_inputs, save_nifti
from .model import load_model
from .model.checkpoint import read_metadata
from .preprocess import Preprocessed, brain_mask, preprocess
from .protocol import describe_protocol
from .reconstruct import (Progress, ReconstructSettings, protocol_tensors, resolve_slab, slab_tensors,
                          weighted_volumes)
from .resources import DEFAULT_WEIGHTS


OUTPUT_FILES = ("synthesized.nii.gz", "synthesized.bval", "synthesized.bvec", "summary.json")


class SynthesisError(DWIError):
    """A request that cannot be synthesised (no weighted volume asked for, empty brain mask, ...)."""


@dataclass
class Synthesis:
    """Result on the canonical input grid.

    Attributes:
        dwi: the synthesised DWI: data (X, Y, Z, K) in input units, gtab the request (a mean-b0 volume first when
            the request had none); ``inputs`` keeps the files read, so writers refuse to overwrite them.
        mask: (X, Y, Z) bool brain mask (the data are 0 outside).
        summary: JSON-safe record: input, request, new shells, nearest acquired angle per request, timing.
    """

    dwi: DWI
    mask: np.ndarray
    summary: dict = field(default_factory=dict)


def read_request(bval_path, bvec_path, dwi: DWI) -> GradientTable:
    """FSL .bval/.bvec of the volumes to synthesise, in the image frame of ``dwi``'s file (as its own table) ->
    a GradientTable in DRoPE's canonical voxel frame (b0 rows allowed, none required).

    Raises GradientTableError naming the file: unreadable, counts that disagree, NaN, zero vectors on b > 0, no
    diffusion-weighted request.
    """
    bval_path, bvec_path = Path(bval_path), Path(bvec_path)
    bvals = _read_bvals(bval_path)
    bvecs = _read_bvecs(bvec_path, bvals)
    if len(bvecs) != len(bvals):
        raise GradientTableError(f"{bvec_path} has {len(bvecs)} b-vectors but {bval_path} has {len(bvals)} b-values")
    if np.linalg.det(dwi.grid.affine[:3, :3]) > 0:  # FSL convention, as io reads the DWI's own table
        bvecs = bvecs * np.array([-1.0, 1.0, 1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DWIWarning)
        return GradientTable.create(
            bvals, bvecs @ dwi.grid.voxel_to_canonical.T, source=f"{bval_path}, {bvec_path}", require_b0=False
        )


@torch.no_grad()
def synthesize_normalised(model, prep: Preprocessed, bvals, bvecs, slab: int, device="cpu", chunk: int = 1,
                          progress: Progress | None = None) -> np.ndarray:
    """b0-normalised prediction on the model grid: (K, X, Y, Z) float32 at the K weighted requests bvals (K,),
    bvecs (K, 3) (canonical voxel frame), 0 outside ``prep.mask``. Every acquired weighted volume is visible.
    progress(fraction, message) is called after each slab."""
    acquired_b, acquired_g = protocol_tensors(prep, device)
    query_b = torch.as_tensor(np.asarray(bvals), dtype=torch.float32, device=device)[None]
    query_g = torch.as_tensor(np.asarray(bvecs), dtype=torch.float32, device=device)[None]
    _, X, Y, Z = prep.signal.shape
    out = np.zeros((query_b.shape[1], X, Y, Z), dtype=np.float32)
    for z0 in range(0, Z, slab):
        x, brain = slab_tensors(prep, slab, device, z0)
        if brain:
            pred = model.synthesize(x, acquired_b, acquired_g, query_b, query_g, chunk=chunk)[0]
            out[..., z0 : z0 + x.shape[-1]] = pred.float().cpu().numpy()
        if progress is not None:
            progress(min(z0 + slab, Z) / Z, f"slices {min(z0 + slab, Z)} of {Z}")
    return out * prep.mask


def nearest_angle(request: GradientTable, acquired: GradientTable) -> np.ndarray:
    """(K,) degrees from each weighted request to the closest acquired weighted direction of the same shell
    (antipodes count as the same axis); NaN for b0 rows and for requests on a shell that was not acquired."""
    out = np.full(len(request), np.nan)
    weighted = ~acquired.b0s_mask
    for k in np.flatnonzero(~request.b0s_mask):
        same = weighted & (np.abs(acquired.bvals - request.bvals[k]) <= SHELL_TOLERANCE)
        if same.any():
            cosine = np.abs(acquired.bvecs[same] @ request.bvecs[k]).max()
            out[k] = float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))
    return out


def new_shells(request: GradientTable, acquired: GradientTable) -> list[float]:
    """Requested shell b-values (s/mm^2) farther than ``SHELL_TOLERANCE`` from every acquired shell."""
    return [float(b) for b in request.shells if np.abs(acquired.shells - b).min() > SHELL_TOLERANCE]


def run_synthesis(
    dwi: DWI,
    request: GradientTable,
    weights=DEFAULT_WEIGHTS,
    device: torch.device | str = "cpu",
    *,
    slab: int | None = None,
    chunk: int = 1,
    progress: Progress | None = None,
) -> Synthesis:
    """Synthesise the volumes of ``request`` from every volume of ``dwi`` with the checkpoint ``weights``.

    progress(fraction, message) is called as the work advances (model loading, brain mask, each slab)."""
    report = progress or (lambda fraction, message: None)
    started = time.perf_counter()
    if request.b0s_mask.all():
        raise SynthesisError(f"{request.source}: no diffusion-weighted volume requested (every b < {B0_THRESHOLD:g})")
    device = torch.device(device)
    report(0.02, "loading the model")
    meta = read_metadata(weights)
    model = load_model(weights, device=device)
    slab = resolve_slab(ReconstructSettings(slab=slab), meta, model.config.patch_size[2])
    report(0.05, "brain mask")
    mask = brain_mask(dwi)
    prep = preprocess(dwi, mask=mask, patch=model.config.patch_size)
    weighted_volumes(prep)  # raises when the input has no weighted volume
    if not prep.mask.any():
        raise SynthesisError(f"{dwi.source}: the brain mask is empty; nothing to synthesise")
    ask = np.flatnonzero(~request.b0s_mask)
    pred = synthesize_normalised(model, prep, request.bvals[ask], request.bvecs[ask], slab, device, chunk,
                                 lambda fraction, message: report(0.1 + 0.85 * fraction, message))
    b0 = mean_b0(dwi.data, dwi.gtab)
    data = np.repeat((b0 * mask)[..., None], len(request), axis=-1).astype(np.float32)
    data[..., ask] = prep.to_input(pred) * b0[..., None] * mask[..., None]
    table = request
    if not request.b0s_mask.any():
        data = np.concatenate(((b0 * mask)[..., None].astype(np.float32), data), axis=-1)
        table = GradientTable(np.r_[0.0, request.bvals], np.vstack([np.zeros(3), request.bvecs]), request.source)
    out = dataclasses.replace(dwi, data=data, gtab=table, warnings=(), inputs=tuple(map(str, input_files(dwi))))
    added = new_shells(request, dwi.gtab)
    notes = [
        f"b={b:g} was not acquired ({dwi.gtab.describe()}): the copy head only re-weights acquired signal, so these "
        f"volumes carry the contrast of the acquired shells, not of b={b:g}" for b in added
    ] if model.config.head == "copy" else []
    angles = nearest_angle(request, dwi.gtab)
    summary = {
        "drope_version": __version__,
        "input": dwi.source,
        "acquired": describe_protocol(dwi.gtab),
        "request": request.source,
        "written": describe_protocol(table),
        "b0_prepended": bool(not request.b0s_mask.any()),
        "new_shells": added,
        "nearest_acquired_angle_deg": [None if np.isnan(a) else round(float(a), 3) for a in angles],
        "weights": str(weights),
        "head": model.config.head,
        "settings": {"slab": slab, "chunk": chunk},
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
        "warnings": notes,
        "input_warnings": list(dwi.warnings),
    }
    return Synthesis(dwi=out, mask=mask, summary=summary)


def check_outputs(out_dir, dwi: DWI, protect=()) -> list[Path]:
    """The output paths in ``out_dir``; raises DWIError if one of them is an input file of ``dwi`` or one of
    ``protect``. Run it before the synthesis, so a bad --out stops at once."""
    targets = [Path(out_dir) / name for name in OUTPUT_FILES]
    refuse_inputs(targets, (*input_files(dwi), *map(Path, protect)), "the input data")
    return targets


def write_synthesis(result: Synthesis, out_dir, protect=()) -> list[Path]:
    """Write synthesized.nii.gz (+ .bval/.bvec) on the input's grid and summary.json into ``out_dir``; they appear
    together (``atomic_folder``, summary.json last). Raises DWIError if an output would overwrite an input file of
    the DWI or one of ``protect`` (e.g. the request's .bval/.bvec), SynthesisError if the outputs cannot be written."""
    out_dir = Path(out_dir)
    targets = check_outputs(out_dir, result.dwi, protect)
    try:
        with atomic_folder(out_dir, last="summary.json") as stage:
            save_nifti(dataclasses.replace(result.dwi, source="", inputs=()), stage / OUTPUT_FILES[0])
            summary = result.summary | {"outputs": list(OUTPUT_FILES)}
            (stage / OUTPUT_FILES[3]).write_text(json.dumps(summary, indent=2))
    except OSError as error:
        raise SynthesisError(f"{out_dir}: cannot write the outputs ({error.strerror or error})") from None
    return targets
