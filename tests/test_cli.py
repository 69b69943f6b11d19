"""The ``fuselabel`` command end to end: train -> predict -> evaluate -> info -> inspect, and bad input.

The synthetic round trip trains once per module (frozen packaged Lite0 at 64 px and a one-layer
MiniLM, 2 epochs) and every other test reuses that model folder. The real-data round trip runs on
the first rows of the course data (conftest.SHARED_DATA) and is skipped, with its reason, when that is absent.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CLI_TRAIN, make_tiny_dataset, shared_data_or_skip

from fuselabel.cli import main
from fuselabel.records import read_records

# the fp32 encoders these tests were written for; the int8 default on a CPU has its own tests (test_int8.py)
TINY_TRAIN = [*TINY_CLI_TRAIN, "--image-quant", "none", "--text-quant", "none", "--save-dtype", "fp16"]
INFER = ["--num-workers", "0"]


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _csv_rows(path) -> list[list[str]]:
    return [line.split(",") for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, session_cache):
    """(image_dir, labelled csv, model folder) after one ``fuselabel train`` on the tiny data set."""
    root = tmp_path_factory.mktemp("cli")
    image_dir, csv = make_tiny_dataset(root)
    model = root / "model"
    code = main(
        [
            "train",
            "--data",
            str(image_dir),
            "--csv",
            str(csv),
            "--out",
            str(model),
            "--cache-dir",
            session_cache,
            *TINY_TRAIN,
        ]
    )
    assert code == 0
    return image_dir, csv, model


def _unlabelled_copy(csv, dest, order=None):
    """The rows of a labelled CSV as ``ImageID,Caption`` (the test-set layout), optionally reordered."""
    records = read_records(csv).records
    rows = [records[i] for i in order] if order is not None else records
    lines = ["ImageID,Caption"] + [f'{r.image_id},"{r.caption}"' for r in rows]
    dest.write_text("\n".join(lines) + "\n")
    return [r.image_id for r in rows]


def test_train_writes_model_folder(trained):
    _, _, model = trained
    for name in (
        "config.json",
        "run.json",
        "labels.json",
        "thresholds.json",
        "preprocessing.json",
        "model.safetensors",
        "split.json",
        "metrics.json",
        "text",
    ):
        assert (model / name).exists(), name
    config = json.loads((model / "config.json").read_text())
    assert config["image_model"] == "tf_efficientnet_lite0" and config["image_size"] == 64
    assert config["hidden_dim"] == 32 and config["text_config_overrides"] == {"num_hidden_layers": 1}
    assert config["kind"] == "late" and json.loads((model / "run.json").read_text())["epochs"] == 2
    assert json.loads((model / "labels.json").read_text())["labels"] == ["1", "2", "3", "4"]
    split = json.loads((model / "split.json").read_text())
    assert len(split["train_ids"]) + len(split["val_ids"]) == 48
    assert not set(split["train_ids"]) & set(split["val_ids"])
    thresholds = json.loads((model / "thresholds.json").read_text())
    # the late weight is tuned over the 0.05 grid, stored as fp16 like every weight
    grid = {float(np.float16(w)) for w in np.round(np.arange(0.0, 1.0001, 0.05), 2)}
    assert len(thresholds["thresholds"]) == 4 and thresholds["late_weight"] in grid


def test_predict_unlabelled_keeps_input_order(trained, tmp_path, capsys):
    image_dir, csv, model = trained
    order = list(np.random.default_rng(3).permutation(48))
    ids = _unlabelled_copy(csv, tmp_path / "test.csv", order)
    sub, proba = tmp_path / "submission.csv", tmp_path / "proba.csv"
    code, out, err = _run(
        capsys,
        "predict",
        model,
        "--data",
        image_dir,
        "--csv",
        tmp_path / "test.csv",
        "--out",
        sub,
        "--proba",
        proba,
        *INFER,
    )
    assert code == 0, err
    assert "48 rows" in out
    rows = _csv_rows(sub)
    assert rows[0] == ["ImageID", "Labels"]
    assert [r[0] for r in rows[1:]] == ids
    assert all(r[1].split() and set(r[1].split()) <= {"1", "2", "3", "4"} for r in rows[1:])

    table = _csv_rows(proba)
    assert table[0] == ["ImageID", "1", "2", "3", "4", "input"]
    assert [r[0] for r in table[1:]] == ids
    assert {r[-1] for r in table[1:]} == {"ok"}
    probs = np.array([[float(x) for x in r[1:-1]] for r in table[1:]])
    assert probs.shape == (48, 4) and ((probs >= 0) & (probs <= 1)).all()

    # Same model, same rows in file order: identical probabilities (the image engine is deterministic).
    _unlabelled_copy(csv, tmp_path / "sorted.csv")
    code, _, err = _run(
        capsys,
        "predict",
        model,
        "--data",
        image_dir,
        "--csv",
        tmp_path / "sorted.csv",
        "--out",
        tmp_path / "s.csv",
        "--proba",
        tmp_path / "p2.csv",
        "--engine",
        "torch",
        *INFER,
    )
    assert code == 0, err
    again = np.array([[float(x) for x in r[1:-1]] for r in _csv_rows(tmp_path / "p2.csv")[1:]])
    np.testing.assert_allclose(again[order], probs, atol=2e-4)


def test_evaluate_json(trained, tmp_path, capsys):
    image_dir, csv, model = trained
    report_path = tmp_path / "report.json"
    code, out, err = _run(capsys, "evaluate", model, "--data", image_dir, "--csv", csv, "--json", report_path, *INFER)
    assert code == 0, err
    report = json.loads(report_path.read_text())
    for key in ("mean_f1", "micro_f1", "macro_f1", "per_label"):
        assert key in report, key
    assert len(report["per_label"]) == 4
    # Colour and caption words give the labels away; even two epochs of a tiny head beat chance.
    assert report["mean_f1"] > 0.5, report


def test_evaluate_split_scores_only_that_side_of_the_model_split(trained, tmp_path, capsys):
    image_dir, csv, model = trained
    split = json.loads((model / "split.json").read_text())
    for side in ("val", "train"):
        report_path = tmp_path / f"{side}.json"
        code, out, err = _run(
            capsys, "evaluate", model, "--data", image_dir, "--csv", csv, "--split", side, "--json", report_path, *INFER
        )
        assert code == 0, err
        assert json.loads(report_path.read_text())["rows"] == len(split[f"{side}_ids"]), side
    assert 0 < len(split["val_ids"]) < len(read_records(csv).records)


def _probabilities(path, labels) -> np.ndarray:
    """The label columns of a ``--proba`` CSV, rows in file order."""
    import csv as csv_module

    with open(path, newline="") as f:
        return np.array([[float(row[lab]) for lab in labels] for row in csv_module.DictReader(f)])


def test_convert_int8_shrinks_the_folder_and_predicts_alike(trained, tmp_path, capsys):
    image_dir, csv, trained_model = trained
    # the same weights stored in fp16, then in int8 (a CPU's default folder is int8 already)
    model, small = tmp_path / "fp16", tmp_path / "int8"
    for folder, dtype in ((model, "fp16"), (small, "int8")):
        code, out, err = _run(capsys, "convert", trained_model, "--out", folder, "--save-dtype", dtype)
        assert code == 0, err
    weights = [(folder / "model.safetensors").stat().st_size for folder in (model, small)]
    assert weights[1] < 0.75 * weights[0], weights  # the embedding and linear matrices in one byte, not two
    labels = json.loads((model / "labels.json").read_text())["labels"]
    probs = {}
    for name, folder in (("fp16", model), ("int8", small)):
        proba = tmp_path / f"{name}-proba.csv"
        code, out, err = _run(
            capsys,
            "predict",
            folder,
            "--data",
            image_dir,
            "--csv",
            csv,
            "--out",
            tmp_path / f"{name}-sub.csv",
            "--proba",
            proba,
            "--engine",
            "torch",
            *INFER,
        )
        assert code == 0, err
        probs[name] = _probabilities(proba, labels)
    assert probs["int8"].shape == (len(read_records(csv).records), len(labels))
    gap = np.abs(probs["int8"] - probs["fp16"])
    assert gap.max() < 0.05 and gap.mean() < 0.01, (gap.max(), gap.mean())


def test_info_and_inspect(trained, capsys):
    image_dir, csv, model = trained
    code, out, err = _run(capsys, "info", model)
    assert code == 0, err
    for part in (
        "model.safetensors",
        "config.json",
        "thresholds.json",
        "parameters:",
        "kind late",
        "tf_efficientnet_lite0",
        "labels (4): 1 2 3 4",
    ):
        assert part in out, part

    code, out, err = _run(capsys, "inspect", "--data", image_dir, "--csv", csv)
    assert code == 0, err
    assert "Rows:      48 (labelled)" in out and "Bad rows:  0" in out
    assert "0 missing" in out and "with line breaks: 1" in out

    code, out, err = _run(capsys, "inspect", "--data", image_dir, "--csv", csv, "--json")
    summary = json.loads(out)
    assert code == 0 and summary["rows"] == 48 and summary["missing_images"] == 0
    assert sum(summary["label_counts"].values()) == sum(len(s) for s in read_records(csv).label_sets)

    code, _, err = _run(capsys, "info", image_dir)
    assert code == 2 and "not a fuselabel model folder" in err


def test_garbage_line_exits_2_naming_file_and_line(trained, tmp_path, capsys):
    image_dir, csv, model = trained
    lines = csv.read_text().splitlines()
    lines.insert(10, "this line is not a row")  # physical line 11, between two complete rows
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(lines) + "\n")

    code, _, err = _run(capsys, "train", "--data", image_dir, "--csv", bad, "--out", tmp_path / "m", *TINY_TRAIN)
    assert code == 2
    assert "bad.csv" in err and "bad.csv:11" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()

    code, _, err = _run(
        capsys, "predict", model, "--data", image_dir, "--csv", bad, "--out", tmp_path / "s.csv", *INFER
    )
    assert code == 2 and "bad.csv:11" in err
    assert not (tmp_path / "s.csv").exists()

    code, out, _ = _run(capsys, "inspect", "--data", image_dir, "--csv", bad)
    assert code == 0 and "Bad rows:  1" in out and "bad.csv:11" in out


def test_missing_image(trained, tmp_path, capsys):
    image_dir, csv, model = trained
    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    (images / "7.jpg").unlink()
    ids = _unlabelled_copy(csv, tmp_path / "test.csv")
    sub, proba = tmp_path / "submission.csv", tmp_path / "proba.csv"

    # By default the row is predicted from its caption, flagged in the summary and the --proba file.
    code, out, err = _run(
        capsys,
        "predict",
        model,
        "--data",
        images,
        "--csv",
        tmp_path / "test.csv",
        "--out",
        sub,
        "--proba",
        proba,
        *INFER,
    )
    assert code == 0, err
    assert "1 rows predicted from the caption alone" in out
    rows = _csv_rows(sub)
    assert [r[0] for r in rows[1:]] == ids and rows[1 + ids.index("7.jpg")][1].split()
    inputs = {r[0]: r[-1] for r in _csv_rows(proba)[1:]}
    assert inputs.pop("7.jpg") == "caption_only" and set(inputs.values()) == {"ok"}

    # --strict: an error naming the row, its CSV line and the file; the submission already there is kept.
    before = sub.read_text()
    code, _, err = _run(
        capsys, "predict", model, "--data", images, "--csv", tmp_path / "test.csv", "--out", sub, "--strict", *INFER
    )
    assert code == 2
    assert "row 7.jpg" in err and "CSV line 10" in err  # row 3's caption spans two lines, so 7.jpg starts on line 10
    assert f"{images / '7.jpg'}: image missing" in err and "--strict" in err
    assert sub.read_text() == before

    # Photos read by several threads: the same one-line message, no traceback, nothing written or left behind.
    fresh = tmp_path / "fresh.csv"
    code, _, err = _run(
        capsys,
        "predict",
        model,
        "--data",
        images,
        "--csv",
        tmp_path / "test.csv",
        "--out",
        fresh,
        "--strict",
        "--num-workers",
        "2",
        "--engine",
        "torch",
    )
    assert code == 2 and not fresh.exists()
    assert "Traceback" not in err and err.startswith("fuselabel: error: ") and len(err.splitlines()) == 1
    assert f"{images / '7.jpg'}: image missing" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "proba.csv", "submission.csv", "test.csv"]

    code, out, _ = _run(capsys, "inspect", "--data", images, "--csv", csv)
    assert code == 0 and "1 missing" in out and "7.jpg" in out


def test_usage_errors(tmp_path, capsys):
    code, _, err = _run(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "m")
    assert code == 2 and "nowhere" in err and "not found" in err
    with pytest.raises(SystemExit) as err:
        main(["frobnicate"])
    assert err.value.code == 2
    image_dir, csv = make_tiny_dataset(tmp_path / "tiny", n=8)
    code, _, err = _run(
        capsys, "train", "--data", image_dir, "--csv", csv, "--out", tmp_path / "m", "--preset", "no-such-preset"
    )
    assert code == 2 and "unknown preset" in err
    code, _, err = _run(
        capsys, "train", "--data", image_dir, "--csv", csv, "--out", tmp_path / "m", "--set", "no_such_key=1"
    )
    assert code == 2 and "no_such_key" in err


# ---------------------------------------------------------------------------------------------------------------
# The real data: a small subset, trained and scored on its own rows

REAL_ROWS = 300


def test_real_subset_round_trip(tmp_path, capsys, session_cache):
    shared_data = shared_data_or_skip("the real-data train -> predict -> evaluate round trip")
    subset = tmp_path / "train.csv"
    # Captions with line breaks span two physical lines; cut at a row boundary by re-writing parsed rows.
    records = read_records(shared_data / "train.csv").records[:REAL_ROWS]
    subset.write_text(
        "ImageID,Labels,Caption\n" + "".join(f'{r.image_id},{" ".join(r.labels)},"{r.caption}"\n' for r in records)
    )
    model = tmp_path / "model"
    code, out, err = _run(
        capsys,
        "train",
        "--data",
        shared_data / "data",
        "--csv",
        subset,
        "--out",
        model,
        "--preset",
        "cpu-fast",
        "--epochs",
        "10",
        "--batch-size",
        "32",
        "--image-size",
        "64",
        "--cache-dir",
        session_cache,
        "--num-workers",
        "0",
        "--accelerator",
        "cpu",
    )
    assert code == 0, err

    sub = tmp_path / "submission.csv"
    code, out, err = _run(
        capsys, "predict", model, "--data", shared_data / "data", "--csv", subset, "--out", sub, *INFER
    )
    assert code == 0, err
    rows = _csv_rows(sub)
    assert rows[0] == ["ImageID", "Labels"] and [r[0] for r in rows[1:]] == [r.image_id for r in records]

    report_path = tmp_path / "report.json"
    code, out, err = _run(
        capsys, "evaluate", model, "--data", shared_data / "data", "--csv", subset, "--json", report_path, *INFER
    )
    assert code == 0, err
    report = json.loads(report_path.read_text())
    # Always answering "person" scores about 0.64 on these rows; a trained model must beat it on its own rows.
    assert report["mean_f1"] > 0.65, report["mean_f1"]


def test_image_size_defaults_and_backbone_own():
    """The default is the whole photo at 320 px; 0 (or null) asks for the backbone's own size and crop."""
    from fuselabel.config import build_config
    from fuselabel.encoders import create_image_encoder, image_data_config

    default = build_config()
    assert (default.image_size, default.image_crop_pct) == (320, 1.0)
    assert build_config("cpu-best").image_size == 384
    own = build_config(image_size=0, image_crop_pct=0)
    assert own.image_size is None and own.image_crop_pct is None
    backbone = create_image_encoder("tf_efficientnet_lite0", pretrained=False)
    assert image_data_config(backbone, own.image_size, own.image_crop_pct)["input_size"] == [3, 224, 224]
    whole = image_data_config(backbone, default.image_size, default.image_crop_pct)
    assert whole["input_size"] == [3, 320, 320] and whole["crop_pct"] == 1.0


def test_train_leaves_the_exported_copy_and_a_failed_export_falls_back(
    trained, tmp_path, capsys, caplog, monkeypatch, session_cache
):
    import fuselabel.export
    from fuselabel.onnx_folder import exported_location

    image_dir, csv, model = trained
    # Training on a CPU made the copy `predict` runs from, so its first run starts without PyTorch too.
    assert (exported_location(model, session_cache) / "manifest.json").is_file()
    code, out, _ = _run(
        capsys,
        "predict",
        model,
        "--data",
        image_dir,
        "--csv",
        csv,
        "--out",
        tmp_path / "a.csv",
        "--cache-dir",
        session_cache,
        *INFER,
    )
    assert code == 0 and "onnxruntime (exported folder)" in out

    # A network ONNX cannot express: the PyTorch model predicts instead, with the same labels, and says why.
    def unexportable(*args, **kwargs):
        raise RuntimeError("an operator ONNX has no counterpart for")

    monkeypatch.setattr(fuselabel.export, "export_onnx", unexportable)
    with caplog.at_level("WARNING"):
        code, out, _ = _run(
            capsys,
            "predict",
            model,
            "--data",
            image_dir,
            "--csv",
            csv,
            "--out",
            tmp_path / "b.csv",
            "--cache-dir",
            tmp_path / "empty-cache",
            *INFER,
        )
    assert code == 0 and "torch heads" in out, out
    assert "no ONNX copy could be exported" in caplog.text and "operator ONNX has no" in caplog.text
    assert (tmp_path / "b.csv").read_text() == (tmp_path / "a.csv").read_text()
