"""Top-k SVD of an update matrix: randomized subspace iteration with an a-posteriori accuracy check.

Randomized (oversampling >= 10, fixed seed) by default, exact on request
(docs/concepts.md#the-top-k-svd-and-its-accuracy-certificate). The randomized result must reach
|sigma_1 error| / sigma_1 <= 1e-4 and |cos(u_1, u_1 exact)| >= 0.9999. That is checked on every
matrix without an exact SVD. Each Rayleigh-Ritz step makes one of the two singular-triplet relations
exact: from a left basis Q, B = Q^T M = Ub S Vh gives u = Q Ub and
v = Vh^T with M^T u_1 = sigma_1 v_1 exactly, so the only residual is rho = ||M v_1 - sigma_1 u_1||;
from a right basis X (orthonormal), M X = Uy S Wh gives u = Uy, v = X Wh^T with
M v_1 = sigma_1 u_1 exactly and rho = ||M^T u_1 - sigma_1 v_1||. Wedin-type bounds give
sin angle(u_1, u_1 true), sin angle(v_1, v_1 true) <= rho / gap and
|sigma_1 - true| <= min(rho, rho^2 / gap), with gap ~ sigma_1 - sigma_2 of the Ritz values; both
bounds must hold with a SAFETY margin. When they miss the bar the iteration goes on, up to
max_niter power iterations, then the exact SVD is used ("exact-fallback").

Two schedules (docs/concepts.md, "Top-k SVD"):
- cold (the default of `topk_svd`): a Gaussian sketch, `niter` power iterations, the check after
  the projection B = Q^T M; on a miss the count is doubled (niter, 2 niter, ... up to max_niter).
- adaptive, optionally warm-started: the sketch starts with given directions (a run's previous
  checkpoint's singular vectors of the same module) plus Gaussian columns, and the check runs
  after every product with M or M^T, stopping at the first pass of the top triplet's certificate
  and of the values 2..k (`lower_values_bound` within `tail_tol` sigma_1, with the margin of
  `tail_margin`; values no certificate reaches, such as a noise bulk, are accepted after the cold
  schedule's 2 + 2 niter steps instead). tail_tol = SIGMA_REL_TOL is the schedule before issue #25,
  bit for bit; decompose's default is TAIL_REL_TOL (docs/concepts.md#certified-bounds-of-the-spectrum).

At k = 1 with a warm start and a tail tolerance looser than sigma_1's (decompose's default), a power
iteration certified with a gap from ||M||_F comes first (math/power_top.py: two matrix-vector
products per step instead of a 16-column block); where it does not pass (power_top.power_top1), the
adaptive block path above runs as it would have.

Every result records per value the bound it was certified to (`TopK.bounds`, absolute):
`value_bounds` for randomized results (from the residuals of the step returned; values 2..k of a
step that followed a plain one get their residuals from one extra product, `direct_value_bounds`),
ROUNDING_REL sigma_1 for exact ones.

The random test matrix comes from a generator seeded per call (not the global RNG) and is drawn
on the CPU, so results do not depend on processing order, resumption, or device RNG state.

Range: float32 overflows above 3.4e38, and products such as M @ omega (entries up to
||M||_F * ||omega_j||, omega_j of length n) overflow long before the entries of M do (a matrix
of 3e38 entries breaks the sketch). When ||M||_F (float64) lies outside [SAFE_FRO_MIN,
SAFE_FRO_MAX], the SVD runs on M / s with s a power of two near ||M||_F (exact scaling: U and V
are those of M, S is multiplied back by s). Inside that range every float32 product and squared
norm the routines form stays within about (1e12 * 1e3)^2 = 1e30 < 3.4e38 (and far from the
underflow at 1.2e-38), and RL updates (||dW||_F ~ 1e-6 .. 1e3) are never rescaled, so their
results are unchanged bit for bit. S of a matrix whose singular values exceed float32 come back
as inf: callers check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from .power_top import power_top1
from .spectrum import frobenius
from .svd_certificates import (  # noqa: F401 (the tolerances and lower_values_bound: importable from here)
    ROUNDING_REL,
    SAFETY,
    SIGMA_REL_TOL,
    SIN_TOL,
    TAIL_REL_TOL,
    TAIL_SAFETY,
    direct_value_bounds,
    lower_value_bounds,
    lower_values_bound,
    tail_margin,
    thin_times,
    top_certificate,
    value_bounds,
)

MIN_SKETCH = 16
MIN_RANDOM = 4  # a warm-started sketch keeps at least this many Gaussian columns
SAFE_FRO_MIN = 1e-12  # outside [SAFE_FRO_MIN, SAFE_FRO_MAX] the matrix is rescaled (module doc)
SAFE_FRO_MAX = 1e12


@dataclass
class TopK:
    """Top-k singular triplets: M ~ U diag(S) V^T with U (m, k), S (k,), V (n, k).

    `method` is "exact", "randomized", "power" (k = 1 from a warm start, math/power_top.py; its
    iterations count both of its products per step), or "exact-fallback" (randomized missed the
    accuracy bar).
    `bounds`: per value the certified bound |S_i - sigma_i| <= bounds[i] (module doc).
    `residual` is rho / sigma_1 for randomized results (0 for exact). `iterations`: the subspace
    iteration's steps, i.e. products of M or M^T with the thin sketch, before the result was
    accepted or, for "exact-fallback", given up (0 for "exact"). The cold default (4 power
    iterations) takes 10: the sketch M omega, 2 per power iteration, and B = Q^T M.
    """

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    method: str
    residual: float = 0.0
    iterations: int = 0
    bounds: list[float] | None = None  # per value: |S_i - true sigma_i| <= bounds[i]; None: not asked for


def exact_topk(M: torch.Tensor, k: int) -> TopK:
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    out = TopK(U[:, :k].contiguous(), S[:k].contiguous(), Vh[:k].T.contiguous(), "exact")
    out.bounds = [ROUNDING_REL * float(S[0])] * k if k else []
    return out


def sketch_width(k: int, oversample: int, m: int, n: int) -> int:
    # at least MIN_SKETCH columns: more oversampling only adds accuracy, and MKL's thin matmul
    # (M^T Q) is about 12x slower below 12 columns (54 ms vs 4.4 ms on a 3456 x 1152 matrix)
    return min(max(k + oversample, MIN_SKETCH), m, n)


@lru_cache(maxsize=64)
def _gaussian(n: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cols, generator=g, dtype=torch.float32)


def start_sketch(
    n: int, ell: int, seed: int, start: torch.Tensor | None = None, like: torch.Tensor | None = None
) -> torch.Tensor:
    """The n x ell test matrix: Gaussian (cold), or a warm start [start | Gaussian columns] whose
    first columns are given directions (e.g. the previous checkpoint's singular vectors) and
    at least MIN_RANDOM columns Gaussian, so a direction absent from `start` is still caught.
    The Gaussian columns come from a CPU generator seeded with `seed` (never the global RNG). A new
    tensor on the device and of the dtype of `like` (default: CPU float32)."""
    device, dtype = (like.device, like.dtype) if like is not None else (torch.device("cpu"), torch.float32)
    if start is None:
        return _gaussian(n, ell, seed).to(device=device, dtype=dtype, copy=True)
    keep = min(start.shape[1], ell - MIN_RANDOM)
    return torch.cat(
        [start[:, :keep].to(device=device, dtype=dtype), _gaussian(n, ell - keep, seed).to(device=device, dtype=dtype)],
        dim=1,
    )


def _ritz(
    M: torch.Tensor, X: torch.Tensor, transpose: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-sided Rayleigh-Ritz step (module doc): Y, P (the next step's basis), S (descending), Wh.

    transpose=False ("right step"): X (n x ell) orthonormal; Y = M X = P S Wh gives U = P and
    V = X Wh^T with M V = U diag(S) exactly.
    transpose=True ("left step"): X (m x ell) orthonormal; Y = M^T X = P S Wh gives V = P and
    U = X Wh^T with M^T U = V diag(S) exactly (the projection B = Q^T M).
    The thin SVD is of a tall matrix (about 6x faster than of the wide B)."""
    Y = thin_times(M, X, transpose)
    P, S, Wh = torch.linalg.svd(Y, full_matrices=False)
    return Y, P, S, Wh


def check_steps(niter: int, max_niter: int, adaptive: bool, warm: bool = False) -> list[int]:
    """The step counts (products with M or M^T) after which the certificate is evaluated.

    Fixed (the cold schedule): after the sketch M omega, `it` power iterations (two steps each)
    and the projection B = Q^T M, i.e. at 2 + 2 it steps, for it = niter, 2 niter, 4 niter, ... up
    to the first >= max_niter. Adaptive: after every step up to 2 + 2 max_niter, from the first
    one for a warm start, from the second for a Gaussian sketch (a Rayleigh-Ritz step on a random
    subspace cannot pass). The last one is where the randomized path gives up (exact fallback)."""
    if adaptive:
        return list(range(1 if warm else 2, 3 + 2 * max_niter))
    pts, it = [], niter
    while True:
        pts.append(2 + 2 * it)
        if it >= max_niter:
            return pts
        it = max(1, 2 * it)


def randomized_topk(
    M: torch.Tensor,
    k: int,
    *,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
    max_niter: int = 16,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    adaptive: bool = False,
    early: bool = True,
    tail_tol: float = SIGMA_REL_TOL,
    bounds: bool = True,
) -> tuple[TopK, bool]:
    """Randomized top-k SVD and whether it passed the a-posteriori check.

    Subspace iteration from the sketch (`start_sketch`), alternating products with M and M^T and
    re-orthonormalising after each (float32 loses the small directions otherwise). At the steps of
    `check_steps` the basis comes from a Rayleigh-Ritz step (`_ritz`, whose Ritz vectors are the
    next basis) and the certificate is evaluated; the first pass returns, else the last result
    comes back with False.

    The cold schedule certifies the top triplet; its values 2..k are those of the fixed schedule.
    The adaptive one also needs values 2..k: certified (`lower_values_bound` within `tail_tol`
    sigma_1, with the margin of `tail_margin`) or, where no certificate can pass (a noise bulk), computed with
    at least the cold schedule's 2 + 2 niter steps, so that they are never less converged than there.
    The top triplet's certificate (a matrix-vector product) is evaluated only where values 2..k
    pass. At sigma_1's tolerance the checks go on only while their bound at least halves per step,
    otherwise the steps up to 2 + 2 niter are plain ones (no Rayleigh-Ritz, cheaper: a bulk never
    reaches that tolerance); under a looser `tail_tol` they go on at every step, since a bulk's
    bound sinks below it after a few more steps (on the 135M benchmark run a module's first
    checkpoint passed after 7-9 steps instead of 10, and a later one that missed after 2 after 3-5). `early=False` (k > 1): no attempt
    before 2 + 2 niter steps (a caller's hint that values 2..k are a noise bulk: the previous
    checkpoint of the same module needed those steps); the result is the same up to rounding.

    `start` = (U, V) of a nearby matrix: the sketch starts on the smaller side (U when m < n, so
    the first product is M^T X), where a perturbation moves the singular vector least (its
    angle grows with the square root of the dimension under dense noise). The result's `bounds`:
    module doc."""
    m, n = M.shape
    ell = sketch_width(k, oversample, m, n)
    left = start is not None and m < n
    X = start_sketch(m if left else n, ell, seed, None if start is None else start[0 if left else 1], like=M)
    pts = check_steps(niter, max_niter, adaptive, warm=start is not None)
    checks, last, full = set(pts), pts[-1], 2 + 2 * niter
    resume = full if adaptive and k > 1 and not early else 0  # no check before step `resume`
    if 1 in checks and resume <= 1:  # Rayleigh-Ritz on span(omega) itself needs an orthonormal basis of it
        X = torch.linalg.qr(X).Q
    step, transpose, prev, bound = 0, left, None, math.inf
    margin = tail_margin(tail_tol)
    while True:
        step += 1
        if step in checks and step >= resume:
            Y, P, S, Wh = _ritz(M, X, transpose)
            other = X @ Wh[:k].T
            rest, lower = True, None  # values 2..k: certified, or given the cold schedule's steps
            if adaptive and k > 1 and prev is not None:  # their bounds at no extra product
                lower = lower_value_bounds(Y, *prev, S)
            if adaptive and k > 1 and step < full:
                s0 = float(S[0])
                last_bound, bound = bound, math.inf if lower is None else (max(lower) / s0 if s0 > 0 else 0.0)
                rest = margin * bound <= tail_tol
                if not rest and not bound <= last_bound / 2 and tail_tol <= SIGMA_REL_TOL:
                    resume = full  # a bulk: no certificate before `full`; plain steps until then
            residual, ok, top = (
                top_certificate(M, X, transpose, P, S, Wh) if rest or step >= last else (math.nan, False, math.inf)
            )
            ok = ok and rest
            if ok or step >= last:
                if lower is None and bounds:
                    lower = direct_value_bounds(M, X, transpose, P, S, Wh, k)
                U, V = (other, P[:, :k]) if transpose else (P[:, :k], other)
                res = TopK(U.contiguous(), S[:k].contiguous(), V.contiguous(), "randomized", residual, step)
                res.bounds = value_bounds(top, lower, float(S[0]), margin) if lower is not None else None
                return res, ok
            X, prev = P, (S, other)
        else:
            X, prev = torch.linalg.qr(thin_times(M, X, transpose)).Q, None
        transpose = not transpose


def range_scale(fro: float) -> float:
    """1.0 when ||M||_F = fro is in the safe range (or 0), else the power of two nearest above it."""
    if fro == 0.0 or SAFE_FRO_MIN <= fro <= SAFE_FRO_MAX:
        return 1.0
    return math.ldexp(1.0, math.frexp(fro)[1])  # 2^e with fro / 2^e in [0.5, 1)


def topk_svd(
    M: torch.Tensor,
    k: int,
    *,
    exact: bool = False,
    oversample: int = 10,
    niter: int = 4,
    seed: int = 0,
    max_niter: int = 16,
    fro: float | None = None,
    start: tuple[torch.Tensor, torch.Tensor] | None = None,
    adaptive: bool = False,
    early: bool = True,
    tail_tol: float = SIGMA_REL_TOL,
    bounds: bool = True,
) -> TopK:
    """Top-k singular triplets of a finite float32 matrix (see module doc for the accuracy contract
    and the range handling). `fro`: ||M||_F if the caller has it (saves a pass).

    Default: `niter` power iterations from a Gaussian sketch, doubled up to `max_niter` while the
    certificate fails, then exact. `start` = (U (m x j), V (n x j)): warm start, the sketch begins
    with the singular vectors of a nearby matrix (`randomized_topk`). `adaptive`: evaluate the certificate after every product with M
    or M^T (`check_steps`) and stop at the first pass (still up to `max_niter` power iterations,
    then exact); `early` and `tail_tol`, the tolerance of values 2..k relative to sigma_1
    (`randomized_topk`). `bounds` of the result: module doc; `bounds=False` (a caller that does not
    record them) spares a randomized result the product they may need, and leaves them None."""
    if M.dim() != 2:
        raise ValueError(f"expected a matrix, got shape {list(M.shape)}")
    m, n = M.shape
    if not 1 <= k <= min(m, n):
        raise ValueError(f"rank {k} outside 1..{min(m, n)} for a {m} x {n} matrix")
    if start is not None and (
        start[0].dim() != 2 or start[0].shape[0] != m or start[1].dim() != 2 or start[1].shape[0] != n
    ):
        raise ValueError(
            f"warm start of shapes {list(start[0].shape)}, {list(start[1].shape)} does not fit a {m} x {n} matrix"
        )
    if fro is None:
        fro = frobenius(M)
    if not math.isfinite(fro):
        raise ValueError("matrix has non-finite values")
    s = range_scale(fro)
    opts = dict(
        exact=exact,
        oversample=oversample,
        niter=niter,
        seed=seed,
        max_niter=max_niter,
        start=start,
        adaptive=adaptive,
        early=early,
        tail_tol=tail_tol,
        bounds=bounds,
    )
    if s == 1.0:
        return _topk_in_range(M, k, fro=fro, **opts)
    e = -math.frexp(s)[1] + 1
    res = _topk_in_range(_times_power_of_two(M, e), k, fro=math.ldexp(fro, e), **opts)
    res.S = (res.S.double() * s).to(res.S.dtype)  # inf where a singular value exceeds float32
    if res.bounds is not None:
        res.bounds = [b * s for b in res.bounds]
    return res


def _times_power_of_two(M: torch.Tensor, e: int) -> torch.Tensor:
    """M * 2^e, exact, in steps a float32 scalar can hold (2^e itself may lie outside float32)."""
    out = M
    while e != 0:
        step = max(-100, min(100, e))
        out = out * math.ldexp(1.0, step)
        e -= step
    return out


def uses_exact(k: int, oversample: int, m: int, n: int) -> bool:
    """Whether `topk_svd` goes straight to the exact SVD: a sketch not much smaller than the
    matrix costs more than the exact SVD."""
    return min(m, n) <= 2 * max(k + oversample, MIN_SKETCH)


def _topk_in_range(M: torch.Tensor, k: int, *, exact: bool, max_niter: int, fro: float, **kw) -> TopK:
    m, n = M.shape
    if exact or uses_exact(k, kw["oversample"], m, n):
        return exact_topk(M, k)
    before = 0  # products of a power path that did not pass
    if k == 1 and kw["start"] is not None and kw["adaptive"] and kw["tail_tol"] > SIGMA_REL_TOL:
        left = m < n  # the start on the smaller side, as randomized_topk's
        p = power_top1(M, kw["start"][0 if left else 1][:, 0], fro, transpose=left)
        if p.passed:
            res = TopK(p.u[:, None], torch.tensor([p.sigma], dtype=M.dtype), p.v[:, None], "power", p.residual, p.steps)
            res.bounds = [p.bound] if kw["bounds"] else None
            return res
        before = p.steps
    res, ok = randomized_topk(M, k, max_niter=max_niter, **kw)
    res.iterations += before
    if ok:
        return res
    out = exact_topk(M, k)
    out.method = "exact-fallback"
    out.iterations = res.iterations
    return out
