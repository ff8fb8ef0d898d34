"""The accuracy certificates of the top-k SVD (math/svd.py) and the bounds each result records
(docs/concepts.md#the-top-k-svd-and-its-accuracy-certificate,
docs/concepts.md#certified-bounds-of-the-spectrum): the tolerances, the residual bounds of the top
triplet and of values 2..k, and the margins they must be met with."""

from __future__ import annotations

import math

import torch

SIGMA_REL_TOL = 1e-4
SIN_TOL = (1 - 0.9999**2) ** 0.5  # |cos| >= 0.9999
SAFETY = 4.0  # bounds use the estimated gap; demand this much margin
TAIL_REL_TOL = 1e-2  # decompose's default tolerance of sigma_2..k, relative to sigma_1
# float32 rounding of a computed singular value, relative to sigma_1 (about 32 eps): float32 SVDs of
# 200 x 80 .. 4096 x 1024 matrices were measured off by at most 1.4e-6 sigma_1
ROUNDING_REL = 4e-6
TAIL_SAFETY = 2.0  # the margin of values 2..k under a tail tolerance looser than sigma_1's (`tail_margin`)


def thin_times(M: torch.Tensor, X: torch.Tensor, transpose: bool) -> torch.Tensor:
    """M X (or M^T X) for a thin X, formed as (X^T M^T)^T (or (X^T M)^T): MKL's float32 matmul with
    the thin factor on the right is 1.5-4x slower, and erratic below 16 columns."""
    return torch.mm(X.T.contiguous(), M if transpose else M.T).T


def top_certificate(
    M: torch.Tensor, X: torch.Tensor, transpose: bool, P: torch.Tensor, S: torch.Tensor, Wh: torch.Tensor
) -> tuple[float, bool, float]:
    """rho / s_1 of the top Ritz triplet of svd._ritz, whether the bar is met (math/svd.py) and the
    bound min(rho, rho^2 / gap) on |s_1 - sigma_1|: rho is the residual of the relation that is not
    exact, ||M^T u_1 - s_1 v_1|| for a right step, ||M v_1 - s_1 u_1|| for a left one (one
    matrix-vector product)."""
    s = S[:2].tolist()
    if s[0] == 0.0:
        return 0.0, True, 0.0
    w = torch.mv(M if transpose else M.T, P[:, 0])
    rho = float(torch.linalg.vector_norm(w.sub_(torch.mv(X, Wh[0]), alpha=s[0]), dtype=torch.float64))
    gap = max(s[0] - s[1] if len(s) > 1 else s[0], 1e-30)
    ok, bound = residual_certificate(rho, s[0], gap)
    return rho / s[0], ok, bound


def residual_certificate(
    rho: float, s: float, gap: float, sigma_tol: float = SIGMA_REL_TOL, sin_tol: float = SIN_TOL
) -> tuple[bool, float]:
    """The bar of a top pair of value s > 0 whose residual is rho and whose distance to the rest of
    the spectrum is at least gap (math/svd.py; math/power_top.py): SAFETY times the angle's bound
    rho / gap within sin_tol and SAFETY times the value's bound min(rho, rho^2 / gap) within
    sigma_tol s. Returns whether it is met and the value's bound (absolute)."""
    sigma_bound = min(rho, rho * rho / gap) / s
    return SAFETY * (rho / gap) <= sin_tol and SAFETY * sigma_bound <= sigma_tol, sigma_bound * s


def lower_values_bound(Y: torch.Tensor, prev_S: torch.Tensor, prev_other: torch.Tensor, S: torch.Tensor) -> float:
    """Certificate of the singular values below the top one (the adaptive schedule of math/svd.py): the
    largest bound on |sigma_i - true sigma_i| / sigma_1, i = 2..k, of the Ritz values S of the
    current step, or 0.0 for k = 1 (the largest of `lower_value_bounds` over s_1)."""
    s0 = float(S[0])
    return max(lower_value_bounds(Y, prev_S, prev_other, S), default=0.0) / s0 if s0 > 0 else 0.0


def lower_value_bounds(Y: torch.Tensor, prev_S: torch.Tensor, prev_other: torch.Tensor, S: torch.Tensor) -> list[float]:
    """The bounds on |sigma_i - true sigma_i| (absolute), i = 2..k, of the Ritz values S of the
    current step (empty for k = 1).

    The previous Rayleigh-Ritz step left Ritz values prev_S and, on one side, vectors prev_other
    (k columns) whose relation M x_i = s_i y_i (or M^T) is exact; Y, this step's product of M with
    that step's other-side Ritz vectors, gives the residuals rho_i = ||Y_i - s_i prev_other_i||
    of all k pairs at no extra product. Each previous value is within min(rho_i, rho_i^2 / gap_i)
    of its true value (gap_i: distance to the neighbouring Ritz values); Ritz values never exceed
    the true ones, so the current value, if it fell below the previous one (float32 rounding),
    is off by at most that much more."""
    k = prev_other.shape[1]
    if k == 1:
        return []
    rho = torch.linalg.vector_norm(Y[:, :k] - prev_other * prev_S[:k], dim=0, dtype=torch.float64).tolist()
    p, s = prev_S[: k + 1].tolist(), S[:k].tolist()
    return [_residual_bound(rho[i], p, i) + max(0.0, p[i] - s[i]) for i in range(1, k)]


def _residual_bound(rho: float, values: list[float], i: int) -> float:
    """min(rho, rho^2 / gap) for the i-th of the Ritz values `values` (gap: to its neighbours)."""
    gap = max(
        min(
            values[i - 1] - values[i] if i > 0 else math.inf,
            values[i] - values[i + 1] if i + 1 < len(values) else math.inf,
        ),
        1e-30,
    )
    return min(rho, rho * rho / gap)


def direct_value_bounds(
    M: torch.Tensor, X: torch.Tensor, transpose: bool, P: torch.Tensor, S: torch.Tensor, Wh: torch.Tensor, k: int
) -> list[float]:
    """The bounds of values 2..k of a Rayleigh-Ritz step (svd._ritz) from their own residuals, one
    product with k - 1 columns: where no previous step's Ritz vectors give them at no cost (the
    cold schedule, or after plain steps)."""
    if k == 1:
        return []
    W = thin_times(M, P[:, 1:k], not transpose)  # M^T u_i (right step) or M v_i (left step)
    rho = torch.linalg.vector_norm(W - (X @ Wh[1:k].T) * S[1:k], dim=0, dtype=torch.float64).tolist()
    s = S[: k + 1].tolist()
    return [_residual_bound(rho[i - 1], s, i) for i in range(1, k)]


def tail_margin(tail_tol: float) -> float:
    """The margin the certificate of values 2..k demands over their residual bound: SAFETY, as for
    sigma_1, at or below sigma_1's tolerance (today's schedule, bit for bit); TAIL_SAFETY above it,
    where the values feed only spectrum-shape figures."""
    return SAFETY if tail_tol <= SIGMA_REL_TOL else TAIL_SAFETY


def value_bounds(top: float, lower: list[float], s1: float, margin: float) -> list[float]:
    """What a randomized result records per value (docs/concepts.md#certified-bounds-of-the-spectrum):
    the residual bound times the margin its certificate demands (SAFETY for sigma_1, `margin` for
    the others) plus float32 rounding, ROUNDING_REL sigma_1."""
    return [SAFETY * top + ROUNDING_REL * s1] + [margin * b + ROUNDING_REL * s1 for b in lower]
