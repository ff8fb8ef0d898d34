"""rank1tools.math.pls: one-component PLS equal to sklearn's PLSRegression, and its fast leave-one-out R²."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.cross_decomposition import PLSRegression

from rank1tools.math.pls import (
    PLS1,
    fit_module,
    fit_step,
    loo_predictions,
    loo_r2,
    r2_score,
)

TOL = 1e-9


def _sk(X, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns when a fold's y is constant
        return PLSRegression(n_components=1, scale=True).fit(X, y)


def _naive_loo(X, y):
    T = len(y)
    pred = np.empty(T)
    for t in range(T):
        keep = np.arange(T) != t
        pred[t] = _sk(X[keep], y[keep]).predict(X[t : t + 1]).ravel()[0]
    return pred


def _planted(T=8, d=50, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=T)
    X = np.outer(y, rng.normal(size=d)) + 0.3 * rng.normal(size=(T, d))
    return X, y


@pytest.mark.parametrize("case", ["random", "planted"])
def test_fit_matches_sklearn(case):
    if case == "random":
        rng = np.random.default_rng(0)
        X, y = rng.normal(size=(8, 50)), rng.normal(size=8)
    else:
        X, y = _planted()
    sk, m = _sk(X, y), PLS1().fit(X, y)
    np.testing.assert_allclose(m.x_weights_, sk.x_weights_[:, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(m.x_scores_, sk.x_scores_[:, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(m.x_loadings_, sk.x_loadings_[:, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(m.y_loading_, sk.y_loadings_[0, 0], atol=TOL, rtol=0)
    np.testing.assert_allclose(m.x_mean_, sk._x_mean, atol=TOL, rtol=0)
    np.testing.assert_allclose(m.x_scale_, sk._x_std, atol=TOL, rtol=0)
    Xn = np.random.default_rng(5).normal(size=(4, X.shape[1]))
    np.testing.assert_allclose(m.predict(X), sk.predict(X).ravel(), atol=TOL, rtol=0)
    np.testing.assert_allclose(m.predict(Xn), sk.predict(Xn).ravel(), atol=TOL, rtol=0)
    assert abs(m.r2_ - sk.score(X, y)) < TOL
    if case == "planted":
        assert m.r2_ > 0.9


def test_torch_input_equals_numpy():
    X, y = _planted()
    a, b = PLS1().fit(torch.tensor(X, dtype=torch.float64), torch.tensor(y)), PLS1().fit(X, y)
    np.testing.assert_array_equal(a.x_weights_, b.x_weights_)
    assert loo_r2(torch.tensor(X), torch.tensor(y)) == loo_r2(X, y)


@pytest.mark.parametrize("T,d", [(3, 1), (3, 7), (4, 1), (8, 50), (12, 300), (30, 40)])
def test_loo_matches_sklearn_refits(T, d):
    rng = np.random.default_rng(T * 1000 + d)
    X, y = rng.normal(size=(T, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=d), rng.normal(size=T)
    naive = _naive_loo(X, y)
    np.testing.assert_allclose(loo_predictions(X, y), naive, atol=TOL, rtol=0)
    assert abs(loo_r2(X, y) - r2_score(y, naive)) < TOL


def test_loo_constant_columns_and_fold_constant_y():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(7, 12)), rng.normal(size=7)
    X[:, 2] = 2.5  # constant everywhere
    X[:, 3] = 0.0
    X[:, 4] = 1.0
    X[0, 4] = 3.0  # constant in fold 0 only
    X[:, 5] = [1, 1, 1, 1, 1, 2, 2]  # two distinct values: never fold-constant
    np.testing.assert_allclose(loo_predictions(X, y), _naive_loo(X, y), atol=TOL, rtol=0)
    y2 = np.array([1, 1, 1, 1, 1, 1, 4.0])  # y constant in fold 6: that fold predicts its mean
    p = loo_predictions(X, y2)
    np.testing.assert_allclose(p, _naive_loo(X, y2), atol=TOL, rtol=0)
    assert p[6] == 1.0
    m, sk = PLS1().fit(X, y), _sk(X, y)
    np.testing.assert_allclose(m.x_weights_, sk.x_weights_[:, 0], atol=TOL, rtol=0)
    assert m.x_weights_[2] == m.x_weights_[3] == 0.0


def test_planted_exact_line():
    rng = np.random.default_rng(7)
    y = rng.normal(size=9)
    X = rng.normal(size=40) + np.outer(y, rng.normal(size=40))  # x_t = a + y_t * b
    m = PLS1().fit(X, y)
    assert abs(m.r2_ - 1.0) < TOL
    assert abs(loo_r2(X, y) - 1.0) < TOL
    a, b = m.score_line_
    np.testing.assert_allclose(a + b * m.x_scores_, y, atol=TOL, rtol=0)
    out = fit_module(X, y)
    assert abs(out["r2"] - 1.0) < TOL and abs(out["loo_r2"] - 1.0) < TOL
    assert out["score_line"] == m.score_line_ and isinstance(out["model"], PLS1)


def test_score_line_is_least_squares():
    X, y = _planted(T=10, d=30, seed=4)
    m = PLS1().fit(X, y)
    b, a = np.polyfit(m.x_scores_, y, 1)
    np.testing.assert_allclose(m.score_line_, (a, b), atol=TOL, rtol=0)
    np.testing.assert_allclose(a + b * m.x_scores_, m.predict(X), atol=TOL, rtol=0)


def test_noise_overfits_in_sample_but_not_loo():
    rng = np.random.default_rng(11)
    X, y = rng.normal(size=(10, 5000)), rng.normal(size=10)
    out = fit_module(X, y)
    assert out["r2"] > 0.9
    assert out["loo_r2"] <= 0.0


def test_fit_step_is_fit_module_on_steps():
    X, _ = _planted(T=6, d=20)
    steps = np.array([100, 200, 400, 800, 1600, 3200])
    a, b = fit_step(X, steps), fit_module(X, steps.astype(float))
    assert a["r2"] == b["r2"] and a["loo_r2"] == b["loo_r2"] and a["score_line"] == b["score_line"]


def test_constant_y_gives_nan_r2():
    X = np.random.default_rng(2).normal(size=(5, 8))
    out = fit_module(X, np.full(5, 3.0))
    assert np.isnan(out["r2"]) and np.isnan(out["loo_r2"])
    assert not out["model"].x_weights_.any()
    np.testing.assert_array_equal(out["model"].predict(X), np.full(5, 3.0))
    assert np.isnan(r2_score([1.0, 1.0], [1.0, 2.0]))
    assert r2_score([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0


def test_all_constant_x():
    X, y = np.tile(np.arange(4.0), (6, 1)), np.arange(6.0)
    with np.errstate(all="raise"):
        out = fit_module(X, y)
        p = loo_predictions(X, y)
    m = out["model"]
    assert not m.x_weights_.any() and not m.x_scores_.any() and not m.x_loadings_.any()
    np.testing.assert_array_equal(m.predict(X), np.full(6, y.mean()))
    assert out["r2"] == 0.0 and out["loo_r2"] < 0.0
    np.testing.assert_allclose(p, [(y.sum() - v) / 5 for v in y], atol=TOL, rtol=0)


def test_fewer_than_3_checkpoints_raise():
    with pytest.raises(ValueError, match="need at least 3 checkpoints"):
        PLS1().fit(np.ones((2, 4)), [1.0, 2.0])
    with pytest.raises(ValueError, match="need at least 3 checkpoints"):
        loo_r2(np.ones((2, 4)), [1.0, 2.0])
    with pytest.raises(ValueError, match="need at least 3 checkpoints"):
        fit_step(np.ones((1, 4)), [1])
