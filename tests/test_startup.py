"""Start-up: `fuselabel predict` on a CPU loads only what its path needs. A model folder runs from its exported
ONNX copy in the cache (made by the first run), so neither it nor an exported folder imports torch, torchvision,
timm, transformers, scikit-learn or Lightning; asking for the torch engine still works."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "torchvision", "timm", "transformers", "sklearn", "lightning", "torch._dynamo")
RUN = ("import sys\n"
       "from fuselabel.cli import main\n"
       "code = main(sys.argv[1:])\n"
       f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
       "sys.exit(code)\n")


def _predict(model, image_dir, csv, out, cache, *extra):
    done = subprocess.run([sys.executable, "-c", RUN, "predict", str(model), "--data", str(image_dir), "--csv",
                           str(csv), "--out", str(out), "--cache-dir", str(cache), "--device", "cpu", *extra],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


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
