"""Packaging checks of the Slicer extension: CMake (configured against Testing/SlicerStub), the install layout,
the catalog entry DRoPE.json and the extension metadata, as the Slicer ExtensionsIndex checks them."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STUB = REPO_ROOT / "Testing" / "SlicerStub"
SCHEMA = STUB / "slicer-extension-catalog-entry-schema-v1.0.2.json"
MODULE_DIR = REPO_ROOT / "DRoPEModule"
RAW_PREFIX = "https://raw.githubusercontent.com/drope-project/SlicerDRoPE/main/"
HOMEPAGE = "https://github.com/drope-project/SlicerDRoPE"
QT_SCRIPTED = Path("lib", "Slicer-5.8", "qt-scripted-modules")


def cmake_text() -> str:
    return (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


def extension_variables() -> dict[str, str]:
    return dict(re.findall(r'set\(EXTENSION_(\w+)\s+"([^"]*)"\)', cmake_text()))


def project_name() -> str:
    match = re.search(r"^\s*project\(\s*(\w+)", cmake_text(), re.MULTILINE | re.IGNORECASE)
    assert match, "no project() in CMakeLists.txt"
    return match.group(1)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def configure(source: Path, build: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "-S", str(source), "-B", str(build), f"-DSlicer_DIR={STUB}"],
                          capture_output=True, text=True, timeout=300)


def manifest(build: Path) -> dict[tuple[str, str], set[str]]:
    """(target name, SCRIPTS|RESOURCES) -> listed paths relative to the source root (written by the stub)."""
    listed: dict[tuple[str, str], set[str]] = {}
    for line in (build / "SlicerStubManifest.txt").read_text().splitlines():
        name, kind, path = line.split(";")
        listed.setdefault((name, kind), set()).add(path)
    return listed


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("build")
    done = configure(REPO_ROOT, build)
    assert done.returncode == 0, done.stdout + done.stderr
    return build, done


def copy_source(target: Path) -> Path:
    """The files the CMake configuration reads, copied so that a test can break them."""
    for relative in ("CMakeLists.txt", "DRoPEModule", "DRoPE", "Resources/Sample", "Resources/model"):
        source = REPO_ROOT / relative
        if source.is_dir():
            shutil.copytree(source, target / relative, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.is_file():
            (target / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / relative)
    return target


# ---------------------------------------------------------------------------------------------------------------
# CMake
# ---------------------------------------------------------------------------------------------------------------


def test_cmake_configures_against_the_stub(configured):
    build, done = configured
    assert (build / "SlicerStubExtension.txt").read_text().strip() == "DRoPE"
    tests = subprocess.run(["ctest", "-N"], cwd=build, capture_output=True, text=True, timeout=60).stdout
    assert "py_DRoPEModule" in tests and "qSlicerDRoPEModuleModuleGenericTest" in tests


def test_every_module_file_is_listed_in_the_module_cmake(configured):
    build, _ = configured
    listed = manifest(build)
    on_disk = {
        str(path.relative_to(REPO_ROOT))
        for path in MODULE_DIR.rglob("*")
        if path.is_file() and path.suffix in (".py", ".ui", ".png", ".txt") and path.name != "CMakeLists.txt"
        and "__pycache__" not in path.parts
    }
    in_cmake = listed[("DRoPEModule", "SCRIPTS")] | listed[("DRoPEModule", "RESOURCES")]
    assert in_cmake == on_disk, f"unlisted: {sorted(on_disk - in_cmake)}; listed, absent: {sorted(in_cmake - on_disk)}"
    assert all(path.endswith(".py") for path in listed[("DRoPEModule", "SCRIPTS")])


def test_library_weights_and_sample_ship_with_the_extension(configured):
    build, _ = configured
    listed = manifest(build)
    library = {str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "DRoPE").rglob("*.py")
               if "__pycache__" not in p.parts} | {"DRoPETrain/probe.py"}  # the module's drift report runs it
    assert listed[("DRoPELibrary", "SCRIPTS")] == library
    resources = listed[("DRoPELibrary", "RESOURCES")]
    sample = {f"Resources/Sample/{name}" for name in ("dwi.nrrd", "dwi.nii.gz", "dwi.bval", "dwi.bvec", "LICENSE")}
    assert sample <= resources
    for model_file in ("Resources/model/model.safetensors", "Resources/model/model.json"):
        assert (model_file in resources) == (REPO_ROOT / model_file).is_file()


def test_installed_layout_lets_the_module_find_library_and_resources(configured, tmp_path):
    build, _ = configured
    prefix = tmp_path / "install"
    done = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed = prefix / QT_SCRIPTED
    for relative in ("DRoPEModule.py", "DRoPEModuleLib/process.py", "Resources/UI/DRoPEModule.ui",
                     "Resources/Icons/DRoPEModule.png", "Resources/requirements.txt", "DRoPE/__init__.py",
                     "DRoPE/__main__.py", "Resources/Sample/dwi.nrrd", "DRoPETrain/probe.py"):
        assert (installed / relative).is_file(), relative
    # what DRoPEModuleLib.paths resolves in the installed tree (run from there, not from the checkout)
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from DRoPEModuleLib import paths; "
              "print(json.dumps([str(paths.MODULE_DIR), str(paths.library_root()), str(paths.sample_dwi_nrrd()), "
              "str(paths.requirements_file()), str(paths.probe_script())]))")
    done = subprocess.run([sys.executable, "-c", script, str(installed)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.returncode == 0, done.stderr
    module_dir, library_root, sample, requirements, probe = json.loads(done.stdout)
    assert Path(probe) == installed / "DRoPETrain" / "probe.py"
    assert Path(module_dir) == installed and Path(library_root) == installed
    assert Path(sample) == installed / "Resources" / "Sample" / "dwi.nrrd"
    assert Path(requirements) == installed / "Resources" / "requirements.txt"
    # the library's own idea of where its shipped files are (DRoPE/resources.py) must hold in the installed tree
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); import DRoPE, DRoPE.resources as r; "
              "print(json.dumps([DRoPE.__file__, str(r.SAMPLE_NRRD), str(r.SAMPLE_DWI), str(r.DEFAULT_WEIGHTS)]))")
    done = subprocess.run([sys.executable, "-c", script, str(installed)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    if (REPO_ROOT / "DRoPE" / "resources.py").is_file():
        assert done.returncode == 0, done.stderr
        package, sample_nrrd, sample_dwi, weights = map(Path, json.loads(done.stdout))
        assert package == installed / "DRoPE" / "__init__.py"
        assert sample_nrrd.is_file() and sample_dwi.is_file() and weights == installed / "Resources" / "model"


def test_stub_rejects_a_missing_listed_file(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    source = copy_source(tmp_path / "src")
    (source / "DRoPEModule" / "Resources" / "UI" / "DRoPEModule.ui").unlink()
    done = configure(source, tmp_path / "build")
    assert done.returncode != 0
    assert "listed file does not exist: Resources/UI/DRoPEModule.ui" in " ".join(done.stderr.split())


def test_stub_rejects_missing_extension_metadata(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    source = copy_source(tmp_path / "src")
    text = (source / "CMakeLists.txt").read_text()
    (source / "CMakeLists.txt").write_text(re.sub(r'set\(EXTENSION_CATEGORY "[^"]*"\)', "", text))
    done = configure(source, tmp_path / "build")
    assert done.returncode != 0 and "EXTENSION_CATEGORY is not set" in " ".join(done.stderr.split())


# ---------------------------------------------------------------------------------------------------------------
# Metadata and catalog entry
# ---------------------------------------------------------------------------------------------------------------


def test_top_level_cmake_metadata():
    variables = extension_variables()
    assert variables["HOMEPAGE"] == HOMEPAGE
    assert variables["CATEGORY"] == "Diffusion"
    assert variables["CONTRIBUTORS"].strip() and len(variables["DESCRIPTION"]) > 40
    description = variables["DESCRIPTION"]
    assert "not for clinical use" in description and "https://github.com/gustavochau/D-RoPE" in description
    assert "Slicer 5.10" in description  # Python >= 3.10: Slicer 5.8 has Python 3.9, 5.10 has 3.12
    assert variables["DEPENDS"] == "PyTorch"
    assert variables["ICONURL"] == RAW_PREFIX + "Resources/Icons/DRoPE.png"
    screenshots = variables["SCREENSHOTURLS"].split()
    assert screenshots and all(url.startswith(RAW_PREFIX) and url.endswith(".png") for url in screenshots)
    assert all((REPO_ROOT / url.removeprefix(RAW_PREFIX)).is_file() for url in screenshots)
    assert re.search(r"^add_subdirectory\(DRoPEModule\)", cmake_text(), re.MULTILINE)
    assert "find_package(Slicer REQUIRED)" in cmake_text()


def test_icons_exist_and_have_the_catalog_size():
    icon = REPO_ROOT / extension_variables()["ICONURL"].removeprefix(RAW_PREFIX)
    assert icon.is_file() and png_size(icon) == (128, 128)
    assert png_size(MODULE_DIR / "Resources" / "Icons" / "DRoPEModule.png") == (128, 128)


def test_catalog_entry_validates_against_the_schema():
    jsonschema = pytest.importorskip("jsonschema")
    entry = json.loads((REPO_ROOT / "DRoPE.json").read_text())
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(entry, schema)
    assert entry["$schema"].startswith(schema["$id"].rstrip("#"))
    assert entry["category"] == "Diffusion" == extension_variables()["CATEGORY"]
    assert entry["scm_url"] == HOMEPAGE
    assert entry.get("build_dependencies") == extension_variables()["DEPENDS"].split()
    with pytest.raises(jsonschema.ValidationError):  # the schema copy is strict: an extra key is rejected
        jsonschema.validate({**entry, "homepage": HOMEPAGE}, schema)


def test_extension_index_naming_rules():
    name = (REPO_ROOT / "DRoPE.json").stem
    assert name == project_name() == "DRoPE"
    assert not name.lower().startswith("slicer")
    assert HOMEPAGE.rsplit("/", 1)[-1].startswith("Slicer")  # the repository name should start with Slicer


def test_license_is_bsd_3_clause():
    text = (REPO_ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause License" in text and "Copyright (c) 2026, the DRoPE contributors" in text
    assert "Neither the name of the copyright holder" in text
