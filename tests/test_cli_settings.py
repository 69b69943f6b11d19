"""The command line generated from the settings: every setting a flag with help and default, one meaning per
flag in every command, argument errors before any heavy import, and --quiet down to the summary."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_dataset

from fuselabel.cli import RUNNING, build_parser
from fuselabel.config import HELP, Config


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
        assert HELP[f.name] in flags[flag].help and "(default: " in flags[flag].help, flag
    assert set(HELP) == {f.name for f in dataclasses.fields(Config)}


def test_a_flag_means_the_same_in_every_command():
    for command in ("predict", "evaluate"):
        flags = _actions(command)
        for key in RUNNING:
            flag = "--" + key.replace("_", "-")
            assert flags[flag].dest == _actions("train")[flag].dest == f"setting_{key}"
            assert flags[flag].help == _actions("train")[flag].help
    assert _actions("predict")["--engine"].dest == "setting_feature_engine"  # the earlier spelling still works
    assert _actions("train")["--fusion"].dest == "setting_late_combine"


def test_flags_and_set_give_the_same_settings():
    from fuselabel.cli import given_settings

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
            "--preset",
            "cpu-fast",
            "--image-size",
            "64",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--val-fraction",
            "0.25",
            "--num-workers",
            "0",
            "--cache-dir",
            session_cache,
            "--set",
            "hidden_dim=32",
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
