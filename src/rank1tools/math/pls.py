"""One-component PLS regression of a metric on per-checkpoint vectors, with a fast leave-one-out R².

Matches sklearn's PLSRegression(n_components=1, scale=True) (centering, ddof=1 scaling, weight
normalisation, _svd_flip_1d sign), except that exactly constant columns (and an exactly constant
y) are zeroed instead of keeping sklearn's rounding residue of the mean, which its tiny std would
blow up to O(1) noise. Pure functions; float64 numpy in, numpy/float out.
"""

from __future__ import annotations

import math

import numpy as np

EPS = np.finfo(np.float64).eps
# fit-pls warns (and the report flags) where mean in-sample R² exceeds mean leave-one-out R² by this much
OVERFIT_GAP = 0.5


def _f64(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _check(X, y) -> tuple[np.ndarray, np.ndarray]:
    X, y = _f64(X), _f64(y).reshape(-1)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"X must be (T, d) and y (T,); got {X.shape} and {y.shape}")
    if X.shape[0] < 3:  # each LOO fold needs 2 rows for a ddof=1 std
        raise ValueError("need at least 3 checkpoints")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X and y must be finite")
    return X, y


def _standardize(v: np.ndarray, axis: int = 0):
    """(centered/scaled, mean, scale) as sklearn's _center_scale_xy; exact constants -> zeros, scale 1."""
    mean = v.mean(axis=axis)
    c = v - mean
    const = np.ptp(v, axis=axis) == 0
    std = np.where(const, 1.0, c.std(axis=axis, ddof=1))
    if np.ndim(const):
        c[:, const] = 0.0
    elif const:
        c[...] = 0.0
    return c / std, mean, std


def r2_score(y, y_hat) -> float:
    """1 - SS_res/SS_tot; NaN when y is constant."""
    y, y_hat = _f64(y).reshape(-1), _f64(y_hat).reshape(-1)
    if y.size == 0 or np.ptp(y) == 0:
        return float("nan")
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 - float(((y - y_hat) ** 2).sum()) / ss_tot


class PLS1:
    """PLSRegression(n_components=1, scale=True) for a single target, sklearn-equal attributes."""

    def fit(self, X, y) -> PLS1:
        X, y = _check(X, y)
        Z, self.x_mean_, self.x_scale_ = _standardize(X)
        yk, self.y_mean_, self.y_scale_ = _standardize(y)
        self.y_mean_, self.y_scale_ = float(self.y_mean_), float(self.y_scale_)
        yy = float(yk @ yk)
        c = Z.T @ yk
        # sklearn's power step: (Z'y / y'y) / (norm + eps) == Z'y / (|Z'y| + eps*y'y)
        w = c / (np.sqrt(c @ c) + EPS * yy) if yy > 0 else np.zeros_like(c)
        if w.size:
            w *= np.sign(w[np.argmax(np.abs(w))])  # sklearn's _svd_flip_1d
        t = Z @ w
        tt = float(t @ t)
        self.x_weights_, self.x_scores_ = w, t
        self.x_loadings_ = Z.T @ t / tt if tt > 0 else np.zeros_like(w)
        self.y_loading_ = float(yk @ t / tt) if tt > 0 else 0.0
        # scores have mean 0, so the LS line of y on them is y_mean + (q * y_std) * t
        b = float((y - y.mean()) @ (t - t.mean()) / ((t - t.mean()) @ (t - t.mean()))) if tt > 0 else 0.0
        self.score_line_ = (float(y.mean() - b * t.mean()), b)
        self.r2_ = r2_score(y, self.predict(X))
        return self

    def predict(self, X) -> np.ndarray:
        X = _f64(X)
        if X.ndim == 1:
            X = X[None, :] if X.size == self.x_weights_.size else X[:, None]
        t = ((X - self.x_mean_) / self.x_scale_) @ self.x_weights_
        return t * self.y_loading_ * self.y_scale_ + self.y_mean_


def loo_predictions(X, y) -> np.ndarray:
    """Held-out predictions of PLS1 refit on each T-1 fold, all folds at once in O(T^2 d).

    Fold f drops row f. Every fold statistic is a downdate of full-data ones, so no fold copy of X
    is made: the (T, d) arrays below hold row f = fold f's per-column quantity.
    """
    X, y = _check(X, y)
    T = X.shape[0]
    n = T - 1
    mu = X.mean(axis=0)
    Xc = X - mu  # centering first keeps the variance downdate well conditioned
    Q = (Xc * Xc).sum(axis=0)
    delta = -Xc / n  # fold mean minus full mean
    ss = Q - Xc * Xc * (T / n)  # fold sum of squared deviations
    # columns constant within a fold (exactly): at most one row differs from all the others
    lo, hi = X.min(axis=0), X.max(axis=0)
    at_lo, at_hi = X == lo, X == hi
    const = (lo == hi) | (at_hi & (at_lo.sum(axis=0) == n)) | (at_lo & (at_hi.sum(axis=0) == n))
    # downdate lost most digits (row f dominates the column): recompute those exactly, two-pass
    bad = ~const & (ss <= 1e-8 * Q)
    if bad.any():
        ff, jj = np.nonzero(bad)
        A = Xc[:, jj].copy()
        A[ff, np.arange(jj.size)] = np.nan
        ss[ff, jj] = np.nanvar(A, axis=0, ddof=1) * (n - 1)
    S = np.where(const, 1.0, np.sqrt(np.maximum(ss, 0.0) / (n - 1)))

    # y per fold is only T x T: standardize directly, row f = fold f's y (0 at the held-out slot)
    keep = ~np.eye(T, dtype=bool)
    Yf = np.where(keep, y[None, :], np.nan)
    ym = np.nanmean(Yf, axis=1)
    Yk = np.where(keep, Yf - ym[:, None], 0.0)
    ys = np.nanstd(Yf, axis=1, ddof=1)
    yconst = np.nanmax(Yf, axis=1) == np.nanmin(Yf, axis=1)
    ys[yconst] = 1.0
    Yk[yconst] = 0.0
    Yk /= ys[:, None]
    yy = (Yk * Yk).sum(axis=1)

    # fold f's Z'y: sum_{i!=f} (Xc_i - delta_f) y_i / S_f ; one GEMM, the delta term uses sum(y_f) ~ 0
    C = (Yk @ Xc - Yk.sum(axis=1)[:, None] * delta) / S
    C[const] = 0.0
    norm = np.sqrt((C * C).sum(axis=1)) + EPS * yy
    V = C / np.where(norm > 0, norm, 1.0)[:, None] / S  # w_f / S_f: scores = (Xc_i - delta_f) . V_f
    off = (delta * V).sum(axis=1)
    M = Xc @ V.T - off[None, :]  # M[i, f] = score of row i under fold f (i == f: the held-out one)
    Mf = np.where(keep.T, M, 0.0)
    tt = (Mf * Mf).sum(axis=0)
    ty = (Mf * Yk.T).sum(axis=0)
    q = np.where(tt > 0, ty / np.where(tt > 0, tt, 1.0), 0.0)
    # sign of w does not matter here: flipping w flips both the score and q
    return np.diag(M) * q * ys + ym


def loo_r2(X, y) -> float:
    """Leave-one-out R²: each checkpoint predicted by PLS1 refit on the other T-1."""
    return r2_score(y, loo_predictions(X, y))


# Targets whose largest |value| lies outside [2^-SAFE_EXP, 2^SAFE_EXP] are fitted scaled by a power of two:
# their squares and sums of squares would overflow (a metric of 1e308) or underflow (1e-300) float64.
SAFE_EXP = 500


def target_scale_exponent(y) -> int:
    """e such that y · 2^-e has its largest |value| in [0.5, 1), when y leaves the safe range; else 0.
    Scaling by a power of two is exact, so R², scores and the X side of the fit are unchanged."""
    top = float(np.max(np.abs(_f64(y)))) if np.size(y) else 0.0
    if top == 0.0 or not np.isfinite(top) or 2.0**-SAFE_EXP <= top <= 2.0**SAFE_EXP:
        return 0
    return int(np.frexp(top)[1])


def _unscale(v: float, e: int) -> float:
    try:
        return math.ldexp(v, e)
    except OverflowError:
        return math.copysign(math.inf, v)


def fit_module(X, y, *, loo: bool = True) -> dict:
    """Everything for one module: in-sample and (unless loo=False) LOO R², the score line, the fitted PLS1.

    A target near the ends of float64 is fitted scaled by 2^-e (target_scale_exponent) and the
    results in the target's units (y_mean_, y_scale_, the score line) are scaled back; the R²s
    are scale-free."""
    e = target_scale_exponent(y)
    ys = np.ldexp(_f64(y), -e) if e else y
    model = PLS1().fit(X, ys)
    r2_loo = loo_r2(X, ys) if loo else None
    if e:
        model.y_mean_, model.y_scale_ = _unscale(model.y_mean_, e), _unscale(model.y_scale_, e)
        model.score_line_ = tuple(_unscale(v, e) for v in model.score_line_)
    return {"r2": model.r2_, "loo_r2": r2_loo, "score_line": model.score_line_, "model": model}


def fit_step(X, steps, *, loo: bool = True) -> dict:
    """fit_module with y = the checkpoint steps."""
    return fit_module(X, steps, loo=loo)
