"""Start-up: `fuselabel predict`, `evaluate` and `inspect` on a CPU load only what their path needs. A model folder
runs from its exported ONNX copy in the cache (made by the first run), so neither it nor an exported folder imports
torch, torchvision, timm, transformers, scikit-learn or Lightning (`evaluate` takes scikit-learn for its metrics);
asking for the torch engine still works."""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "torchvision", "timm", "transformers", "sklearn", "lightning", "torch._dynamo")
RUN = (
    "import sys\n"
    "from fuselabel.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    "sys.exit(code)\n"
)


def _run(*args) -> str:
    done = subprocess.run([sys.executable, "-c", RUN, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _predict(model, image_dir, csv, out, cache, *extra):
    return _run(
        "predict",
        model,
        "--data",
        image_dir,
        "--csv",
        csv,
        "--out",
        out,
        "--cache-dir",
        cache,
        "--device",
        "cpu",
        *extra,
    )


def test_predict_imports_nothing_heavy(tiny_model, tmp_path):
    root, image_dir, csv = tiny_model
    cache = tmp_path / "cache"
    first = _predict(root / "model", image_dir, csv, tmp_path / "first.csv", cache)
    assert "onnxruntime (exported folder)" in first
    again = _predict(root / "model", image_dir, csv, tmp_path / "again.csv", cache)
    assert "HEAVY []" in again, again
    assert (tmp_path / "again.csv").read_bytes() == (tmp_path / "first.csv").read_bytes()
    # The torch engine, when asked for, gives the same label sets.
    torch_run = _predict(root / "model", image_dir, csv, tmp_path / "torch.csv", cache, "--feature-engine", "torch")
    assert "torch" in torch_run.split("HEAVY")[1]
    assert (tmp_path / "torch.csv").read_bytes() == (tmp_path / "first.csv").read_bytes()


def test_exported_folder_imports_nothing_heavy(tiny_model, tmp_path):
    from fuselabel.cli import main

    root, image_dir, csv = tiny_model
    assert main(["export", str(root / "model"), "--out", str(tmp_path / "onnx")]) == 0
    out = _predict(tmp_path / "onnx", image_dir, csv, tmp_path / "p.csv", tmp_path / "cache")
    assert "HEAVY []" in out, out


def test_evaluate_runs_from_the_exported_copy(tiny_model, tmp_path):
    root, image_dir, csv = tiny_model
    cache = tmp_path / "cache"
    _predict(root / "model", image_dir, csv, tmp_path / "p.csv", cache)  # exports the copy

    def evaluate(name, *extra):
        out = _run(
            "evaluate",
            root / "model",
            "--data",
            image_dir,
            "--csv",
            csv,
            "--split",
            "val",
            "--json",
            tmp_path / name,
            "--cache-dir",
            cache,
            "--device",
            "cpu",
            *extra,
        )
        return out, json.loads((tmp_path / name).read_text())

    out, report = evaluate("onnx.json")
    assert "onnxruntime (exported folder)" in out and "HEAVY ['sklearn']" in out, out
    # The model's own split comes from its folder, and the report names that folder.
    assert report["model_dir"] == str(root / "model") and report["split"] == "val"
    assert report["rows"] == len(json.loads((root / "model" / "split.json").read_text())["val_ids"])
    torch_out, torch_report = evaluate("torch.json", "--feature-engine", "torch")
    assert "torch" in torch_out.split("HEAVY")[1]
    assert abs(report["mean_f1"] - torch_report["mean_f1"]) < 5e-4


def test_inspect_imports_nothing_heavy(tiny_model):
    root, image_dir, csv = tiny_model
    out = _run("inspect", "--data", image_dir, "--csv", csv)
    assert "HEAVY []" in out, out
