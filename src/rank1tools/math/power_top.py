"""The top singular triplet by power iteration from a nearby vector, certified with a gap taken from
the Frobenius norm (docs/concepts.md#the-rank-1-power-path).

At `--rank 1` a warm start already holds the answer to within the drift between two checkpoints; a
block of 16 columns (math/svd.py) then costs a product five times a matrix-vector product's, plus a
QR and a small SVD per step, to learn sigma_2, which only the certificate's gap needs. The gap can
be bounded from ||M||_F instead, which the caller has: with Rayleigh value s <= sigma_1,
sigma_2^2 <= ||M||_F^2 - sigma_1^2 <= ||M||_F^2 - s^2 =: t^2. Where s > t (the update's top
direction holds more than half its energy, as in RL updates) that is a rigorous lower bound s - t
on the distance from s to every singular value but sigma_1, where the block path's gap is an
estimate from Ritz values.

One iteration from a unit x on one side: y = M x (or M^T x), s = ||y||, w = y / s, so the relation
M x = s w holds exactly; z = M^T w (or M w) gives the residual rho = ||z - s x|| of the other one.
For the symmetric [[0, M], [M^T, 0]] and the unit vector (w; x) / sqrt(2) the residual is
rho / sqrt(2) with Rayleigh quotient s: when rho < s - t, sigma_1 is the eigenvalue within rho of s,
|sigma_1 - s| <= rho^2 / (s - t) and the sine of the angle to the top singular pair is <= rho / (s - t)
(Davis-Kahan). The bar is that of math/svd.py, with its SAFETY margin (float32 rounding of the
products); z / ||z|| is the next x. Two products per iteration, both counted as steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .svd_certificates import SAFETY, SIGMA_REL_TOL, SIN_TOL, residual_certificate, value_bounds

MAX_POWER_ITERATIONS = 4  # then the caller's block path (a start this far off is no warm start)


@dataclass
class PowerTop:
    """The outcome of `power_top1`: `passed` and, where it passed, the certified top triplet.

    `u` (m,), `sigma`, `v` (n,); `bound`: the certified |sigma - sigma_1|, SAFETY times the residual
    bound plus float32 rounding (as math/svd.py records); `residual`: rho / sigma; `steps`: the
    products with M or M^T taken, passed or not."""

    passed: bool
    steps: int
    u: torch.Tensor | None = None
    sigma: float = math.nan
    v: torch.Tensor | None = None
    bound: float = math.inf
    residual: float = math.nan


def power_top1(
    M: torch.Tensor,
    x: torch.Tensor,
    fro: float,
    *,
    transpose: bool,
    max_iterations: int = MAX_POWER_ITERATIONS,
    sigma_tol: float = SIGMA_REL_TOL,
    sin_tol: float = SIN_TOL,
) -> PowerTop:
    """M's top singular triplet by power iteration from `x`, certified (module doc).

    `x`: the start, a vector of M's column side (v, length n), or with `transpose` of its row side
    (u, length m). `fro`: ||M||_F (float64-accurate). The bar: SAFETY times the bounds within
    `sigma_tol` (relative) and `sin_tol` (defaults: the block path's). Gives up after
    `max_iterations`, or after the first iteration where the top direction holds at most half of
    ||M||_F^2 (no gap can be certified then: a noise-dominated update, left to the block path)."""
    fro2 = fro * fro
    x = x / float(torch.linalg.vector_norm(x, dtype=torch.float64))
    A, B = (M.T, M) if transpose else (M, M.T)  # y = A x, z = B w
    for it in range(1, max_iterations + 1):
        y = torch.mv(A, x)
        s = float(torch.linalg.vector_norm(y, dtype=torch.float64))
        if not s > 0.0 or not math.isfinite(s):
            return PowerTop(False, 2 * it - 1)
        w = y.div_(s)
        z = torch.mv(B, w)
        rho = float(torch.linalg.vector_norm(z - x * s, dtype=torch.float64))
        gap = s - math.sqrt(max(fro2 - s * s, 0.0))
        if gap > 0.0:
            ok, top = residual_certificate(rho, s, gap, sigma_tol, sin_tol)
            if ok:
                u, v = (x, w) if transpose else (w, x)
                return PowerTop(True, 2 * it, u, s, v, value_bounds(top, [], s, SAFETY)[0], rho / s)
        else:  # from a warm start s is near sigma_1 already: another step would not open a gap
            return PowerTop(False, 2 * it)
        norm = float(torch.linalg.vector_norm(z, dtype=torch.float64))
        if not norm > 0.0:
            return PowerTop(False, 2 * it)
        x = z.div_(norm)
    return PowerTop(False, 2 * max_iterations)
