"""The same seed on the same machine gives the same model: split, thresholds and validation figures.

Two runs of the tiny model, each with a cache folder of its own (so features are extracted twice,
not shared), must agree exactly. docs/robustness.md says what may differ on another machine.
"""

from __future__ import annotations

import json

from conftest import make_tiny_dataset, tiny_cli_train

from fuselabel.cli import main

TINY_TRAIN = tiny_cli_train("--seed", "7", epochs=3)


def _read(folder, name):
    return json.loads((folder / name).read_text())


def test_same_seed_same_split_thresholds_and_metrics(tmp_path):
    image_dir, csv = make_tiny_dataset(tmp_path / "data")
    outs = []
    for run in ("first", "second"):
        out = tmp_path / run
        assert (
            main(
                [
                    "train",
                    "--data",
                    str(image_dir),
                    "--csv",
                    str(csv),
                    "--out",
                    str(out),
                    "--cache-dir",
                    str(tmp_path / f"cache-{run}"),
                    *TINY_TRAIN,
                ]
            )
            == 0
        )
        outs.append(out)
    first, second = outs
    assert _read(first, "split.json") == _read(second, "split.json")
    assert _read(first, "thresholds.json") == _read(second, "thresholds.json")
    assert _read(first, "metrics.json")["validation"] == _read(second, "metrics.json")["validation"]
    assert [r["val_f1"] for r in _read(first, "metrics.json")["val_f1_by_time"]] == [
        r["val_f1"] for r in _read(second, "metrics.json")["val_f1_by_time"]
    ]
    # The seed does matter: another seed draws another validation split.
    other = tmp_path / "other-seed"
    assert (
        main(
            [
                "train",
                "--data",
                str(image_dir),
                "--csv",
                str(csv),
                "--out",
                str(other),
                "--cache-dir",
                str(tmp_path / "cache-first"),
                *TINY_TRAIN,
                "--seed",
                "8",
            ]
        )
        == 0
    )
    assert _read(other, "split.json")["val_ids"] != _read(first, "split.json")["val_ids"]
