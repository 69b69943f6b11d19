"""The command line generated from the settings: every setting a flag with help and default, one meaning per
flag in every command, argument errors before any heavy import, and --quiet down to the summary."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import TINY_CLI_TRAIN, make_tiny_dataset

from fuselabel.cli import given_settings, main
from fuselabel.config import PRESETS, Config
from fuselabel.options import COMMAND_OPTIONS, RUNNING, build_parser


def _actions(command: str) -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, type(parser._subparsers._group_actions[0])))
    return {opt: action for action in sub.choices[command]._actions for opt in action.option_strings}


def test_every_setting_has_a_flag_with_help_and_default():
    flags = _actions("train")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in flags, flag
        assert flags[flag].dest == f"setting_{f.name}"
        description = Config.__pydantic_fields__[f.name].description
        assert description and flags[flag].help.startswith(description) and "(default: " in flags[flag].help, flag


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as done:
        main([*argv, "--help"])
    assert done.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare word runs


def test_a_description_appears_in_help_exactly_as_declared(capsys):
    from fuselabel.config import ServeSettings
    from fuselabel.options import TableOptions

    for command, group, key in [
        ("train", Config, "image_quant"),
        ("train", Config, "threshold_method"),
        ("predict", Config, "devices"),
        ("predict", TableOptions, "label_sep"),
        ("serve", ServeSettings, "max_megapixels"),
    ]:
        description = group.__pydantic_fields__[key].description
        assert " ".join(description.split()) in _help(capsys, command), (command, key)


def test_help_lists_each_preset_with_its_line(capsys):
    with_presets = [c for c in COMMAND_OPTIONS if "--preset" in _actions(c)]
    assert "train" in with_presets
    for command in with_presets:
        text = _help(capsys, command)
        for name, preset in PRESETS.items():
            assert f"{name} {preset.description}" in text, (command, name)


def test_devices_takes_the_same_values_in_train_and_predict():
    parser = build_parser()
    for value, parsed in [("0,1", [0, 1]), ("2", 2), ("auto", "auto")]:
        train = parser.parse_args(["train", "--data", "d", "--out", "o", "--devices", value])
        predict = parser.parse_args(["predict", "m", "--data", "d", "--out", "p.csv", "--devices", value])
        assert given_settings(train)["devices"] == given_settings(predict)["devices"] == parsed
        assert (
            _actions("train")["--devices"].help.split(" (default")[0]
            == _actions("predict")["--devices"].help.split(" (default")[0]
        )


def test_predict_spreads_a_list_of_devices_over_that_many_processes():
    from fuselabel.cli import _processes

    assert _processes([0, 1], "gpu") == 2 and _processes(3, "cpu") == 3 and _processes("auto", "cpu") == 1
    with pytest.raises(ValueError, match="devices"):
        _processes([2, 3], "gpu")


def test_a_flag_means_the_same_in_every_command():
    for command in ("predict", "evaluate"):
        flags = _actions(command)
        for key in RUNNING:
            flag = "--" + key.replace("_", "-")
            assert flags[flag].dest == _actions("train")[flag].dest == f"setting_{key}"
            assert flags[flag].help == _actions("train")[flag].help
    assert _actions("predict")["--engine"].dest == "setting_feature_engine"  # the earlier spelling still works
    assert _actions("train")["--fusion"].dest == "setting_late_combine"
    for command in ("evaluate", "inspect"):  # --json [FILE]: the report as JSON, the same in both
        assert _actions(command)["--json"].dest == "json_report" and _actions(command)["--json"].const == "-"


def test_flags_and_set_give_the_same_settings():
    parser = build_parser()
    a = parser.parse_args(
        [
            "train",
            "--data",
            "d",
            "--out",
            "o",
            "--modality-dropout",
            "0.2",
            "--no-tta-flip",
            "--image-size",
            "0",
            "--devices",
            "0,1",
            "--loss-kwargs",
            "{gamma: 2}",
        ]
    )
    assert given_settings(a) == {
        "modality_dropout": 0.2,
        "tta_flip": False,
        "image_size": 0,
        "devices": [0, 1],
        "loss_kwargs": {"gamma": 2},
    }


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--set", "epochs=ten"], ["epochs", "ten"]),
        (["--set", "no_such=1"], ["no_such"]),
        (["--preset", "nope"], ["nope"]),
    ],
)
def test_bad_arguments_are_refused_before_any_heavy_import(tmp_path, argv, words):
    image_dir, csv = make_tiny_dataset(tmp_path / "d", 4)
    code = (
        "import sys\nfrom fuselabel.cli import main\n"
        f"code = main(['train', '--data', {str(tmp_path / 'd')!r}, '--out', {str(tmp_path / 'm')!r}, *{argv!r}])\n"
        "heavy = sorted(m for m in ('torch', 'lightning', 'timm', 'transformers', 'sklearn') if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "2 []", done.stdout + done.stderr
    for word in words:
        assert word in done.stderr


@pytest.mark.parametrize(
    "argv, words",
    [
        (["train", "--data", "d", "--out", "o", "--epochs", "0"], ["epochs=0"]),
        (["train", "--data", "d", "--out", "o", "--batch-size", "many"], ["--batch-size", "many"]),
        (["predict", "m", "--data", "d", "--out", "p.csv", "--chunk-size", "0"], ["--chunk-size", "chunk_size=0"]),
        (["predict", "m", "--data", "d", "--out", "p.csv", "--devices", "one"], ["--devices", "one"]),
        (["evaluate", "m", "--data", "d", "--num-workers", "-1"], ["num_workers=-1"]),
        (["report", "m", "--data", "d", "--out", "r.html", "--split", "test"], ["--split", "test"]),
        (["inspect", "--data", "d", "--delimiter", "x"], ["--delimiter", "'x'"]),
        (["info", "no/such/model"], ["no/such/model"]),
        (["experiment", "--config", "g.yaml", "--set", "epochs"], ["--set", "epochs"]),
        (["convert", "m", "--out", "s", "--save-dtype", "int4"], ["--save-dtype", "int4"]),
        (["export", "m", "--check-rows", "-1"], ["--check-rows", "check_rows=-1"]),
        (["serve", "m", "--max-batch", "0"], ["--max-batch", "max_batch=0"]),
        (["serve", "m", "--port", "70000"], ["--port", "port=70000"]),
    ],
)
def test_a_bad_value_is_refused_naming_its_key_in_every_command(capsys, argv, words):
    try:
        code = main(argv)
    except SystemExit as done:  # argparse refuses a value its type or choices rule out
        code = done.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def test_the_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    from fuselabel.cache import default_cache_dir

    monkeypatch.delenv("FUSELABEL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "fuselabel"
    monkeypatch.setenv("FUSELABEL_CACHE", str(tmp_path / "own"))
    assert default_cache_dir() == tmp_path / "own"


def test_quiet_training_prints_the_summary_and_nothing_else(tmp_path, session_cache):
    image_dir, csv = make_tiny_dataset(tmp_path / "d")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuselabel.cli",
            "train",
            "--data",
            str(tmp_path / "d"),
            "--out",
            str(tmp_path / "m"),
            *TINY_CLI_TRAIN,
            "--cache-dir",
            session_cache,
            "--text-config-overrides",
            "{num_hidden_layers: 1}",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("validation mean F1"), lines
