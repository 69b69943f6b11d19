"""A model folder loaded while another process replaces it: every load is one model, never a mix of two.

Two small models differ in every file a load reads: model A has labels a1..a4, thresholds 0.25 and its head's
first weight matrix filled with 0.25; model B the same with b and 0.75. One process puts A and B in place in
turn, as fast as it can (``snapshot.replace_folder``, as every save does); this process loads the folder again
and again and checks that labels, thresholds and weights of each load come from the same model.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import fuselabel.snapshot as bundle_module
from fuselabel.bundle import Bundle, load_bundle, save_bundle
from fuselabel.config import build_config
from fuselabel.network import FuseLabelNet

REPLACER = """
import shutil, sys, time
from pathlib import Path
import fuselabel.snapshot as bundle

a, b, out, stop, swap = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
if swap == "renames":
    bundle._exchange = lambda x, y: False  # a file system without an atomic swap (NFS, macOS)
n = 0
while not stop.exists():
    tmp = out.with_name(f".{out.name}.tmp.{n}")
    shutil.copytree(a if n % 2 else b, tmp)
    bundle.replace_folder(tmp, out)
    n += 1
    time.sleep(0.005)  # a save takes longer than a copy: without a pause a slow reader could lose every race
    if n == 2:
        Path(str(stop) + ".ready").touch()
print(n)
"""


def _model(root, name: str, value: float):
    config = build_config(
        "cpu-fast", kind="image", image_size=64, hidden_dim=32, image_pretrained=False, text_pretrained=False
    )
    net = FuseLabelNet(config, 4, pretrained=False)
    with torch.no_grad():
        first = next(p for n, p in net.named_parameters() if n.startswith("head.") and p.ndim == 2)
        first.fill_(value)
    labels = [f"{name}{i}" for i in range(1, 5)]
    thresholds = {"method": "global", "thresholds": [value] * 4, "val_mean_f1": value}
    preprocessing = {
        "input_size": [3, 64, 64],
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
    }
    save_bundle(
        root / name,
        Bundle(
            net=net,
            config=config,
            labels=labels,
            label_names={},
            thresholds=thresholds,
            preprocessing=preprocessing,
            tokenizer=None,
        ),
    )
    return root / name


def _identity(bundle) -> tuple:
    """(labels' model, thresholds' model, weights' model): all three the same in a consistent load."""
    first = next(p for n, p in bundle.net.named_parameters() if n.startswith("head.") and p.ndim == 2)
    weight = float(first.detach().flatten()[0])
    return (
        bundle.labels[0][0],
        {0.25: "a", 0.75: "b"}[bundle.thresholds["thresholds"][0]],
        {0.25: "a", 0.75: "b"}[weight],
    )


@pytest.mark.parametrize("swap", ["exchange", "renames"])
@pytest.mark.parametrize("by_fd", [True, False], ids=["folder-descriptor", "by-path-and-hashes"])
def test_loads_racing_a_replacement_are_one_model(tmp_path, monkeypatch, swap, by_fd):
    if by_fd and not bundle_module._BY_FD:
        pytest.skip("this system cannot open a folder as a descriptor")
    monkeypatch.setattr(bundle_module, "_BY_FD", by_fd)
    a, b = _model(tmp_path, "a", 0.25), _model(tmp_path, "b", 0.75)
    out, stop = tmp_path / "model", tmp_path / "stop"
    bundle_module.replace_folder(_copy(a, tmp_path / ".model.tmp.first"), out)
    replacer = subprocess.Popen(
        [sys.executable, "-c", REPLACER, str(a), str(b), str(out), str(stop), swap],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen, ready = [], tmp_path / "stop.ready"
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert replacer.poll() is None and time.monotonic() < deadline, "the replacing process did not start"
            time.sleep(0.05)
        deadline = time.monotonic() + 30
        while len(seen) < 40 and time.monotonic() < deadline:
            seen.append(_identity(load_bundle(out)))
    finally:
        stop.touch()
        swapped, err = replacer.communicate(timeout=60)
    assert replacer.returncode == 0, err
    mixed = [s for s in seen if len(set(s)) != 1]
    assert not mixed, f"{len(mixed)} of {len(seen)} loads mixed two models: {mixed[:3]}"
    assert len(seen) >= 10 and int(swapped) >= 10, (len(seen), swapped)
    assert {s[0] for s in seen} == {"a", "b"}  # the loads did see both models come and go


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst
