"""The tail tolerance of `rank1 decompose` (issue #25): sigma_1, u_1, v_1 certified to 1e-4, sigma_2..k to
--tail-tol (default 1e-2 of sigma_1), and every value's bound recorded
(docs/concepts.md#certified-bounds-of-the-spectrum). Everything is checked against torch.linalg.svd in
float64 of the same float32 matrix; the byte-for-byte check runs the code before #25 itself (git archive)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rank1tools.cli import params
from rank1tools.engine.spectrum_tables import spectrum_rows
from rank1tools.errors import InputError
from rank1tools.io.factor_store import FactorStore
from rank1tools.math.spectrum import figure_bounds, spectrum_figures
from rank1tools.math.svd import ROUNDING_REL, SIGMA_REL_TOL, TAIL_REL_TOL, randomized_topk, topk_svd
from rank1tools.synthetic import LlamaShape, base_tensor, matrix_module_names, write_model

from _support import run_main

REPO = Path(__file__).resolve().parents[1]
BEFORE_25 = "4eb37b680c417f172b4a995fb86acba7af73cf35"  # main before issue #25


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Many small SVDs: one intra-op thread on the shared 2-core machine (results do not depend on it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- planted spectra (float64, independent of rank1tools)


def _orthonormal(g: torch.Generator, d: int, r: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, generator=g, dtype=torch.float64)).Q


SPECTRA = {
    # well separated: each value half the last
    "separated": [1.0, 0.5, 0.25, 0.12, 0.06, 0.03, 0.015, 0.008],
    # clustered: sigma_2..5 and sigma_6..8 within 0.5 % of each other
    "clustered": [1.0, 0.3, 0.299, 0.298, 0.297, 0.1, 0.0999, 0.0998],
    # a noise tail: sigma_1 over a dense Gaussian bulk (sigma_2.. ~ 1-2 % of sigma_1, as in a bf16 run)
    "noise": [1.0],
}
NOISE = {"separated": 1e-6, "clustered": 1e-6, "noise": 3e-4}


def planted_run(kind: str, m: int, n: int, T: int, seed: int) -> list[torch.Tensor]:
    """T drifting float32 matrices with the planted singular values of SPECTRA[kind] (scaled by t / T, the
    top directions rotating slowly) plus dense noise accumulating over the run."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.tensor(SPECTRA[kind], dtype=torch.float64)
    r = sig.numel()
    U, V = _orthonormal(g, m, r + 1), _orthonormal(g, n, r + 1)
    noise = torch.zeros(m, n, dtype=torch.float64)
    out = []
    for j in range(T):
        f = (j + 1) / T
        noise += NOISE[kind] / math.sqrt(T) * torch.randn(m, n, generator=g, dtype=torch.float64)
        a = 0.3 * f
        Ut, Vt = U[:, :r].clone(), V[:, :r].clone()
        Ut[:, 0] = math.cos(a) * U[:, 0] + math.sin(a) * U[:, r]
        Vt[:, 0] = math.cos(a) * V[:, 0] + math.sin(a) * V[:, r]
        out.append(((Ut * (f * sig)) @ Vt.T + noise).float())
    return out


def chain(mats: list[torch.Tensor], k: int, tail_tol: float, warm: bool = True):
    """Each matrix's top-k SVD warm-started from the previous one's, as decompose does."""
    prev, early, out = None, True, []
    for j, M in enumerate(mats):
        r = topk_svd(M, k, seed=j, start=prev if warm else None, adaptive=warm, early=early, tail_tol=tail_tol)
        early = r.iterations < 10 or tail_tol > SIGMA_REL_TOL
        prev = (r.U, r.V)
        out.append(r)
    return out


def _truth(M: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(M.double())


def _check_bounds(M: torch.Tensor, r, where: str) -> None:
    """Every reported value within its recorded bound of the float64 value; the derived figures within theirs."""
    S = _truth(M)
    k = r.S.numel()
    err = (r.S.double() - S[:k]).abs().tolist()
    assert len(r.bounds) == k
    for i, (e, b) in enumerate(zip(err, r.bounds)):
        assert 0 <= b and e <= b, (where, i + 1, e, b)
    fro = float(torch.linalg.vector_norm(M.double()))
    shape = tuple(M.shape)
    got = spectrum_figures(r.S.tolist(), fro, 1.0, shape)
    true = spectrum_figures(S[:k].tolist(), fro, 1.0, shape)
    bounds = figure_bounds(r.S.tolist(), r.bounds, fro, shape)
    for key in ("energy_1", "energy_k", "norm_frac_1", "stable_rank"):
        assert abs(got[key] - true[key]) <= bounds[f"{key}_bound"] * (1 + 1e-9) + 1e-15, (where, key)


@pytest.mark.parametrize("kind", list(SPECTRA))
@pytest.mark.parametrize("m,n", [(240, 96), (96, 240)])
def test_every_value_within_its_recorded_bound(kind, m, n):
    mats = planted_run(kind, m, n, 6, seed=m + len(kind))
    for tail_tol in (TAIL_REL_TOL, SIGMA_REL_TOL):
        for warm in (True, False):
            for j, (M, r) in enumerate(zip(mats, chain(mats, 8, tail_tol, warm))):
                where = f"{kind} {m}x{n} tail {tail_tol} warm {warm} step {j}"
                _check_bounds(M, r, where)
                S = _truth(M)
                assert abs(float(r.S[0]) - float(S[0])) <= SIGMA_REL_TOL * float(S[0]), where
                if r.method == "randomized" and r.iterations < 10:  # certified before the cold schedule's steps
                    assert r.bounds[0] <= (SIGMA_REL_TOL + ROUNDING_REL) * float(r.S[0]), where
                    assert max(r.bounds[1:]) <= (tail_tol + ROUNDING_REL) * float(r.S[0]), where
    # the exact path records float32 rounding, and it holds too
    r = topk_svd(mats[-1], 8, exact=True)
    assert r.method == "exact"
    _check_bounds(mats[-1], r, f"{kind} exact")


def test_noise_tail_certified_early_at_the_loose_tolerance():
    """A noise tail of a few % of sigma_1: at 1e-4 every warm-started matrix takes the cold schedule's 10
    products (the tail is never certified); at the default 1e-2 the later ones stop after a few."""
    mats = planted_run("noise", 300, 120, 8, seed=3)
    tight, loose = chain(mats, 8, SIGMA_REL_TOL), chain(mats, 8, TAIL_REL_TOL)
    assert [r.iterations for r in tight] == [10] * 8
    assert all(r.iterations <= 4 for r in loose[2:]), [r.iterations for r in loose]
    for M, r in zip(mats, loose):
        S = _truth(M)
        assert abs(float(r.S[0]) - float(S[0])) <= SIGMA_REL_TOL * float(S[0])
        assert float((r.S[1:].double() - S[1:8]).abs().max()) <= TAIL_REL_TOL * float(S[0])
        assert max(r.bounds[1:]) <= (TAIL_REL_TOL + ROUNDING_REL) * float(r.S[0])


def test_early_stop_bounds_are_honest():
    """A capped iteration (one power iteration, no fallback): the result misses the bar, and every bound
    recorded is still at least the true error, for the cold schedule and the warm one."""
    g = torch.Generator().manual_seed(7)
    m, n = 260, 150
    U, V = _orthonormal(g, m, 40), _orthonormal(g, n, 40)
    sig = torch.tensor([1.0 / (1 + 0.08 * i) for i in range(40)], dtype=torch.float64)  # slow decay
    M = ((U * sig) @ V.T + 1e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    M2 = (M.double() + 2e-3 * torch.randn(m, n, generator=g, dtype=torch.float64)).float()
    start = topk_svd(M, 8, exact=True)
    missed = 0
    for kw in (
        dict(niter=1, max_niter=1),
        dict(niter=0, max_niter=0),
        dict(niter=1, max_niter=1, adaptive=True, start=(start.U, start.V), tail_tol=1e-2),
        dict(niter=1, max_niter=1, adaptive=True, tail_tol=1e-2),
        dict(niter=2, max_niter=2, adaptive=True, start=(start.U, start.V), tail_tol=1e-4),
    ):
        for k in (1, 4, 8):
            r, ok = randomized_topk(M2, k, **kw)
            missed += not ok
            S = _truth(M2)[:k]
            err = (r.S.double() - S).abs().tolist()
            assert all(e <= b for e, b in zip(err, r.bounds)), (kw, k, err, r.bounds)
    assert missed >= 10  # the cap does stop them before the certificates pass


# ---------------------------------------------------------------- derived figures


def test_figure_bounds_against_the_extremes():
    """The derived bounds of docs/concepts.md#certified-bounds-of-the-spectrum enclose every figure computed
    from values moved anywhere within their bounds (checked at the corners, where the extremes lie)."""
    sig, b, fro = [3.0, 1.0, 0.5, 0.2], [0.01, 0.05, 0.02, 0.1], 4.0
    shape = (300, 100)  # rank-1 % = 1 value
    figs, bounds = spectrum_figures(sig, fro, 1.0, shape), figure_bounds(sig, b, fro, shape)
    rng = np.random.default_rng(0)
    for signs in [np.ones(4), -np.ones(4), *rng.choice([-1.0, 1.0], size=(20, 4))]:
        moved = [s + t * e for s, t, e in zip(sig, signs, b)]
        other = spectrum_figures(moved, fro, 1.0, shape)
        for key in ("energy_1", "energy_k", "energy_rank1pct", "norm_frac_1", "stable_rank"):
            assert abs(other[key] - figs[key]) <= bounds[f"{key}_bound"] * (1 + 1e-12), (key, signs)
    want_k = sum(2 * s * e + e * e for s, e in zip(sig, b)) / fro**2
    assert bounds["energy_k_bound"] == pytest.approx(want_k, rel=1e-12)
    assert bounds["stable_rank_bound"] == pytest.approx(fro**2 / (3.0 - 0.01) ** 2 - fro**2 / 9.0, rel=1e-12)
    assert [bounds[f"sigma_{i}_bound"] for i in range(1, 5)] == b
    assert all(math.isnan(v) for v in figure_bounds(sig, None, fro, shape).values())  # an old store: unknown


def test_cli_constants_are_the_svd_tolerances():
    """cli/params.py writes the tolerances out to stay torch-free; they must be math/svd.py's."""
    assert params.HEAD_REL_TOL == SIGMA_REL_TOL and params.TAIL_REL_TOL == TAIL_REL_TOL


# ---------------------------------------------------------------- the command: bytes, store, CLI

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=1, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def noise_run(tmp_path_factory) -> Path:
    """Matrix modules whose updates are a drifting rank-1 direction over a noise tail (SPECTRA['noise']),
    and one with a separated spectrum."""
    root = tmp_path_factory.mktemp("tail")
    names = matrix_module_names(SHAPE)
    base = {n: base_tensor(n, s, 0) for n, s in SHAPE.shapes().items()}
    write_model(root / "base", base, SHAPE.config())
    ups = {
        n: planted_run("separated" if i == 0 else "noise", *SHAPE.shapes()[n], len(STEPS), seed=i)
        for i, n in enumerate(names)
    }
    for j, step in enumerate(STEPS):
        tensors = {n: (t + 0.05 * ups[n][j] if n in ups else t) for n, t in base.items()}
        write_model(root / "run" / f"checkpoint-{step}", tensors, SHAPE.config())
    return root


CHILD = """
import sys, torch
from rank1tools.commands.decompose import DecomposeOptions, decompose
root, out, warm, tail = sys.argv[1], sys.argv[2], sys.argv[3] == "warm", sys.argv[4]
kw = {} if tail == "-" else {"tail_tol": float(tail)}
decompose(root + "/base", [], out, run=root + "/run",
          options=DecomposeOptions(rank=4, device="cpu", warm_start=warm, **kw))
"""


def _child(src: Path, root: Path, out: Path, warm: bool, tail: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", CHILD, str(root), str(out), "warm" if warm else "cold", tail],
        env=env,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="module")
def before_25(tmp_path_factory) -> Path:
    """src/ of main before issue #25, from this checkout's git history (skipped without it)."""
    dst = tmp_path_factory.mktemp("before25")
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", BEFORE_25, "src"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"no git history with {BEFORE_25[:10]}: cannot run the code before #25")
    return dst / "src"


def _tensors(out: Path) -> dict[str, bytes]:
    """Every factor tensor's bytes (U, V, S, fro, base_fro, steps; S_bound is new) and the metadata."""
    got = {}
    for p in sorted((out / "factors").glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for key in ("steps", "S", "U", "V", "fro", "base_fro"):
                got[f"{p.name}:{key}"] = f.get_tensor(key).numpy().tobytes()
            got[f"{p.name}:meta"] = f.metadata()["rank1tools"].encode()
    return got


def _old_columns(out: Path, old: Path) -> tuple[str, str]:
    """This output's spectrum.csv cut to the old output's columns, as text, and the old file's text."""
    with open(old / "spectrum.csv") as f:
        cols = next(csv.reader(f))
    with open(out / "spectrum.csv") as f:
        rows = list(csv.DictReader(f))
    lines = [",".join(cols)] + [",".join(r[c] for c in cols) for r in rows]
    return "\n".join(lines) + "\n", (old / "spectrum.csv").read_text()


@pytest.mark.parametrize("warm", [True, False])
def test_head_tolerance_reproduces_the_code_before_25(noise_run, before_25, tmp_path, warm):
    """--tail-tol at sigma_1's tolerance gives the bytes of the code before #25 (run here from git): every
    factor tensor and the metadata, the spectrum table's columns, summary.json. The default 1e-2 does not
    (warm start): the test can tell the two apart."""
    old, new, loose = tmp_path / "old", tmp_path / "new", tmp_path / "loose"
    _child(before_25, noise_run, old, warm, "-")
    _child(REPO / "src", noise_run, new, warm, repr(SIGMA_REL_TOL) if warm else "-")
    assert _tensors(new) == _tensors(old)
    mine, theirs = _old_columns(new, old)
    assert mine == theirs
    assert (new / "summary.json").read_bytes() == (old / "summary.json").read_bytes()
    params_new = json.loads((new / "manifest.json").read_text())["parameters"]
    params_old = json.loads((old / "manifest.json").read_text())["parameters"]
    assert params_new.pop("tail_tol", SIGMA_REL_TOL) == SIGMA_REL_TOL and params_new == params_old
    if warm:
        _child(REPO / "src", noise_run, loose, warm, "-")
        assert _tensors(loose) != _tensors(old)
        rows = list(csv.DictReader(open(loose / "spectrum.csv")))
        assert sum(int(r["iterations"]) for r in rows) < sum(
            int(r["iterations"]) for r in csv.DictReader(open(old / "spectrum.csv"))
        )


def test_store_records_bounds_and_reads_old_stores(noise_run, tmp_path):
    out = tmp_path / "out"
    r = run_main("decompose", str(noise_run / "base"), "--run", str(noise_run / "run"), "-k", "4", "-o", str(out), "-q")
    assert r.returncode == 0, r.stderr
    store = FactorStore(out)
    name = matrix_module_names(SHAPE)[1]
    data = store.load(name)
    assert data["S_bound"].shape == (len(STEPS), 4) and data["S_bound"].dtype == torch.float64
    rows = {int(x["step"]): x for x in csv.DictReader(open(out / "spectrum.csv")) if x["module"] == name}
    w0 = base_tensor(name, SHAPE.shapes()[name], 0)
    for j, step in enumerate(STEPS):
        with safe_open(str(noise_run / "run" / f"checkpoint-{step}" / "model.safetensors"), "pt") as f:
            D = f.get_tensor(name) - w0
        S = _truth(D)
        for i in range(4):
            bound = float(rows[step][f"sigma_{i + 1}_bound"])
            assert bound == float(data["S_bound"][j, i])
            assert abs(float(rows[step][f"sigma_{i + 1}"]) - float(S[i])) <= bound
        assert float(rows[step]["sigma_1_bound"]) <= (SIGMA_REL_TOL + ROUNDING_REL) * float(rows[step]["sigma_1"])
    assert json.loads((out / "manifest.json").read_text())["parameters"]["tail_tol"] == TAIL_REL_TOL
    # a store written before #25 (no S_bound): it loads, and its bounds are unknown (empty cells)
    path = store.factor_path(name)
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    del tensors["S_bound"]
    save_file(tensors, str(path), metadata=meta)
    old = FactorStore(out).load(name)
    assert "S_bound" not in old and torch.equal(old["S"], data["S"])
    table = spectrum_rows(name, SHAPE.shapes()[name], old, ["randomized"] * len(STEPS))
    assert all(math.isnan(row["sigma_1_bound"]) and math.isnan(row["energy_k_bound"]) for row in table)
    # a damaged bound is refused, one line naming the file and tensor
    tensors["S_bound"] = -data["S_bound"]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match=r"S_bound.*negative"):
        FactorStore(out).load(name)
    tensors["S_bound"] = data["S_bound"][:, :2].contiguous()
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(InputError, match=r"'S_bound' is \[5, 2\], expected \[5, 4\]"):
        FactorStore(out).load(name)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tail-tol", "1e-5"], "--tail-tol 1e-5: must be at least 0.0001"),
        (["--tail-tol", "2"], "--tail-tol 2: must be at most 1"),
        (["--tail-tol", "abc"], "--tail-tol 'abc': expected a number"),
        (["--tail-tol", "0.1", "--cold-start"], "cannot be combined with --cold-start"),
        (["--tail-tol", "0.1", "--exact"], "cannot be combined with --exact"),
    ],
)
def test_tail_tol_option_errors(tmp_path, args, message):
    r = run_main("decompose", str(tmp_path / "base"), str(tmp_path / "ck"), "-o", str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "out").exists()


def test_tail_tol_checked_by_the_command_function(noise_run, tmp_path):
    """The API refuses what the CLI refuses (exit 2 there), before any output exists."""
    from rank1tools.commands.decompose import DecomposeOptions, decompose
    from rank1tools.errors import UsageError

    for bad in (1e-5, 1.5):
        with pytest.raises(UsageError, match=r"--tail-tol .*: must lie between 0.0001"):
            decompose(
                str(noise_run / "base"),
                [],
                str(tmp_path / "out"),
                run=str(noise_run / "run"),
                options=DecomposeOptions(rank=2, device="cpu", tail_tol=bad),
            )
    assert not (tmp_path / "out").exists()
