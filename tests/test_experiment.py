"""The study runner: grid expansion, results files, failures, and no retraining per threshold method."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import fuselabel.train
from fuselabel import experiment
from fuselabel.cli import main as cli_main
from fuselabel.experiment import plan_runs, run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WORDS = {1: "person", 2: "bicycle", 3: "car", 4: "dog"}
COLOURS = {1: (220, 40, 40), 2: (40, 200, 40), 3: (40, 40, 220), 4: (200, 200, 40)}

# Small and quick: packaged Lite0 at 64 px, a one-layer random text encoder, one epoch, no loader workers.
TINY = dict(
    image_model="tf_efficientnet_lite0",
    image_size=64,
    epochs=1,
    regime="frozen",
    batch_size=16,
    num_workers=0,
    val_fraction=0.25,
    text_pretrained=False,
    text_config_overrides=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """40 small JPEGs and a course-format CSV (ImageID,Labels,Caption); colour and words carry the labels."""
    root = tmp_path_factory.mktemp("data")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    lines = ["ImageID,Labels,Caption"]
    for i in range(40):
        labels = sorted({int(rng.integers(1, 5))} | ({1} if rng.random() < 0.4 else set()))
        colour = np.array(COLOURS[labels[-1]], dtype=float)
        pixels = np.clip(colour + rng.normal(0, 60, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "data" / f"{i}.jpg", quality=85)
        caption = " and ".join(f"a {WORDS[lab]}" for lab in labels)
        lines.append(f'{i}.jpg,{" ".join(map(str, labels))},"A photo of {caption} on a street."')
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def study(dataset, cache_dir, tmp_path_factory):
    """2 settings x 2 seeds, models kept."""
    out = tmp_path_factory.mktemp("study")
    grid = {
        "name": "tiny",
        "base": {**TINY, "cache_dir": cache_dir},
        "grid": {"kind": ["image", "late"]},
        "seeds": [0, 1],
    }
    rows = run_experiment(grid, out, data=dataset, csv=dataset / "train.csv")
    return out, rows


def test_study_writes_results(study):
    out, rows = study
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    table = _read_csv(out / "results.csv")
    assert len(table) == 4
    assert {(r["kind"], r["seed"]) for r in table} == {("image", "0"), ("image", "1"), ("late", "0"), ("late", "1")}
    assert len({r["run_id"] for r in table}) == 4
    for r in table:
        model = Path(r["model_dir"])
        saved = json.loads((model / "metrics.json").read_text())["validation"]
        thresholds = json.loads((model / "thresholds.json").read_text())
        # every figure in the table is the kept model's own, read back from its folder
        assert float(r["val_mean_f1"]) == pytest.approx(saved["mean_f1"], abs=1e-6)
        assert float(r["micro_f1"]) == pytest.approx(saved["micro_f1"], abs=1e-6)
        assert float(r["macro_f1"]) == pytest.approx(saved["macro_f1"], abs=1e-6)
        for method in ("global", "per_class", "balanced"):
            assert float(r[f"val_f1_{method}"]) == pytest.approx(
                thresholds["alternatives"][method]["val_mean_f1"], abs=1e-6
            )
        # the chosen method is the default (global), so the headline is the global alternative
        assert r["threshold_method"] == "global"
        assert float(r["val_mean_f1"]) == pytest.approx(float(r["val_f1_global"]))
        assert float(r["train_s"]) > 0 and float(r["total_s"]) >= float(r["train_s"])
        split = json.loads((model / "split.json").read_text())
        assert int(r["val_rows"]) == len(split["val_ids"]) > 0
        assert float(r["size_mb"]) * 1e6 == pytest.approx(
            sum(f.stat().st_size for f in model.rglob("*") if f.is_file()), rel=0.05
        )
        # late fusion's tuned image weight is reported (and is the folder's); other kinds have none
        if r["kind"] == "late":
            assert float(r["late_weight"]) == pytest.approx(thresholds["late_weight"], abs=1e-6)
        else:
            assert r["late_weight"] == ""

    md = (out / "results.md").read_text()
    body = [line for line in md.splitlines() if line.startswith("| image") or line.startswith("| late")]
    assert len(body) == 2  # grouped over seeds
    assert all("±" in line for line in body)
    header = next(line for line in md.splitlines() if line.startswith("| kind"))
    assert "| n |" in header and "mean F1" in header
    cells = [c.strip() for c in body[0].strip("|").split("|")]
    assert cells[header.strip("|").split("|").index(" n ")] == "2"

    png = out / "results.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["rows"][0]["run_id"] == rows[0]["run_id"]


def test_failures_are_recorded_and_threshold_methods_share_training(dataset, cache_dir, tmp_path, monkeypatch, capsys):
    calls = []
    real_fit = fuselabel.train.fit

    def counting_fit(config, *args, **kwargs):
        calls.append(config)
        if len(calls) == 2:  # results are written after every run, not only at the end
            so_far = _read_csv(tmp_path / "out" / "results.csv")
            assert {r["status"] for r in so_far} == {"ok", "failed"} and len(so_far) == 6
        return real_fit(config, *args, **kwargs)

    monkeypatch.setattr(fuselabel.train, "fit", counting_fit)
    checked = []

    def check_alternatives(run_id, config, result):
        # per-method metrics recomputed from the stored probabilities match what fit tuned
        for method, alt in result.thresholds["alternatives"].items():
            scores = experiment._method_metrics(result, config, method)
            assert scores["mean_f1"] == pytest.approx(alt["val_mean_f1"], abs=1e-9)
        assert experiment._method_metrics(result, config, config.threshold_method)["micro_f1"] == pytest.approx(
            result.report["micro_f1"]
        )
        checked.append(run_id)

    grid = {
        "name": "broken",
        "base": {**TINY, "cache_dir": cache_dir, "kind": "image"},
        "grid": {"threshold_method": ["per_class", "global", "balanced"]},
        "runs": [{}, {"kind": "nonsense"}, {"image_model": "no_such_model"}],
        "seeds": [0],
        "keep_models": False,
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(grid))
    rows = run_experiment(path, tmp_path / "out", data=dataset, csv=dataset / "train.csv", on_result=check_alternatives)

    # 3 settings x 3 methods of result rows, but only two trainings: one good, one failing inside fit;
    # the invalid kind never reaches fit, and threshold methods never retrain.
    assert len(calls) == 2 and len(checked) == 1
    assert calls[0].threshold_method == "per_class"  # the first listed method is the one the model keeps
    table = _read_csv(tmp_path / "out" / "results.csv")
    assert len(table) == 9
    ok = [r for r in table if r["status"] == "ok"]
    assert len(ok) == 3 and {r["threshold_method"] for r in ok} == {"global", "per_class", "balanced"}
    assert len({r["run_id"] for r in ok}) == 1 and all(r["model_dir"] == "" for r in ok)
    for r in ok:
        assert float(r["val_mean_f1"]) == pytest.approx(float(r[f"val_f1_{r['threshold_method']}"]), abs=1e-6)
    failed = [r for r in table if r["status"] == "failed"]
    assert len(failed) == 6
    assert sum("nonsense" in r["error"] for r in failed) == 3
    assert sum("no_such_model" in r["error"] for r in failed) == 3
    assert (tmp_path / "out" / "logs").is_dir()
    assert any(p.name.endswith(".error.txt") for p in (tmp_path / "out" / "logs").iterdir())
    md = (tmp_path / "out" / "results.md").read_text()
    assert "## Failed runs" in md and "no_such_model" in md
    assert (tmp_path / "out" / "results.png").exists()
    assert len(rows) == 9

    # the command line: a dry run lists the two trainings (and the invalid run) and trains nothing
    assert cli_main(["experiment", "--config", str(path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "2 training(s), 9 result row(s)" in printed and "INVALID" in printed
    assert len(calls) == 2


def test_main_runs_a_study_and_reports_failure_in_exit_code(dataset, cache_dir, tmp_path):
    grid = {
        "name": "cli",
        "base": {**TINY, "cache_dir": cache_dir, "kind": "image"},
        "runs": [{}, {"loss": "nope"}],
        "keep_models": False,
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(grid))
    code = cli_main(
        ["experiment", "--config", str(path), "--data", str(dataset), "--out", str(tmp_path / "o"), "--set", "epochs=1"]
    )
    assert code == 1  # one run failed (recorded), the other finished
    table = _read_csv(tmp_path / "o" / "results.csv")
    assert [r["status"] for r in table] == ["ok", "failed"]
    assert cli_main(["experiment", "--config", str(tmp_path / "missing.yaml"), "--dry-run"]) == 2


# ---------------------------------------------------------------- planning only (no training)


def test_plan_of_shipped_configs():
    ablation = plan_runs(CONFIGS / "ablation-cpu.yaml")
    # late_combine cannot matter outside kind=late: 5 models per seed, 3 seeds; 3 threshold methods each
    assert ablation.n_trainings == 15 and ablation.n_rows == 45
    assert all(u.config.regime == "frozen" for u in ablation.units)
    assert {u.settings["late_combine"] for u in ablation.units if u.settings["kind"] != "late"} == {"-"}

    seed = plan_runs(CONFIGS / "seed-table1.yaml")
    assert seed.n_trainings == 12 and seed.n_rows == 36
    cfg = seed.units[0].config
    assert (cfg.image_model, cfg.text_model, cfg.regime, cfg.epochs, cfg.batch_size) == (
        "efficientnet_b3",
        "albert-base-v2",
        "finetune",
        10,
        32,
    )
    assert {u.config.lr_text for u in seed.units} == {2e-5, 1e-4}
    assert {u.config.late_combine for u in seed.units} == {"union", "weighted"}

    smoke = plan_runs(CONFIGS / "smoke.yaml")
    assert smoke.n_trainings == 2 and all(u.config.epochs == 1 for u in smoke.units)


def test_plan_checks_and_coerces():
    plan = plan_runs({"base": {"lr": "1e-4", "preset": "cpu-fast"}, "grid": {"lr_text": ["2e-5", 1e-3]}})
    assert [u.config.lr_text for u in plan.units] == [2e-5, 1e-3]
    assert plan.units[0].config.lr == 1e-4 and plan.units[0].config.image_model == "tf_efficientnet_lite0"
    assert plan.units[0].seed == 42  # no seeds: the base (default) seed
    with pytest.raises(ValueError, match="learning_rate"):
        plan_runs({"grid": {"learning_rate": [1e-3]}})
    with pytest.raises(ValueError, match="list"):
        plan_runs({"grid": {"lr": 1e-3}})
    with pytest.raises(ValueError, match="seeds"):
        plan_runs({"grid": {"seed": [1, 2]}})
    with pytest.raises(ValueError, match="unknown key"):
        plan_runs({"gird": {"kind": ["image"]}})
