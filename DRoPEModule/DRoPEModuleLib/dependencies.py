"""Which of the engine's Python requirements are missing from the running interpreter.

Only the check lives here (no Slicer import); asking the user and ``slicer.util.pip_install`` are in
``DRoPEModuleLogic.ensureDependencies``. A package counts as present when it can be imported (so Slicer's own
built-in SimpleITK is never reinstalled) and, when pip metadata exists, its version satisfies the specifier.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

# distribution name (lower case) -> import name, where they differ
IMPORT_NAMES = {"pynrrd": "nrrd", "pyyaml": "yaml", "scikit-image": "skimage", "scikit-learn": "sklearn"}

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
