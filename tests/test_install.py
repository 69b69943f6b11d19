"""The install: requirements-lock.txt installs on Linux, macOS and Windows (CUDA wheels only where torch asks for
them), agrees with pyproject.toml, and scripts/setup.sh is valid bash."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements-lock.txt"
# The Python the lock is made for; markers on python_version are judged for it.
PYTHON = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
PLATFORMS = {
    "linux": {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix"},
    "darwin": {"sys_platform": "darwin", "platform_system": "Darwin", "platform_machine": "arm64", "os_name": "posix"},
    "win32": {"sys_platform": "win32", "platform_system": "Windows", "platform_machine": "AMD64", "os_name": "nt"},
}


def _env(platform: str, extra: str = "") -> dict[str, str]:
    return {**PYTHON, **PLATFORMS[platform], "extra": extra}


def _lock() -> dict[str, Requirement]:
    lines = [line.strip() for line in LOCK.read_text().splitlines()]
    reqs = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def _pin(req: Requirement) -> Version:
    (spec,) = req.specifier
    return Version(spec.version)


def _applies(req: Requirement, env: dict[str, str]) -> bool:
    return req.marker is None or req.marker.evaluate(env)


def _selected(platform: str) -> dict[str, Requirement]:
    return {name: r for name, r in _lock().items() if _applies(r, _env(platform))}


def _cuda_family(name: str) -> bool:
    return name.startswith(("nvidia-", "cuda-")) or name == "triton"


def _installed(name: str) -> metadata.Distribution | None:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None


def test_every_line_is_an_exact_pin():
    for name, req in _lock().items():
        assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", f"{name}: {req}"


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_no_cuda_wheels_off_linux(platform):
    cuda = sorted(name for name in _selected(platform) if _cuda_family(name))
    assert not cuda, f"requirements-lock.txt installs {cuda} on {platform}: give them torch's platform markers"
    assert "torch" in _selected(platform) and "torchvision" in _selected(platform)


def test_cuda_wheels_on_linux():
    cuda = [name for name in _selected("linux") if _cuda_family(name)]
    assert "triton" in cuda and "nvidia-cudnn-cu13" in cuda and "cuda-toolkit" in cuda


def test_the_lock_carries_torchs_linux_requirements_under_torchs_markers():
    """Every requirement of the locked torch on Linux, and the CUDA wheels those pull in (cuda-toolkit's extras,
    cuda-bindings' cuda-pathfinder, ...), is pinned in the lock under the marker torch gives it."""
    lock = _lock()
    dist = _installed("torch")
    if dist is None or Version(dist.version).public != str(_pin(lock["torch"])):
        pytest.skip(f"the installed torch ({dist and dist.version}) is not the locked {_pin(lock['torch'])}")
    torch_reqs = [Requirement(r) for r in dist.requires or []]
    if not any(_cuda_family(canonicalize_name(r.name)) for r in torch_reqs):
        pytest.skip(f"the installed torch {dist.version} is a CPU build: its metadata names no CUDA wheels")
    wrong = []
    for req in torch_reqs:
        if not _applies(req, _env("linux")):
            continue  # an extra of torch's, or another platform's
        todo, seen = [(req, req.marker)], set()
        while todo:
            r, marker = todo.pop()
            name = canonicalize_name(r.name)
            if name in seen:
                continue
            seen.add(name)
            locked = lock.get(name)
            if locked is None or not r.specifier.contains(_pin(locked), prereleases=True):
                wrong.append(f"{r} (needed on Linux by torch) -> lock has {locked}")
            elif str(locked.marker) != str(marker):
                wrong.append(f"{locked}: marker should be {marker}")
            dep = _installed(name)
            if dep is None or not _cuda_family(name):
                continue  # only the CUDA wheels' own requirements inherit torch's marker
            for extra in r.extras or {""}:
                for sub in map(Requirement, dep.requires or []):
                    if _cuda_family(canonicalize_name(sub.name)) and _applies(sub, _env("linux", extra)):
                        todo.append((sub, marker))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_the_lock_is_closed_on_each_platform(platform):
    """What each locked package needs on ``platform`` (read from the installed copies' metadata) is in the lock
    for that platform too: pip never has to pick an unpinned version (colorama on Windows, setuptools for torch)."""
    selected = _selected(platform)
    missing = []
    for name, req in selected.items():
        dist = _installed(name)
        if dist is None or Version(dist.version).public != str(_pin(req)):
            continue  # not installed here (another platform's package, or a CPU build of torch)
        for sub in map(Requirement, dist.requires or []):
            if _applies(sub, _env(platform)):
                locked = selected.get(canonicalize_name(sub.name))
                if locked is None or not sub.specifier.contains(_pin(locked), prereleases=True):
                    missing.append(f"{name} needs {sub} on {platform}; the lock has {locked}")
    assert not missing, "\n".join(missing)


def test_the_lock_pins_every_pyproject_dependency():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + [d for group in project["optional-dependencies"].values() for d in group]
    lock = _lock()
    wrong = []
    for req in map(Requirement, wanted):
        locked = lock.get(canonicalize_name(req.name))
        if locked is None or not req.specifier.contains(_pin(locked), prereleases=True):
            wrong.append(f"pyproject.toml wants {req}; requirements-lock.txt has {locked}")
    assert not wrong, "\n".join(wrong)


def test_every_marker_selects_some_platform():
    # A misspelt value (platform_system == "linux") would select nothing anywhere, silently.
    for req in _lock().values():
        assert any(_applies(req, _env(p)) for p in PLATFORMS), req


def test_setup_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
