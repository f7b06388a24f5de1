"""Cut the real-data test sets of this folder from the shared data; this script is the record of how they were cut.

    python Testing/Data/make_test_data.py [SHARED_DATA]     (default: ../shared/data beside the repository)

Each set is one voxel box of a scan in SHARED_DATA, with all its volumes, centred on the corpus-callosum body (the
FA > 0.4 voxels, plain DIPY, of the mid-sagittal ROI of the whole scan: brain-mask voxels within 4 mm of the median world x, in the
middle 30 % of the mask's y extent and at 55-75 % of its z extent), so the physics tests still see white matter.
NIfTI crops keep the stored integers and the header (scl_slope / scl_inter stay) and move the affine origin to the
box corner; the brain mask and the scanner maps are cut with the same box. NRRD crops keep their header layout
(space, kinds, measurement frame, gradients) and move 'space origin'. Plain-DIPY reference numbers of the crops
(the method of SHARED_DATA/README.md) go to reference_values.json. Writes only into this folder.
Needs numpy, nibabel, pynrrd and dipy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = Path(os.environ.get("DROPE_SHARED_DATA", HERE.parents[2] / "shared" / "data"))

# on-disk voxel (i, j, k) of the corpus-callosum body (centroid of the FA > 0.4 voxels of the ROI above, whole scan)
# and the box half-size: each crop is the voxels centre - half .. centre + half, every volume
NIFTI_CUTS = {
    "canon_oblique_all20d": ((34, 43, 27), (20, 24, 8)),
    "canon_ortho_same_session": ((39, 45, 26), (20, 24, 8)),
    "siemens_xa30_b2500": ((36, 36, 23), (20, 24, 8)),
    "philips_achieva_32dir": ((64, 63, 40), (20, 28, 10)),  # 1.75 x 1.75 x 2.5 mm voxels
    "mappertrac_sub-011591": ((49, 48, 37), (16, 20, 8)),  # 2.4 mm voxels, 70 volumes
}
MAPS = {"siemens_xa30_b2500": ("scanner_FA", "scanner_ADC")}
NRRD_SOURCE = "canon_oblique_all20d"  # the NRRD files hold this scan: the Slicer one whole, the DWIConvert one k >= 14
NRRD_FILES = {"canon_oblique_dwi.nrrd": 0, "canon_oblique_dwi_slab_dwiconvert_style.nrrd": 14}  # name -> first k


def voxel_box(centre, half) -> tuple[tuple[int, int], ...]:
    """(start, stop) per axis of the voxels centre - half .. centre + half."""
    return tuple((c - h, c + h + 1) for c, h in zip(centre, half))


def crop_affine(affine: np.ndarray, box) -> np.ndarray:
    """The affine of the voxels ``box`` (3 (start, stop) pairs): same axes, origin at the box corner."""
    moved = affine.copy()
    moved[:3, 3] = affine[:3, :3] @ [start for start, _ in box] + affine[:3, 3]
    return moved


def crop_nifti(source: Path, target: Path, box) -> None:
    """Write the voxels ``box`` of ``source`` (3-D or 4-D, every volume) with the stored integers and scaling."""
    image = nib.load(source)
    index = tuple(slice(*pair) for pair in box)
    raw = np.asarray(image.dataobj.get_unscaled())[index]
    affine = crop_affine(image.affine, box)
    cropped = nib.Nifti1Image(raw, affine, image.header)
    cropped.set_qform(affine, code=int(image.header["qform_code"]))
    cropped.set_sform(affine, code=int(image.header["sform_code"]))
    cropped.header.set_slope_inter(image.dataobj.slope, image.dataobj.inter)
    nib.save(cropped, target)
    assert np.array_equal(np.asarray(nib.load(target).dataobj), np.asarray(image.dataobj)[index])


def crop_nrrd(source: Path, target: Path, box) -> tuple[tuple[int, int], ...]:
    """Write the voxels ``box`` (spatial axes in file order, clipped to the file) of a DWI NRRD, with its header
    layout kept. Returns the box cut."""
    data, header = nrrd.read(str(source), index_order="F")
    spatial = [a for a, kind in enumerate(header["kinds"]) if kind != "list"]
    box = tuple((start, min(stop, data.shape[axis])) for axis, (start, stop) in zip(spatial, box))
    index = [slice(None)] * data.ndim
    for axis, (start, stop) in zip(spatial, box):
        index[axis] = slice(start, stop)
    directions = header["space directions"][spatial]
    header["space origin"] = header["space origin"] + np.array([start for start, _ in box]) @ directions
    del header["sizes"]  # pynrrd writes the cropped sizes
    nrrd.write(str(target), np.ascontiguousarray(data[tuple(index)]), header, index_order="F")
    return box


def dipy_reference(folder: Path) -> dict:
    """Mask voxels and median FA / MD (mm^2/s) of plain DIPY WLS in the brain mask, as in shared/data/README.md."""
    image = nib.load(folder / "dwi.nii.gz")
    mask = np.asarray(nib.load(folder / "brain_mask.nii.gz").dataobj) > 0
    bvals = np.loadtxt(folder / "dwi.bval")
    bvecs = np.loadtxt(folder / "dwi.bvec").T
    fit = TensorModel(gradient_table(bvals, bvecs=bvecs)).fit(image.get_fdata(dtype=np.float32), mask=mask)
    return {
        "shape": list(image.shape),
        "mask_voxels": int(mask.sum()),
        "median_FA": round(float(np.median(fit.fa[mask])), 4),
        "median_MD": round(float(np.median(fit.md[mask])), 7),
    }


def attribution(source: Path, cut: str) -> str:
    """ATTRIBUTION.md of a crop: how it was cut, then the source folder's own note, unchanged."""
    note = source / "ATTRIBUTION.md" if (source / "ATTRIBUTION.md").is_file() else source / "NOTE.md"
    return (
        f"# {source.name} (test crop)\n\nCut from `shared/data/{source.name}` by `Testing/Data/make_test_data.py` "
        f"(nibabel {nib.__version__}, pynrrd {nrrd.__version__}):\n\n{cut}\n\n"
        f"The source folder's note (`{note.name}`), unchanged:\n\n" + note.read_text()
    )


def box_text(box) -> str:
    return ", ".join(f"{axis} {start}..{stop - 1}" for axis, (start, stop) in zip("ijk", box))


def cut_nifti_set(shared: Path, name: str, box) -> dict:
    source, folder = shared / name, HERE / name
    folder.mkdir(exist_ok=True)
    for image in ("dwi", "brain_mask", *MAPS.get(name, ())):
        crop_nifti(source / f"{image}.nii.gz", folder / f"{image}.nii.gz", box)
    for extra in ("dwi.bval", "dwi.bvec", "LICENSE", "NOTICE"):
        if (source / extra).is_file():
            shutil.copyfile(source / extra, folder / extra)
    images = ", ".join(f"`{image}.nii.gz`" for image in ("dwi", "brain_mask", *MAPS.get(name, ())))
    cut = (
        f"- voxel box (on-disk indices of the source, inclusive): {box_text(box)}; every volume kept\n"
        f"- images cut alike: {images} (stored integers and header kept, scl_slope/scl_inter included; "
        "the affine origin moved to the box corner)\n- `dwi.bval`, `dwi.bvec`, `LICENSE` (and `NOTICE`) copied unchanged"
    )
    (folder / "ATTRIBUTION.md").write_text(attribution(source, cut))
    return {"source": name, "box": [list(pair) for pair in box], **dipy_reference(folder)}


def cut_nrrd_set(shared: Path) -> None:
    source, folder = shared / "nrrd_slicer_dwi", HERE / "nrrd_slicer_dwi"
    folder.mkdir(exist_ok=True)
    box = voxel_box(*NIFTI_CUTS[NRRD_SOURCE])
    lines = []
    for name, first_k in NRRD_FILES.items():
        (i, j, (k0, k1)) = box
        cut = crop_nrrd(source / name, folder / name, (i, j, (max(k0, first_k) - first_k, k1 - first_k)))
        lines.append(f"- `{name}`: voxel box {box_text(cut)} of the file (whose slice k = 0 is NIfTI slice {first_k})")
    shutil.copyfile(source / "LICENSE", folder / "LICENSE")
    cut = "\n".join(lines) + (
        f"\n\nThe voxels of the `{NRRD_SOURCE}` crop box (the slab file holds NIfTI slices 14..25 only, so it keeps "
        "the crop's first slices); every volume, 'space', 'kinds', 'measurement frame' and the DWMRI gradient keys "
        "are kept and 'space origin' is moved to the box corner. `LICENSE` copied unchanged."
    )
    (folder / "ATTRIBUTION.md").write_text(attribution(source, cut))


def main(argv: list[str]) -> int:
    shared = Path(argv[0]) if argv else DEFAULT_SHARED
    reference = {
        "_method": "DIPY TensorModel (WLS) on dwi.nii.gz (scl_slope applied) with gradient_table(bval, bvecs=bvec.T); "
        "medians over brain_mask.nii.gz voxels; MD in mm^2/s; box: source voxels [start, stop) per axis"
    }
    for name, (centre, half) in NIFTI_CUTS.items():
        reference[name] = cut_nifti_set(shared, name, voxel_box(centre, half))
    cut_nrrd_set(shared)
    (HERE / "reference_values.json").write_text(json.dumps(reference, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
