"""Data flows one way: each module imports only modules listed before it (the README's layout table), and
nothing imports the command line or the service. A package folder (``report/``) counts as one module: what its
files import from the rest of fuselabel."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fuselabel"
ORDER = [
    "presets",
    "config",
    "textfile",
    "records",
    "preprocess",
    "images",
    "labels",
    "table_formats",
    "table_columns",
    "tables",
    "writers",
    "outputs",
    "inspection",
    "metrics",
    "thresholds",
    "losses",
    "encoding",
    "runtime",
    "explanation",
    "occlusion",
    "data",
    "geometry",
    "gpu_decode",
    "image_cache",
    "encoders",
    "heads",
    "network",
    "onnxrt",
    "cache",
    "sessions",
    "engines",
    "features",
    "loaders",
    "calibration",
    "module",
    "tracking",
    "resume",
    "snapshot",
    "bundle",
    "onnx_folder",
    "train",
    "export",
    "explain",
    "inputs",
    "evaluation",
    "estimator",
    "predict_rows",
    "predict",
    "figures",
    "report",
    "experiment_results",
    "experiment_plan",
    "experiment",
    "tune",
    "serve",
    "flags",
    "options",
    "console",
    "cli",
]


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports; a package folder (``serve/``) counts as one module, so
    its files' imports of the package's own modules are those of ``..``."""
    folder = PACKAGE / module
    if folder.is_dir():
        pattern = r"from \.\.(\w+) import|from \.\. import (\w+)"
        texts = [p.read_text() for p in sorted(folder.glob("*.py"))]
    else:
        pattern = r"from \.(\w+) import|from \. import (\w+)"
        texts = [(PACKAGE / f"{module}.py").read_text()]
    return {a or b for text in texts for a, b in re.findall(pattern, text)}


def test_every_module_is_in_the_layout():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    modules |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert modules == set(ORDER), (modules - set(ORDER), set(ORDER) - modules)


def test_imports_point_up_the_layout_only():
    rank = {m: i for i, m in enumerate(ORDER)}
    wrong = [(m, dep) for m in ORDER for dep in _imports(m) if rank.get(dep, -1) >= rank[m]]
    assert not wrong, wrong


def test_readme_lists_the_same_order():
    readme = (PACKAGE.parents[1] / "README.md").read_text()
    table = readme[readme.index("## Layout") :]
    named = [m for m in re.findall(r"`(\w+)`", table) if m in ORDER]
    assert named[: len(ORDER)] == ORDER
