import json

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, multilabel_confusion_matrix, precision_recall_fscore_support

from fuselabel.metrics import evaluate, format_report, mean_f1, row_f1

LABELS = [str(i) for i in range(1, 20) if i != 12]  # 18 labels, like the reference task


def _random_pair(seed, n=200, c=18, density=0.15):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, c)) < density).astype(int)
    y_pred = (rng.random((n, c)) < density).astype(int)
    # Force the edge cases: both empty, only true empty, only pred empty.
    y_true[:5] = 0
    y_pred[:3] = 0
    y_true[5:8] = 0
    y_pred[8:10] = 0
    y_pred[5:8, 0] = 1
    y_true[8:10, 1] = 1
    return y_true, y_pred


def _row_f1_bruteforce(t, p):
    t, p = set(np.flatnonzero(t)), set(np.flatnonzero(p))
    if not t and not p:
        return 1.0
    return 2 * len(t & p) / (len(t) + len(p))


@pytest.mark.parametrize("seed", range(5))
def test_mean_f1_matches_sklearn_and_row_f1(seed):
    y_true, y_pred = _random_pair(seed)
    expected = f1_score(y_true, y_pred, average="samples", zero_division=1.0)
    assert mean_f1(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    rows = row_f1(y_true, y_pred)
    assert rows.shape == (len(y_true),)
    assert rows.mean() == pytest.approx(mean_f1(y_true, y_pred), abs=1e-12)
    brute = [_row_f1_bruteforce(t, p) for t, p in zip(y_true, y_pred)]
    np.testing.assert_allclose(rows, brute, atol=1e-12)


def test_row_f1_edge_cases():
    y_true = np.array([[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 0]])
    y_pred = np.array([[0, 0, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0], [1, 0, 1]])
    np.testing.assert_allclose(row_f1(y_true, y_pred), [1.0, 0.0, 0.0, 1.0, 0.5])
    assert mean_f1(y_true, y_pred) == pytest.approx(0.5)


def test_all_zero_matrices_score_one():
    z = np.zeros((4, 18), dtype=int)
    assert mean_f1(z, z) == pytest.approx(1.0)
    assert row_f1(z, z).tolist() == [1.0] * 4


def test_bool_inputs_accepted():
    y_true, y_pred = _random_pair(0)
    assert mean_f1(y_true.astype(bool), y_pred.astype(bool)) == pytest.approx(mean_f1(y_true, y_pred))


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        mean_f1(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError):
        mean_f1(np.zeros((3, 4)), np.full((3, 4), 0.7))


@pytest.mark.parametrize("seed", range(3))
def test_evaluate_matches_sklearn(seed):
    y_true, y_pred = _random_pair(seed)
    names = {"1": "person", "3": "car"}
    rep = evaluate(y_true, y_pred, LABELS, names)
    json.dumps(rep)  # must be JSON-able

    assert rep["rows"] == len(y_true)
    assert rep["mean_f1"] == pytest.approx(f1_score(y_true, y_pred, average="samples", zero_division=1.0))
    assert rep["micro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0.0))
    assert rep["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0.0))
    p, r, _, _ = precision_recall_fscore_support(y_true, y_pred, average="micro", zero_division=0.0)
    assert rep["micro_precision"] == pytest.approx(p)
    assert rep["micro_recall"] == pytest.approx(r)
    assert rep["exact_match"] == pytest.approx(accuracy_score(y_true, y_pred))

    mcm = multilabel_confusion_matrix(y_true, y_pred)
    assert [e["label"] for e in rep["per_label"]] == LABELS
    for j, e in enumerate(rep["per_label"]):
        (tn, fp), (fn, tp) = mcm[j]
        assert (e["tp"], e["fp"], e["fn"], e["tn"]) == (tp, fp, fn, tn)
        assert e["support"] == y_true[:, j].sum() == tp + fn
        assert e["predicted"] == y_pred[:, j].sum() == tp + fp
        assert e["tp"] + e["fp"] + e["fn"] + e["tn"] == len(y_true)
        exp_p = tp / (tp + fp) if tp + fp else 0.0
        exp_r = tp / (tp + fn) if tp + fn else 0.0
        exp_f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
        assert e["precision"] == pytest.approx(exp_p)
        assert e["recall"] == pytest.approx(exp_r)
        assert e["f1"] == pytest.approx(exp_f)
    assert rep["per_label"][0]["name"] == "person"
    assert rep["per_label"][1]["name"] == "2"  # unnamed label falls back to its id


def test_evaluate_label_count_mismatch():
    y_true, y_pred = _random_pair(0)
    with pytest.raises(ValueError):
        evaluate(y_true, y_pred, LABELS[:-1])


def test_format_report_contains_every_label():
    y_true, y_pred = _random_pair(1)
    names = {lab: f"name_{lab}" for lab in LABELS}
    rep = evaluate(y_true, y_pred, LABELS, names)
    text = format_report(rep)
    assert "mean F1" in text
    assert f"{rep['mean_f1']:.4f}" in text
    lines = text.splitlines()
    for lab in LABELS:
        assert any(line.split()[:2] == [lab, f"name_{lab}"] for line in lines), lab
    # Fixed width: all per-label lines have the same length.
    table = [line for line in lines if line.split() and line.split()[0] in LABELS]
    assert len(table) == len(LABELS)
    assert len({len(line) for line in table}) == 1
