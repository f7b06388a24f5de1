"""Which of the engine's Python requirements are missing, and the first-run installation flow (no Slicer import).

A package counts as present when it can be imported and, when pip metadata exists, its version satisfies the
specifier. PyTorch (``TORCH_REQUIREMENT``) comes from the PyTorch extension (``PyTorchUtils``); packages that Slicer
builds itself (``PROVIDED_BY_SLICER``) are never installed with pip. ``ensure_dependencies`` asks once, listing
everything it will install, and takes the Slicer calls (confirmation, pip) as arguments.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

# distribution name (lower case) -> import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "pyyaml": "yaml", "scikit-image": "skimage", "scikit-learn": "sklearn"}

TORCH_REQUIREMENT = ">=2.0"  # the engine uses torch 2 APIs (scaled_dot_product_attention, ...)
PROVIDED_BY_SLICER = {"simpleitk"}  # Slicer's own build; a pip wheel over it would break Slicer's SimpleITK

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*?)\s*$")


@dataclass(frozen=True)
class Requirement:
    """One line of requirements.txt: ``line`` as given to pip, distribution ``name``, ``import_name``, ``specifier``."""

    line: str
    name: str
    import_name: str
    specifier: str = ""


def parse_requirement(line: str) -> Requirement | None:
    """One requirements.txt line -> Requirement; None for blank and comment lines. Raises ValueError otherwise."""
    text = line.split("#", 1)[0].strip()
    if not text:
        return None
    match = _REQUIREMENT.match(text)
    if match is None or (match.group(2) and not re.match(r"^(==|>=|<=|~=|!=|>|<)", match.group(2))):
        raise ValueError(f"cannot parse requirement {line.strip()!r}")
    name = match.group(1)
    import_name = IMPORT_NAMES.get(name.lower(), name.replace("-", "_"))
    return Requirement(text, name, import_name, match.group(2).replace(" ", ""))


def read_requirements(path: Path | str) -> list[Requirement]:
    """Parse a requirements.txt file (one requirement per line, ``#`` comments)."""
    parsed = (parse_requirement(line) for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [req for req in parsed if req is not None]


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def satisfies(version: str, specifier: str) -> bool:
    """Whether ``version`` meets ``specifier`` (e.g. ``>=1.9``); True when it cannot be decided."""
    if not specifier:
        return True
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import InvalidVersion, Version
    except ImportError:  # no packaging: presence is all we can check
        return True
    try:
        return Version(version) in SpecifierSet(specifier)
    except InvalidVersion:
        return True


def missing_requirements(requirements: list[Requirement], *, find_spec=importlib.util.find_spec,
                         installed_version=_installed_version) -> list[Requirement]:
    """The requirements that cannot be imported, or whose installed version does not satisfy the specifier."""
    missing = []
    for req in requirements:
        if find_spec(req.import_name) is None:
            missing.append(req)
            continue
        version = installed_version(req.name)
        if version is not None and not satisfies(version, req.specifier):
            missing.append(req)
    return missing


class DependencyError(RuntimeError):
    """The engine's dependencies are missing and were not (or could not be) installed."""


@dataclass
class InstallPlan:
    """What the first run installs: ``torch`` (a sentence, or None when PyTorch is fine) and pip ``packages``."""

    torch: str | None = None
    packages: list[Requirement] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.torch or self.packages)

    def describe(self) -> str:
        """The list shown to the user, one item per line."""
        lines = [f"- {self.torch}"] if self.torch else []
        return "\n".join(lines + [f"- {req.line} (pip)" for req in self.packages])


def plan_installation(requirements: list[Requirement], torch_version: str | None, *,
                      find_spec=importlib.util.find_spec, installed_version=_installed_version) -> InstallPlan:
    """The InstallPlan for ``requirements`` and the installed torch version (None: not installed).

    Raises DependencyError when a package that Slicer provides itself is missing (a broken Slicer installation).
    """
    plan = InstallPlan()
    if torch_version is None:
        plan.torch = f"PyTorch {TORCH_REQUIREMENT} (with the PyTorch extension)"
    elif not satisfies(torch_version, TORCH_REQUIREMENT):
        plan.torch = f"PyTorch {TORCH_REQUIREMENT} (with the PyTorch extension; {torch_version} is installed)"
    missing = missing_requirements(requirements, find_spec=find_spec, installed_version=installed_version)
    provided = [req.name for req in missing if req.name.lower() in PROVIDED_BY_SLICER]
    if provided:
        raise DependencyError(f"{', '.join(provided)} ships with Slicer but cannot be used here; reinstall Slicer.")
    plan.packages = [req for req in missing if req.name.lower() not in PROVIDED_BY_SLICER]
    return plan


def ensure_dependencies(plan: InstallPlan, *, torch_utils, confirm: Callable[[str], bool],
                        install_packages: Callable[[list[str]], None], torch_version: Callable[[], str | None],
                        testing: bool = False) -> None:
    """Carry out ``plan`` after one confirmation; raise DependencyError when that is refused or fails.

    ``torch_utils``: the PyTorch extension's ``PyTorchUtils`` module (None when not installed); ``confirm(text)``
    asks the user; ``install_packages(lines)`` pip-installs; ``torch_version()`` reads the installed version again.
    In ``testing`` mode (Slicer's self-tests) nothing is installed.
    """
    if not plan:
        return
    if testing:
        raise DependencyError("Testing mode: not installing\n" + plan.describe())
    if plan.torch and torch_utils is None:
        raise DependencyError("DRoPE needs the PyTorch extension: install 'PyTorch' from the Extensions Manager, "
                              "restart Slicer and try again.")
    if not confirm("DRoPE needs these Python packages, which will now be downloaded and installed into Slicer "
                   "(this can take several minutes):\n\n" + plan.describe()):
        raise DependencyError("DRoPE cannot run without:\n" + plan.describe())
    if plan.torch:
        torch = torch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=TORCH_REQUIREMENT)
        version = torch_version()
        if torch is None or version is None or not satisfies(version, TORCH_REQUIREMENT):
            raise DependencyError(f"PyTorch {TORCH_REQUIREMENT} could not be installed (found: {version}); restart "
                                  "Slicer, or install it from the PyTorch module.")
    if plan.packages:
        try:
            install_packages([req.line for req in plan.packages])
        except Exception as error:
            raise DependencyError(f"Installing {', '.join(r.name for r in plan.packages)} failed ({error}). Check "
                                  "the internet connection and try again.") from error
