import numpy as np
import pytest

from fuselabel.metrics import mean_f1, row_f1
from fuselabel.thresholds import DEFAULT_GRID, apply_thresholds, tune, tune_balanced, tune_global, tune_per_class

TOL = 1e-9


def _synthetic(seed, n=300, c=8):
    """Labels with class-dependent calibration so per-class thresholds matter."""
    rng = np.random.default_rng(seed)
    prior = rng.uniform(0.05, 0.4, size=c)
    y = rng.random((n, c)) < prior
    y[np.arange(n), rng.integers(0, c, size=n)] = True  # every row has a label
    strength = rng.uniform(0.5, 3.0, size=c)
    bias = rng.uniform(-2.5, 0.5, size=c)
    logits = bias + strength * (2 * y - 1) + rng.normal(size=(n, c))
    probs = 1 / (1 + np.exp(-logits))
    return y.astype(int), probs


def _score(y, probs, thr, ensure_nonempty):
    return row_f1(y, apply_thresholds(probs, thr, ensure_nonempty)).mean()


# ---------------------------------------------------------------- apply_thresholds


def test_apply_thresholds_scalar_and_vector():
    probs = np.array([[0.2, 0.6, 0.5], [0.9, 0.1, 0.4]])
    np.testing.assert_array_equal(
        apply_thresholds(probs, 0.5, ensure_nonempty=False), [[False, True, True], [True, False, False]]
    )
    np.testing.assert_array_equal(
        apply_thresholds(probs, [0.1, 0.7, 0.5], ensure_nonempty=False), [[True, False, True], [True, False, False]]
    )
    with pytest.raises(ValueError):
        apply_thresholds(probs, [0.5, 0.5])


def test_ensure_nonempty_picks_largest_ratio():
    # Row 0: raw argmax is class 0 (0.6) but relative to its threshold class 2 is closer (0.3/0.35).
    probs = np.array([[0.6, 0.1, 0.3], [0.05, 0.04, 0.01], [0.95, 0.1, 0.2]])
    thr = np.array([0.9, 0.5, 0.35])
    pred = apply_thresholds(probs, thr, ensure_nonempty=True)
    np.testing.assert_array_equal(pred[0], [False, False, True])
    # Row 1: raw argmax is class 0 too, but 0.04/0.5 = 0.08 beats 0.05/0.9 = 0.056.
    np.testing.assert_array_equal(pred[1], [False, True, False])
    assert pred.sum(axis=1).min() >= 1
    # Non-empty rows are untouched.
    np.testing.assert_array_equal(pred[2], [True, False, False])


def test_ensure_nonempty_ratio_bruteforce():
    rng = np.random.default_rng(0)
    probs = rng.random((500, 18)) * 0.5
    thr = rng.uniform(0.3, 0.9, size=18)
    raw = probs >= thr
    pred = apply_thresholds(probs, thr, ensure_nonempty=True)
    assert pred.any(axis=1).all()
    for i in range(len(probs)):
        if raw[i].any():
            np.testing.assert_array_equal(pred[i], raw[i])
        else:
            assert pred[i].sum() == 1
            assert pred[i].argmax() == np.argmax(probs[i] / thr)
    off = apply_thresholds(probs, thr, ensure_nonempty=False)
    np.testing.assert_array_equal(off, raw)


# ---------------------------------------------------------------- tune_global


@pytest.mark.parametrize("ensure_nonempty", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_tune_global_matches_bruteforce(seed, ensure_nonempty):
    y, probs = _synthetic(seed)
    t, s = tune_global(y, probs, ensure_nonempty=ensure_nonempty)
    brute = np.array([mean_f1(y, apply_thresholds(probs, g, ensure_nonempty)) for g in DEFAULT_GRID])
    assert s == pytest.approx(brute.max(), abs=TOL)
    assert t in DEFAULT_GRID
    assert brute[np.flatnonzero(t == DEFAULT_GRID)[0]] == pytest.approx(brute.max(), abs=TOL)


def test_tune_global_custom_grid():
    y, probs = _synthetic(4)
    grid = [0.2, 0.3, 0.4]
    t, s = tune_global(y, probs, grid=grid)
    brute = [_score(y, probs, g, True) for g in grid]
    assert t == grid[int(np.argmax(brute))]
    assert s == pytest.approx(max(brute), abs=TOL)


# ---------------------------------------------------------------- tune_per_class


@pytest.mark.parametrize("ensure_nonempty", [True, False])
@pytest.mark.parametrize("seed", range(3))
def test_tune_per_class_beats_global_and_is_locally_optimal(seed, ensure_nonempty):
    y, probs = _synthetic(seed)
    _, s_glob = tune_global(y, probs, ensure_nonempty=ensure_nonempty)
    thr, s = tune_per_class(y, probs, ensure_nonempty=ensure_nonempty, passes=50)
    assert thr.shape == (y.shape[1],)
    assert s == pytest.approx(_score(y, probs, thr, ensure_nonempty), abs=TOL)
    assert s >= s_glob - TOL
    # Coordinate-wise optimality, checked by brute force through the public path.
    for j in range(y.shape[1]):
        for g in DEFAULT_GRID:
            trial = thr.copy()
            trial[j] = g
            assert _score(y, probs, trial, ensure_nonempty) <= s + TOL, (j, g)


def test_tune_per_class_improves_on_heterogeneous_classes():
    y, probs = _synthetic(7, n=600)
    _, s_glob = tune_global(y, probs)
    _, s = tune_per_class(y, probs)
    assert s > s_glob


def test_tune_per_class_fallback_uses_ratio_rule():
    # Rows where nothing passes make the fallback decisive; the incremental
    # bookkeeping must agree with apply_thresholds on them.
    rng = np.random.default_rng(3)
    n, c = 400, 6
    y = np.zeros((n, c), dtype=int)
    y[np.arange(n), rng.integers(0, c, size=n)] = 1
    probs = np.clip(0.3 * y + rng.random((n, c)) * 0.4, 0, 1)
    thr, s = tune_per_class(y, probs, ensure_nonempty=True, passes=50)
    assert s == pytest.approx(_score(y, probs, thr, True), abs=TOL)
    for j in range(c):
        for g in DEFAULT_GRID:
            trial = thr.copy()
            trial[j] = g
            assert _score(y, probs, trial, True) <= s + TOL


# ---------------------------------------------------------------- tune_balanced


@pytest.mark.parametrize("seed", range(3))
def test_tune_balanced_minimises_fp_fn_gap(seed):
    y, probs = _synthetic(seed)
    y[:, -1] = 0  # a class with no positives
    thr = tune_balanced(y, probs)
    assert thr[-1] == 0.5
    for j in range(y.shape[1] - 1):
        pos = y[:, j] == 1

        def gap(t):
            pred = probs[:, j] >= t
            return abs(int((pred & ~pos).sum()) - int((~pred & pos).sum()))

        gaps = np.array([gap(t) for t in DEFAULT_GRID])
        assert gap(thr[j]) == gaps.min()
        # Tie-break toward 0.5.
        best = DEFAULT_GRID[gaps == gaps.min()]
        assert abs(thr[j] - 0.5) == pytest.approx(np.abs(best - 0.5).min())


def test_tune_balanced_perfectly_separable():
    y = np.array([[1], [1], [0], [0]])
    probs = np.array([[0.9], [0.8], [0.1], [0.2]])
    # Any t in (0.2, 0.8] gives FP == FN == 0; the one closest to 0.5 is 0.5.
    assert tune_balanced(y, probs)[0] == 0.5


# ---------------------------------------------------------------- tune


@pytest.mark.parametrize("method", ["global", "per_class", "balanced"])
def test_tune_dispatch(method):
    y, probs = _synthetic(1)
    out = tune(method, y, probs)
    assert set(out) == {"method", "thresholds", "val_mean_f1"}
    assert out["method"] == method
    assert len(out["thresholds"]) == y.shape[1]
    assert all(isinstance(t, float) for t in out["thresholds"])
    assert out["val_mean_f1"] == pytest.approx(_score(y, probs, np.array(out["thresholds"]), True), abs=TOL)
    if method == "global":
        assert len(set(out["thresholds"])) == 1


def test_tune_unknown_method():
    y, probs = _synthetic(1)
    with pytest.raises(ValueError, match="per_class"):
        tune("nope", y, probs)
