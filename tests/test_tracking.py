"""Experiment trackers (``logger``, ``log_dir``) and what a run says it spent its time on."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from conftest import TINY_SETTINGS, make_tiny_dataset

from fuselabel import FuseLabel
from fuselabel.config import Config
from fuselabel.tracking import StageTimes, check_logger


def test_csv_logger_writes_the_validation_mean_f1_of_every_epoch(tmp_path, session_cache):
    image_dir, table = make_tiny_dataset(tmp_path / "d", 48)
    settings = {**TINY_SETTINGS, "epochs": 3, "patience": 10, "logger": "csv", "log_dir": str(tmp_path / "logs")}
    FuseLabel(**settings, cache_dir=session_cache).fit(table, images=image_dir, out=tmp_path / "m", progress=False)
    written = list((tmp_path / "logs").rglob("metrics.csv"))
    assert len(written) == 1, written
    rows = [r for r in csv.DictReader(written[0].open()) if r.get("val_f1")]
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    # The figures the tracker got are the ones the model folder keeps, epoch by epoch.
    kept = json.loads((tmp_path / "m" / "metrics.json").read_text())["val_f1_by_time"]
    assert [round(float(r["val_f1"]), 6) for r in rows] == [round(r["val_f1"], 6) for r in kept]


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_a_missing_tracker_package_names_the_extra_to_install(logger, monkeypatch):
    real = importlib.util.find_spec
    absent = {"tensorboard", "tensorboardX", "mlflow"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in absent else real(name, *a))
    with pytest.raises(ValueError, match=rf"pip install 'fuselabel\[{logger}\]'"):
        check_logger(Config(logger=logger))


@pytest.mark.parametrize("logger", ["tensorboard", "mlflow"])
def test_tensorboard_and_mlflow_receive_the_run(logger, tmp_path, session_cache):
    """With the extra installed, the tracker's own files appear under log_dir."""
    image_dir, table = make_tiny_dataset(tmp_path / "d", 48)
    settings = {**TINY_SETTINGS, "epochs": 2, "logger": logger, "log_dir": str(tmp_path / "logs")}
    FuseLabel(**settings, cache_dir=session_cache).fit(table, images=image_dir, out=tmp_path / "m", progress=False)
    written = [p.name for p in (tmp_path / "logs").rglob("*") if p.is_file()]
    if logger == "tensorboard":
        assert any(name.startswith("events.out.tfevents") for name in written), written
    else:
        import mlflow

        store = tmp_path / "logs" / "mlflow.db"
        assert store.is_file(), written
        client = mlflow.MlflowClient(f"sqlite:///{store.as_posix()}")
        (run,) = client.search_runs([client.get_experiment_by_name("m").experiment_id])
        assert len(client.get_metric_history(run.info.run_id, "val_f1")) == 2


def test_no_tracker_by_default_and_unknown_ones_refused():
    assert Config().logger == "none" and Config().log_dir is None
    check_logger(Config())
    with pytest.raises(ValueError, match="logger"):
        Config(logger="wandb")


def test_stage_times_add_up_and_name_each_stage():
    times = StageTimes()
    times.add("image_encoder_s", 3.0)
    times.add("image_encoder_s", 2.0)
    times.add("save_s", 0.1)
    assert times["image_encoder_s"] == 5.0
    assert times.line() == "image encoder 5s"  # under half a second is left out of the summary
