"""The locked environment: requirements.lock pins every package exactly (with hashes), the running
environment is that lock, and pyproject.toml and environment.yml agree with it.

`make setup` installs the lock into .venv (uv pip sync, or pip) and the project with --no-deps; CI runs
the tests after it, so test_installed_packages_are_the_lock checks that a fresh install matched the lock."""

import ast
import json
import re
import sys
import sysconfig
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
# What `pip freeze` leaves out (the packaging tools: `uv pip sync` leaves them too; a locked one, setuptools,
# must still have the lock's version), and the project itself, installed editable after the lock.
NOT_FROZEN = {"pip", "setuptools", "wheel", "distribute", "prunestudy"}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entries() -> list[str]:
    """The lock's requirement entries, backslash continuations joined, comments dropped."""
    text = re.sub(r"\\\n", " ", LOCK.read_text())
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _pins() -> dict[str, str]:
    """Canonical distribution name -> its exact version in requirements.lock."""
    pins = {}
    for entry in _entries():
        req = Requirement(entry.split(" --hash=")[0])
        (spec,) = req.specifier
        pins[_canon(req.name)] = spec.version
    return pins


def _imports(source: str) -> set[str]:
    """Top-level names of the absolute imports in one module (anywhere in it, functions included)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _study_imports() -> dict[str, list[str]]:
    """Third-party import name -> the files of the study that import it (the package and the notebooks)."""
    found: dict[str, list[str]] = {}
    sources = [(p, p.read_text()) for p in sorted((ROOT / "src" / "prunestudy").rglob("*.py"))]
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
        # IPython magics and shell escapes are no Python: leave those lines out
        sources.append((nb, "\n".join(line for cell in code for line in cell.splitlines()
                                      if not line.lstrip().startswith(("%", "!")))))
    for path, source in sources:
        for name in _imports(source) - set(sys.stdlib_module_names) - {"prunestudy", "__future__"}:
            found.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    return found


def test_the_lock_pins_every_entry_exactly_with_hashes():
    entries = _entries()
    assert len(entries) > 50, "requirements.lock looks empty: regenerate it with `make lock`"
    for entry in entries:
        req = Requirement(entry.split(" --hash=")[0])
        assert [s.operator for s in req.specifier] == ["=="] and "*" not in str(req.specifier), entry
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"no hash for {req.name} (make lock adds them)"
    names = [_canon(Requirement(e.split(" --hash=")[0]).name) for e in entries]
    assert len(names) == len(set(names)), "a package pinned twice"


def test_every_package_the_study_imports_is_locked():
    dists = metadata.packages_distributions()
    pins = _pins()
    imports = _study_imports()
    assert {"torch", "numpy", "yaml"} <= set(imports)   # the scan sees the package's imports
    unknown = {name: files for name, files in imports.items() if name not in dists}
    assert not unknown, f"imported but installed by no distribution: {unknown}"
    missing = {name: sorted(set(dists[name])) for name in imports
               if not any(_canon(d) in pins for d in dists[name])}
    assert not missing, f"imported but not pinned in requirements.lock (add to pyproject.toml, `make lock`): {missing}"


def test_pyproject_dependencies_are_locked_within_their_specifiers():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = _pins()
    direct = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    for spec in direct:
        req = Requirement(spec)
        name = _canon(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) is not in requirements.lock: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{spec}: the lock has {pins[name]}"
    for pkg in ("torch", "torchvision", "torch-pruning"):   # exact in pyproject too: the builds on this disk
        assert f"{pkg}=={pins[pkg]}" in project["dependencies"]


def test_environment_yml_pins_the_locks_versions():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pins = _pins()
    named = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            named += [(p, "==") for p in dep["pip"] if not p.startswith("-e")]
        elif dep.split("=")[0] not in ("python", "pip"):
            named.append((dep, "="))   # conda's syntax: name=version
    assert len(named) > 10
    for dep, op in named:
        name, sep, version = dep.partition(op)
        assert sep and version and not version.startswith("="), f"environment.yml: {dep} has no exact version"
        assert _canon(name) in pins, f"environment.yml names {name}, which requirements.lock lacks"
        assert version == pins[_canon(name)], f"environment.yml: {dep}, requirements.lock: {pins[_canon(name)]}"


def test_installed_packages_are_the_lock():
    """What `pip freeze` lists (less the editable project) is the lock: the same names, the same versions."""
    if (Path(sys.prefix) / "conda-meta").is_dir():
        pytest.skip("a conda environment: environment.yml pins the direct dependencies only")
    pins = _pins()
    # the venv's site-packages, as pip freeze reads them: not sys.path, where an imported package may have
    # put its own vendored copies (ray adds ray/thirdparty_files, with a colorama, once a test imported it)
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {_canon(d.metadata["Name"]): d.version for d in metadata.distributions(path=site)}
    wrong = {name: (installed.get(name), version) for name, version in pins.items() if installed.get(name) != version}
    assert not wrong, f"installed != locked (name: (installed, locked)); run `make setup`: {wrong}"
    extra = sorted(set(installed) - set(pins) - NOT_FROZEN)
    assert not extra, f"installed but not in requirements.lock (make setup syncs them away): {extra}"
