"""Where the module finds the DRoPE library, the bundled weights and the sample DWI.

The same relative layout holds in the two places the module runs from:

- installed extension (and Slicer build tree): everything sits in one ``qt-scripted-modules`` folder::

      qt-scripted-modules/DRoPEModule.py, DRoPEModuleLib/, Resources/UI/DRoPEModule.ui
      qt-scripted-modules/DRoPE/                 (the library, installed by the top-level CMakeLists.txt)
      qt-scripted-modules/DRoPETrain/probe.py    (the drift report's command, installed with the library)
      qt-scripted-modules/Resources/model/       (bundled weights)
      qt-scripted-modules/Resources/Sample/      (self-test DWI)

- source checkout (``--additional-module-paths <repo>/DRoPEModule``): the module folder is ``<repo>/DRoPEModule``
  and the library and resources are one level up, in ``<repo>/DRoPE`` and ``<repo>/Resources``.

So every lookup tries the module folder first, then its parent.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

MODULE_DIR = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGE = "DRoPE"
WEIGHTS_RELATIVE = Path("Resources", "model", "model.safetensors")
SAMPLE_NRRD_RELATIVE = Path("Resources", "Sample", "dwi.nrrd")
REQUIREMENTS_RELATIVE = Path("Resources", "requirements.txt")
PROBE_SCRIPT_RELATIVE = Path("DRoPETrain", "probe.py")


def candidate_roots(module_dir: Path = MODULE_DIR) -> list[Path]:
    """Folders that may hold ``DRoPE/`` and ``Resources/``: the module folder (installed), then its parent
    (checkout)."""
    return [module_dir, module_dir.parent]


def find_resource(relative: Path | str, module_dir: Path = MODULE_DIR) -> Path | None:
    """First existing ``root / relative`` over ``candidate_roots``; None if there is none."""
    for root in candidate_roots(module_dir):
        path = root / relative
        if path.exists():
            return path
    return None


def bundled_weights(module_dir: Path = MODULE_DIR) -> Path | None:
    """The weights shipped with the extension (``Resources/model/model.safetensors``), or None."""
    return find_resource(WEIGHTS_RELATIVE, module_dir)


def sample_dwi_nrrd(module_dir: Path = MODULE_DIR) -> Path | None:
    """The small sample DWI shipped for the self-test (``Resources/Sample/dwi.nrrd``), or None."""
    return find_resource(SAMPLE_NRRD_RELATIVE, module_dir)


def probe_script(module_dir: Path = MODULE_DIR) -> Path:
    """``DRoPETrain/probe.py`` (the drift report's command), shipped beside the library; RuntimeError if missing."""
    found = find_resource(PROBE_SCRIPT_RELATIVE, module_dir)
    if found is None:
        raise RuntimeError(f"{PROBE_SCRIPT_RELATIVE} was not found next to {module_dir} or in {module_dir.parent}; "
                           "reinstall the DRoPE extension")
    return found


def requirements_file(module_dir: Path = MODULE_DIR) -> Path:
    """``Resources/requirements.txt`` of the module (always inside the module's own Resources)."""
    return module_dir / REQUIREMENTS_RELATIVE


def fsl_sidecars(image: Path | str) -> tuple[Path | None, Path | None]:
    """The FSL b-value and b-vector files beside a NIfTI image ('x.nii.gz' -> 'x.bval'/'x.bvals',
    'x.bvec'/'x.bvecs'); None for each one not found."""
    image = Path(image)
    name = image.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    stem = image.with_name(name)

    def first(suffixes):
        return next((p for p in (stem.with_name(name + s) for s in suffixes) if p.is_file()), None)

    return first((".bval", ".bvals")), first((".bvec", ".bvecs"))


def bvec_beside(bval: Path | str) -> Path | None:
    """The FSL b-vector file with the stem of ``bval`` ('x.bval' -> 'x.bvec' or 'x.bvecs'), or None."""
    return next((p for p in (Path(bval).with_suffix(s) for s in (".bvec", ".bvecs")) if p.is_file()), None)


def optional_path(value) -> Path | None:
    """A path parameter that may be unset: None for None, '' and '.' (an empty ``pathlib.Path()``)."""
    if value is None or str(value).strip() in ("", "."):
        return None
    return Path(value)


def library_root(module_dir: Path = MODULE_DIR) -> Path | None:
    """The folder that contains the ``DRoPE`` package, or None.

    In order: the package already imported in this process, the one shipped beside the module (see the module
    docstring), any other importable one (e.g. ``pip install -e .`` in a development environment).
    """
    loaded = sys.modules.get(LIBRARY_PACKAGE)
    if loaded is not None and getattr(loaded, "__file__", None):
        return Path(loaded.__file__).resolve().parents[1]
    found = find_resource(Path(LIBRARY_PACKAGE, "__init__.py"), module_dir)
    if found is not None:
        return found.parents[1]
    spec = importlib.util.find_spec(LIBRARY_PACKAGE)
    if spec is not None and spec.origin:
        return Path(spec.origin).resolve().parents[1]
    return None


def ensure_library_importable(module_dir: Path = MODULE_DIR) -> Path:
    """Put the folder holding ``DRoPE`` on ``sys.path`` (if needed) and return it.

    Raises RuntimeError when the library is neither importable nor shipped beside the module.
    """
    root = library_root(module_dir)
    if root is None:
        raise RuntimeError(
            f"The DRoPE library was not found next to {module_dir} or in {module_dir.parent}; "
            "reinstall the DRoPE extension"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root
