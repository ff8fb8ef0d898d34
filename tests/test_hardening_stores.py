"""Hardening: fit and factor stores and what alpharl / reconstruct / fit-pls read from them.

Non-finite values of the container of `extrapolate --method alpharl --container last`, tampered
store tensors (sign of `fro`, zero scales, NaN/Inf factors), a store's base identified by content
rather than by path, and alpharl step targets outside the fitted window. Each refusal is checked
for its exit code, its one line naming the file and tensor, and that nothing was written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.commands.fit_pls import FitPlsOptions, fit_pls
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import run_main

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=48, layers=1, heads=4, kv_heads=2, tie=True)
STEPS = [10, 20, 30, 40]
ACC = [0.20, 0.30, 0.33, 0.41]
Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """fp32 base and run, a rank-2 factor store, fit stores against the metric and the step."""
    root = tmp_path_factory.mktemp("stores")
    make_base(root / "base", SHAPE, torch.float32)
    make_run(root / "run", STEPS, SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=1e-4)
    decompose(
        str(root / "base"),
        [],
        str(root / "factors"),
        run=str(root / "run"),
        options=DecomposeOptions(rank=2, exact=True),
    )
    (root / "m.csv").write_text("step,accuracy\n" + "".join(f"{s},{a}\n" for s, a in zip(STEPS, ACC)))
    fit_pls(
        str(root / "factors"),
        str(root / "fits"),
        options=FitPlsOptions(metrics=str(root / "m.csv"), metric="accuracy", plots=False),
    )
    fit_pls(str(root / "factors"), str(root / "fits_step"), options=FitPlsOptions(plots=False))
    return root


def _one_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("rank1: error:")]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def _tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _edit_file(path: Path, edit) -> None:
    """Rewrite one safetensors file with its tensors edited (its metadata kept)."""
    tensors, meta = _tensors(path)
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


def _edit_model(folder: Path, **values) -> None:
    """Set tensor[name][index] = value in a model folder's single file."""

    def edit(t):
        for name, (idx, v) in values.items():
            t[name][idx] = v

    _edit_file(folder / "model.safetensors", edit)


# ---- alpharl --container last: no non-finite value the base does not have (#20) ----


def _alpharl(stores: Path, out: Path, *args: str, fits: str = "fits", base: str | None = None):
    return run_main(
        "extrapolate",
        base or str(stores / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(stores / fits),
        "--out",
        str(out),
        "-q",
        *args,
    )


@pytest.mark.parametrize("where", ["norm", "kept module", "recorded checkpoint"])
def test_alpharl_container_last_refuses_nonfinite_copied_tensors(stores, tmp_path, where):
    last = tmp_path / "checkpoint-40"
    shutil.copytree(stores / "run" / "checkpoint-40", last)
    _edit_model(last, **{(NORM if where == "norm" else Q): ((3,) if where == "norm" else (1, 2), float("nan"))})
    args = ["--target-metric", "0.5", "--container", "last"]
    if where == "kept module":
        args += ["--min-r2", "1"]  # every module (R² < 1) keeps the last checkpoint's value
    if where == "recorded checkpoint":
        fits = tmp_path / "fits"
        shutil.copytree(stores / "fits", fits)
        m = json.loads((fits / "manifest.json").read_text())
        m["factor_store"]["checkpoints"][-1]["source"] = str(last)
        m["factor_store"]["checkpoints"][-1].pop("fingerprint")  # else refused as another checkpoint (below)
        (fits / "manifest.json").write_text(json.dumps(m))
        _edit_model(last, **{NORM: ((3,), float("inf"))})
        r = run_main(
            "extrapolate",
            str(stores / "base"),
            "--method",
            "alpharl",
            "--fits",
            str(fits),
            "--out",
            str(tmp_path / "out"),
            "-q",
            *args,
            "--exclude",
            Q,
        )
        line = _one_error(r, 3, str(last), "non-finite")
        assert NORM in line or Q in line
    else:
        r = _alpharl(stores, tmp_path / "out", *args, "--last-checkpoint", str(last))
        _one_error(r, 3, str(last), repr(NORM if where == "norm" else Q), "non-finite")
    _no_output(tmp_path / "out")


def test_alpharl_container_base_keeps_the_bases_own_nan(stores, tmp_path):
    """The rule is relative to the base (as in reconstruct): a NaN the base itself holds is copied."""
    base = tmp_path / "base"
    shutil.copytree(stores / "base", base)
    _edit_model(base, **{NORM: ((3,), float("nan"))})
    last = tmp_path / "checkpoint-40"
    shutil.copytree(stores / "run" / "checkpoint-40", last)
    _edit_model(last, **{NORM: ((3,), float("nan"))})
    fits = tmp_path / "fits"
    shutil.copytree(stores / "fits", fits)
    m = json.loads((fits / "manifest.json").read_text())
    m["factor_store"]["base"]["source"] = str(base)
    m["factor_store"]["base"].pop("fingerprint", None)
    (fits / "manifest.json").write_text(json.dumps(m))
    r = run_main(
        "extrapolate",
        str(base),
        "--method",
        "alpharl",
        "--fits",
        str(fits),
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--target-metric",
        "0.5",
        "--container",
        "last",
        "--last-checkpoint",
        str(last),
    )
    assert r.returncode == 0, r.stderr
    written, _ = _tensors(tmp_path / "out" / "model.safetensors")
    assert torch.isnan(written[NORM][3]) and torch.isfinite(written[NORM][:3]).all()


# ---- tampered store tensors: validated on read, exit 3 naming file and tensor (#20) ----


def _factor_copy(stores: Path, dst: Path, key: str, value) -> Path:
    """A copy of the factor store with factor tensor `key` of Q edited (`value`: function of the tensor)."""
    shutil.copytree(stores / "factors", dst)
    path = dst / "factors" / f"{Q}.safetensors"
    _edit_file(path, lambda t: t.__setitem__(key, value(t[key].clone())))
    return path


def _set(idx, v):
    def edit(t):
        t[idx] = v
        return t

    return edit


FACTOR_TAMPERING = {
    "negative fro": ("fro", lambda t: -t, "'fro' is negative at step 10"),
    "zero fro": ("fro", lambda t: torch.zeros_like(t), "'S' holds more than ||dW||_F at step 10"),
    "NaN in S": ("S", _set((1, 0), float("nan")), "'S' has non-finite values"),
    "Inf in U": ("U", _set((2, 3, 1), float("inf")), "'U' has non-finite values"),
    "NaN in V": ("V", _set((0, 1, 0), float("nan")), "'V' has non-finite values"),
    "negative S": ("S", lambda t: -t, "'S' has a negative singular value at step 10"),
    "S increasing": ("S", lambda t: t.flip(1), "'S' is not in non-increasing order at step 10"),
    "scaled U": ("U", lambda t: 2 * t, "'U' column 0 at step 10 has norm 2"),
    "negative base_fro": ("base_fro", lambda t: -t - 1, "'base_fro' is negative"),
}


@pytest.mark.parametrize("case", list(FACTOR_TAMPERING))
def test_tampered_factor_store_is_refused_by_reconstruct_and_fit_pls(stores, tmp_path, case):
    key, value, needle = FACTOR_TAMPERING[case]
    path = _factor_copy(stores, tmp_path / "factors", key, value)
    out = tmp_path / "out"
    r = run_main(
        "reconstruct",
        str(stores / "base"),
        str(stores / "run" / "checkpoint-20"),
        "--factors",
        str(tmp_path / "factors"),
        "--rank",
        "1",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, str(path), needle, "corrupt or edited factor store")
    _no_output(out)
    r = run_main("fit-pls", str(tmp_path / "factors"), "--out", str(out), "-q", "--no-plots")
    _one_error(r, 3, str(path), needle)
    _no_output(out)


def test_untampered_factor_store_reconstructs(stores, tmp_path):
    """The checks pass on what decompose wrote (the control of the cases above)."""
    r = run_main(
        "reconstruct",
        str(stores / "base"),
        str(stores / "run" / "checkpoint-20"),
        "--factors",
        str(stores / "factors"),
        "--rank",
        "1,2",
        "--out",
        str(tmp_path / "out"),
        "-q",
    )
    assert r.returncode == 0, r.stderr


FIT_TAMPERING = {
    "negative fro": ("fro", lambda t: -t, "'fro' is negative"),
    "zero x_scale": ("x_scale", _set(0, 0.0), "'x_scale' has a value 0; a scale is > 0"),
    "negative x_scale": ("x_scale", _set(3, -1.0), "'x_scale' has a value -1"),
    "zero fro": ("fro", lambda t: torch.zeros_like(t), "'sigma_last' is"),
    "scaled v": ("v_last", lambda t: 3 * t, "'v_last' has norm 3"),
    "NaN x_loadings": ("x_loadings", _set(0, float("nan")), "'x_loadings' has non-finite values"),
}


@pytest.mark.parametrize("case", list(FIT_TAMPERING))
def test_tampered_fit_store_is_refused_by_alpharl(stores, tmp_path, case):
    key, value, needle = FIT_TAMPERING[case]
    shutil.copytree(stores / "fits", tmp_path / "fits")
    path = tmp_path / "fits" / "fits" / f"{Q}.safetensors"
    _edit_file(path, lambda t: t.__setitem__(key, value(t[key].clone())))
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(stores / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(tmp_path / "fits"),
        "--target-metric",
        "0.5",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, str(path), needle)
    _no_output(out)


# ---- alpharl step targets: before the window refused, far ones warned about (#20) ----


def test_alpharl_step_target_before_the_window_is_refused(stores, tmp_path):
    out = tmp_path / "out"
    r = _alpharl(stores, out, "--target-step", "5", fits="fits_step")
    _one_error(r, 2, "--target-step 5 is before the fitted window's first step (10)", str(stores / "fits_step"))
    _no_output(out)
    r = _alpharl(stores, out, "--target-step", "20,0", fits="fits_step")
    _one_error(r, 2, "--target-step 0 is before")
    _no_output(out)


def test_alpharl_far_step_target_is_warned_about(stores, tmp_path):
    r = _alpharl(stores, tmp_path / "near", "--target-step", "20,160", "--json", fits="fits_step")
    assert r.returncode == 0, r.stderr  # inside the window and 4x its last step: no distance warning
    assert json.loads(r.stdout)["warnings"] == [] and "warning" not in r.stderr
    r = _alpharl(
        stores, tmp_path / "far", "--target-step", "161,1000000", "--dtype", "float32", "--json", fits="fits_step"
    )
    assert r.returncode == 0, r.stderr
    want = [
        f"--target-step {s} is {s / 40:.3g}x the fitted window's last step 40 (above --flag-ratio 4): a "
        "prediction that far beyond the fit is unreliable"
        for s in (161, 1000000)
    ]
    assert json.loads(r.stdout)["warnings"] == want
    assert all(f"rank1: warning: {w}" in r.stderr for w in want)


# ---- a store's base (and checkpoints) identified by content, not by path (#20) ----


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_stores_record_content_fingerprints(stores):
    from rank1tools.io.fingerprint import SCHEME

    m = _manifest(stores / "factors")
    records = [m["base"], *m["checkpoints"]]
    assert all(r["fingerprint"]["scheme"] == SCHEME and len(r["fingerprint"]["sha256"]) == 64 for r in records)
    assert len({r["fingerprint"]["sha256"] for r in records}) == len(records)  # every checkpoint differs
    assert _manifest(stores / "fits")["factor_store"]["base"] == m["base"]  # fit-pls carries it over


def _swap_base(stores: Path, tmp_path: Path, seed: int) -> Path:
    """A copy of the stores whose base path now holds a base of the same shapes and other weights."""
    root = tmp_path / "moved"
    shutil.copytree(stores, root, symlinks=True)
    for name in ("factors", "fits"):  # the copies name the copied base and run
        text = (root / name / "manifest.json").read_text().replace(str(stores), str(root))
        (root / name / "manifest.json").write_text(text)
    if seed:
        shutil.rmtree(root / "base")
        make_base(root / "base", SHAPE, torch.float32, seed=seed)
    return root


def test_same_base_path_with_other_weights_is_refused(stores, tmp_path):
    root = _swap_base(stores, tmp_path, seed=7)
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(root / "fits"),
        "--target-metric",
        "0.5",
        "--out",
        str(out),
        "-q",
    )
    _one_error(
        r,
        3,
        f"{root / 'fits'}: fit store was made from base {root / 'base'}, not {root / 'base'}: "
        "the same path now holds other weights (content fingerprint differs)",
    )
    _no_output(out)
    r = run_main(
        "reconstruct",
        str(root / "base"),
        str(root / "run" / "checkpoint-20"),
        "--factors",
        str(root / "factors"),
        "--rank",
        "1",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, f"{root / 'factors'}: factor store was made from base", "the same path now holds other weights")
    _no_output(out)


def test_identical_base_elsewhere_is_accepted(stores, tmp_path):
    """A copy of the base (and of the checkpoint) in another folder, even resharded, is the same
    base: the result equals the one with the recorded paths, byte for byte."""
    from rank1tools.synthetic import write_model

    copy = tmp_path / "elsewhere" / "base"
    tensors, _ = _tensors(stores / "base" / "model.safetensors")
    write_model(copy, tensors, json.loads((stores / "base" / "config.json").read_text()), "20KB")
    assert (copy / "model.safetensors.index.json").exists()
    ck_copy = tmp_path / "elsewhere" / "ck20"
    shutil.copytree(stores / "run" / "checkpoint-20", ck_copy)
    ref = run_main(
        "reconstruct",
        str(stores / "base"),
        str(stores / "run" / "checkpoint-20"),
        "--factors",
        str(stores / "factors"),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "ref"),
        "-q",
        "--json",
    )
    assert ref.returncode == 0, ref.stderr
    r = run_main(
        "reconstruct",
        str(copy),
        str(ck_copy),
        "--factors",
        str(stores / "factors"),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "got"),
        "-q",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["notes"] == []
    got, _ = _tensors(next((tmp_path / "got").glob("*.safetensors")))
    want, _ = _tensors(tmp_path / "ref" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    r = run_main(
        "extrapolate",
        str(copy),
        "--method",
        "alpharl",
        "--fits",
        str(stores / "fits"),
        "--target-metric",
        "0.5",
        "--out",
        str(tmp_path / "ar"),
        "-q",
        "--json",
    )
    assert r.returncode == 0, r.stderr


def test_store_without_fingerprint_falls_back_to_the_path_with_a_note(stores, tmp_path):
    fits = tmp_path / "fits"
    shutil.copytree(stores / "fits", fits)
    m = _manifest(fits)
    m["factor_store"]["base"].pop("fingerprint")
    (fits / "manifest.json").write_text(json.dumps(m))
    r = run_main(
        "extrapolate",
        str(stores / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(fits),
        "--target-metric",
        "0.5",
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    note = (
        f"{fits}: fit store records no content fingerprint of its base (made by an older rank1tools): base "
        f"{stores / 'base'} accepted by its path only; rerun rank1 decompose to record one"
    )
    assert note in json.loads(r.stdout)["notes"]
    copy = tmp_path / "base-copy"
    shutil.copytree(stores / "base", copy)  # by path only, a copy is another base (as before)
    r = run_main(
        "extrapolate",
        str(copy),
        "--method",
        "alpharl",
        "--fits",
        str(fits),
        "--target-metric",
        "0.5",
        "--out",
        str(tmp_path / "out2"),
        "-q",
    )
    _one_error(r, 3, f"fit store was made from base {stores / 'base'}, not {copy}")


def test_checkpoints_are_identified_by_content_too(stores, tmp_path):
    root = _swap_base(stores, tmp_path, seed=0)  # same base, the run's checkpoints replaced below
    _edit_model(root / "run" / "checkpoint-40", **{Q: ((0, 0), 0.5)})
    _edit_model(root / "run" / "checkpoint-20", **{Q: ((0, 0), 0.5)})
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--method",
        "alpharl",
        "--fits",
        str(root / "fits"),
        "--target-metric",
        "0.5",
        "--container",
        "last",
        "--out",
        str(out),
        "-q",
    )
    _one_error(
        r,
        3,
        f"{root / 'run' / 'checkpoint-40'} now holds other weights than when it was decomposed",
        "--last-checkpoint",
    )
    r = run_main(
        "reconstruct",
        str(root / "base"),
        str(root / "run" / "checkpoint-20"),
        "--factors",
        str(root / "factors"),
        "--rank",
        "1",
        "--out",
        str(out),
        "-q",
    )
    _one_error(r, 3, "factor store holds no decomposition of")
    _no_output(out)
    r = run_main(
        "reconstruct",
        str(root / "base"),
        str(root / "run" / "checkpoint-30"),
        "--factors",
        str(root / "factors"),
        "--rank",
        "1",
        "--out",
        str(out),
        "-q",
    )  # an unchanged one: found
    assert r.returncode == 0, r.stderr
