"""fuselabel tune: a study over the heads' settings on cached features, resumed, bounded, and its best model."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import TINY_SETTINGS, make_tiny_dataset

optuna = pytest.importorskip("optuna")

from fuselabel import FuseLabel, tune
from fuselabel.cli import main as cli_main
from fuselabel.config import Config, TuneSettings, build_config

PARAMS = ["hidden_dim", "dropout", "lr", "loss"]  # quick ones: epochs stay at the tiny 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune-data")
    return make_tiny_dataset(root)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Config:
    settings = dict(TINY_SETTINGS)
    cache = str(tmp_path_factory.mktemp("tune-cache"))
    return build_config(settings.pop("preset"), None, **settings, cache_dir=cache)


def _study(out):
    return optuna.load_study(study_name="fuselabel", storage=f"sqlite:///{out / tune.STUDY_FILE}")


@pytest.fixture(scope="module")
def searched(data, base, tmp_path_factory):
    """Three trials (the default first), then the same study resumed to five."""
    image_dir, csv = data
    out = tmp_path_factory.mktemp("tune") / "model"
    first = tune.search(base, image_dir, csv, out, TuneSettings(trials=3, params=PARAMS, prune=False))
    first_trials = [(t.number, t.params) for t in _study(out).trials]
    second = tune.search(base, image_dir, csv, out, TuneSettings(trials=5, params=PARAMS, prune=False, resume=True))
    return out, first, first_trials, second


def test_a_study_runs_its_trials_and_writes_the_best_model(searched, data):
    out, first, first_trials, _ = searched
    assert first.trials == {"complete": 3, "pruned": 0, "failed": 0}
    assert len(first_trials) == 3 and first_trials[0][1] == {}  # trial 0: the starting settings themselves
    assert first.default_value is not None and first.best_value >= first.default_value
    summary = json.loads((out / tune.SUMMARY_FILE).read_text())
    assert summary["trials"]["complete"] == 5  # the folder holds the resumed study's figures
    assert not tune.work_dir(out).exists()  # the work folder goes once the model is in place


def test_the_resumed_study_continues_the_same_trials(searched):
    out, first, first_trials, second = searched
    trials = _study(out).trials
    assert len(trials) == 5 and second.trials["complete"] == 5
    assert [(t.number, t.params) for t in trials[:3]] == first_trials  # the first three kept, not run again
    assert len({json.dumps(t.params, sort_keys=True) for t in trials[1:]}) == 4  # new draws, not repeats
    assert second.best_value >= first.best_value
    assert second.default_value == pytest.approx(first.default_value)


def test_the_best_settings_are_the_written_models(searched, data):
    out, _, _, second = searched
    study = _study(out)
    best = study.best_trial
    assert second.best_value == pytest.approx(best.value)
    saved = {**json.loads((out / "config.json").read_text()), **json.loads((out / "run.json").read_text())}
    for key, value in best.user_attrs["settings"].items():
        assert saved[key] == pytest.approx(value) if isinstance(value, float) else saved[key] == value, key
    for key in ("hidden_dim", "dropout", "lr", "loss"):
        if key in best.params:
            assert saved[key] == pytest.approx(best.params[key]), key
    image_dir, csv = data
    model = FuseLabel.from_pretrained(out)
    probs = model.predict_proba(images=[image_dir / "5.jpg"], captions=["a photo of a dog"])
    assert probs.shape == (1, 4)
    assert model.evaluate(csv, images=image_dir)["mean_f1"] > 0.3


def test_a_kept_study_needs_resume_and_the_same_settings(searched, data, base):
    out, *_ = searched
    image_dir, csv = data
    with pytest.raises(ValueError, match="--resume"):
        tune.search(base, image_dir, csv, out, TuneSettings(trials=6, params=PARAMS))
    with pytest.raises(ValueError, match="cannot resume.*batch_size"):
        tune.search(base.replace(batch_size=8), image_dir, csv, out, TuneSettings(trials=6, params=PARAMS, resume=True))
    assert len(_study(out).trials) == 5  # refused before any trial


def test_the_time_budget_stops_new_trials(data, base, tmp_path):
    image_dir, csv = data
    result = tune.search(base, image_dir, csv, tmp_path / "m", TuneSettings(trials=50, timeout=0.5, params=PARAMS))
    assert result.trials["complete"] + result.trials["pruned"] == 1  # the one under way when time ran out
    assert set(result.best_settings) <= {"threshold_method"}  # only the default ran (with its best rule)


def test_pruned_trials_stop_at_the_epoch_reported(data, base, tmp_path, monkeypatch):
    class PruneAfterTheDefault(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return trial.number >= 1

    monkeypatch.setattr(tune, "_pruner", lambda optuna, settings: PruneAfterTheDefault())
    image_dir, csv = data
    result = tune.search(base, image_dir, csv, tmp_path / "m", TuneSettings(trials=2, params=PARAMS))
    assert result.trials == {"complete": 1, "pruned": 1, "failed": 0}
    pruned = _study(tmp_path / "m").trials[1]
    assert pruned.state == optuna.trial.TrialState.PRUNED and list(pruned.intermediate_values) == [0]
    complete = _study(tmp_path / "m").trials[0]
    assert sorted(complete.intermediate_values) == [0, 1]  # every epoch of the tiny two reported


def test_the_command_line(data, base, tmp_path, monkeypatch, capsys):
    image_dir, csv = data
    out = tmp_path / "m"
    flags = ["--set", f"cache_dir={base.cache_dir}", "--set", "image_size=64", "--set", "hidden_dim=32"]
    flags += ["--set", "epochs=2", "--set", "num_workers=0", "--set", "accelerator=cpu"]
    flags += ["--set", "text_config_overrides={num_hidden_layers: 1}", "--preset", "cpu-fast"]
    args = [
        "tune",
        "--data",
        str(image_dir.parent),
        "--out",
        str(out),
        "--trials",
        "2",
        "--params",
        "lr",
        "--params",
        "dropout",
    ]
    assert cli_main(args + flags) == 0
    printed = capsys.readouterr().out
    assert "validation mean F1" in printed and "default" in printed
    assert (out / tune.STUDY_FILE).is_file() and len(_study(out).trials) == 2
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    assert cli_main(["tune", "--data", str(image_dir.parent), "--out", str(tmp_path / "notes")] + flags) == 2
    assert "notes" in capsys.readouterr().err and (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    monkeypatch.setitem(sys.modules, "optuna", None)  # as if the extra were not installed
    assert cli_main(args + ["--out", str(tmp_path / "m2")] + flags) == 2
    assert "fuselabel[tune]" in capsys.readouterr().err


def _exit_status(argv: list[str]) -> int:
    """The command's exit status, whether the parser or the command refused the arguments."""
    try:
        return cli_main(argv)
    except SystemExit as stop:
        return stop.code


def test_search_settings_are_checked_before_any_work(data, tmp_path, capsys):
    image_dir, _ = data
    out = tmp_path / "m"
    for flags, named in (
        (["--trials", "0"], "--trials"),
        (["--params", "width"], "--params"),
        (["--timeout", "soon"], "--timeout"),
    ):
        assert _exit_status(["tune", "--data", str(image_dir.parent), "--out", str(out), *flags]) == 2
        assert named in capsys.readouterr().err
    assert not out.exists() and not tune.work_dir(out).exists()
    with pytest.raises(ValueError, match="regime='finetune'"):
        tune.search(Config(regime="finetune"), image_dir, image_dir.parent / "train.csv", out)


def test_a_failing_trial_is_recorded_and_the_search_goes_on(data, base, tmp_path, monkeypatch):
    image_dir, csv = data
    monkeypatch.setattr(
        tune, "suggest_settings", lambda trial, base, params: {"loss": "focal", "loss_kwargs": {"gamma": -1}}
    )
    result = tune.search(base, image_dir, csv, tmp_path / "m", TuneSettings(trials=2, params=PARAMS, prune=False))
    assert result.trials == {"complete": 1, "pruned": 0, "failed": 1} and result.best_settings.keys() <= {
        "threshold_method"
    }
    assert FuseLabel.from_pretrained(tmp_path / "m").predict(images=[image_dir / "4.jpg"], captions=["a dog"])
    # the starting settings themselves failing stop the search with their error, the study kept for a fix
    broken = base.replace(loss="focal", loss_kwargs={"gamma": -1})
    with pytest.raises(ValueError, match="gamma"):
        tune.search(broken, image_dir, csv, tmp_path / "n", TuneSettings(trials=2, params=PARAMS))
    assert not (tmp_path / "n").exists() and (tune.work_dir(tmp_path / "n") / tune.WORK_STUDY).is_file()
