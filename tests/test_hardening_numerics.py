"""Hardening: numerical range (huge/tiny updates), non-finite values, tied base with an untied
checkpoint, and the memory check. Each case runs the CLI in-process (`run_main`) and checks the
exit code, the one-line message, that no output or staging folder is left, and real values
against numpy float64."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.errors import ResourceError, UsageError
from rank1tools.math.finite import introduces_nonfinite
from rank1tools.math.reconstruct import RoundingStats, rounding_stats
from rank1tools.math.svd import topk_svd
from rank1tools.resources import available_memory_bytes, check_memory
from rank1tools.synthetic import LlamaShape, matrix_module_names

from _support import build_checkpoint, build_model, run_main

Q = "model.layers.0.self_attn.q_proj.weight"
NORM = "model.norm.weight"
EMB = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
TIED = LlamaShape(tie=True)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _assert_refused(r, code: int, pattern: str, out: Path) -> None:
    """Exit code, exactly one `rank1: error:` line matching `pattern`, and nothing written."""
    assert r.returncode == code, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("rank1: error: "), r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, leftovers


def _edited(**values):
    """tensors_edit for build_checkpoint: tensor name -> {(i, j): value}."""

    def edit(t):
        for name, cells in values.items():
            t[name] = t[name].clone()
            for idx, v in cells.items():
                t[name][idx] = v
        return t

    return edit


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("base") / "base").path


def _planted(m, n, sigmas, noise, seed):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, len(sigmas), generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, len(sigmas), generator=g, dtype=torch.float64)).Q
    return (U * torch.tensor(sigmas, dtype=torch.float64)) @ V.T + noise * torch.randn(
        m, n, generator=g, dtype=torch.float64
    )


# ---------------------------------------------------------------- 1. range of the SVD


@pytest.mark.parametrize("scale", [1e30, 1e-25])
@pytest.mark.parametrize("exact", [True, False])
def test_topk_svd_huge_and_tiny_matrices_match_numpy(scale, exact):
    M = (_planted(300, 200, [3.0, 1.0, 0.5], 1e-3, seed=7) * scale).float()
    res = topk_svd(M, 3, exact=exact)
    U, S, _ = np.linalg.svd(M.double().numpy(), full_matrices=False)
    assert torch.isfinite(res.S).all() and torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
    np.testing.assert_allclose(res.S.double().numpy(), S[:3], rtol=1e-4)
    assert abs(float(res.U[:, 0].double() @ torch.from_numpy(U[:, 0]))) >= 0.9999


@pytest.mark.parametrize("exact", [True, False])
def test_topk_svd_near_float32_max_is_finite(exact):
    # sigma_1 = 3e38: the sketch M @ omega overflowed (NaN, then a LinAlgError) before rescaling
    M = (_planted(300, 200, [3.0, 1.0], 1e-4, seed=3) * 1e38).float()
    res = topk_svd(M, 2, exact=exact)
    U, S, _ = np.linalg.svd(M.double().numpy(), full_matrices=False)
    assert torch.isfinite(res.U).all() and torch.isfinite(res.V).all()
    np.testing.assert_allclose(res.S.double().numpy(), S[:2], rtol=1e-4)
    assert abs(float(res.U[:, 0].double() @ torch.from_numpy(U[:, 0]))) >= 0.9999


def test_topk_svd_ordinary_matrix_unchanged():
    """In the normal range nothing is rescaled: results are bit-identical to the plain SVD."""
    M = _planted(120, 80, [3e-3, 1e-3], 1e-6, seed=1).float()
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    res = topk_svd(M, 2, exact=True)
    assert torch.equal(res.S, S[:2]) and torch.equal(res.U, U[:, :2]) and torch.equal(res.V, Vh[:2].T)


def test_decompose_huge_finite_value_computes_correctly(base, tmp_path):
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10", tensors_edit=_edited(**{Q: {(3, 5): 3e38}}))
    out = tmp_path / "dec"
    r = run_main(
        "decompose", str(base), str(ck), "--out", str(out), "--rank", "2", "--device", "cpu", "--quiet", "--json"
    )
    assert r.returncode == 0, r.stderr
    with safe_open(str(out / "factors" / f"{Q}.safetensors"), "pt") as f:
        S, U = f.get_tensor("S")[0].double().numpy(), f.get_tensor("U")[0].double().numpy()
        fro = float(f.get_tensor("fro")[0])
    D = _tensors(ck)[Q].double().numpy() - _tensors(base)[Q].double().numpy()
    Un, Sn, _ = np.linalg.svd(D, full_matrices=False)
    # sigma_2 (~6e-3) lies 40 decades below sigma_1: only the top triplet is meaningful in float32
    assert S[0] == pytest.approx(Sn[0], rel=1e-4) and abs(U[:, 0] @ Un[:, 0]) >= 0.9999
    assert np.isfinite(S).all()
    assert fro == pytest.approx(np.linalg.norm(D), rel=1e-9)
    # and a rank-1 reconstruction of it: finite, the spike's entry carries sigma_1 u_1 v_1
    rec = tmp_path / "rec"
    r = run_main("reconstruct", str(base), str(ck), "--rank", "1", "--out", str(rec), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    got = _tensors(rec)[Q]
    assert torch.isfinite(got).all() and float(got[3, 5]) == pytest.approx(3e38, rel=1e-4)


def test_update_overflowing_float32_is_refused(tmp_path):
    base = build_checkpoint(tmp_path / "base", step=0, tensors_edit=_edited(**{Q: {(1, 2): -3e38}}))
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10", tensors_edit=_edited(**{Q: {(1, 2): 3e38}}))
    out = tmp_path / "o"
    r = run_main("decompose", str(base), str(ck), "--out", str(out), "--device", "cpu", "--quiet")
    _assert_refused(
        r,
        3,
        rf"checkpoint-10: the update of tensor '{re.escape(Q)}' at step 10 overflows float32 "
        r"\(\|values\| up to 3e\+38 in base and checkpoint\)$",
        out,
    )
    r = run_main("reconstruct", str(base), str(ck), "--rank", "1", "--out", str(out), "--device", "cpu", "--quiet")
    _assert_refused(
        r,
        3,
        rf"checkpoint-10: the update of tensor '{re.escape(Q)}' overflows float32 "
        r"\(\|values\| up to 3e\+38",
        out,
    )


# ---------------------------------------------------------------- 2. written values overflowing


def test_alpha_overflow_is_not_blamed_on_base(base, tmp_path):
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10")
    out = tmp_path / "o"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--alpha",
        "1e308",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        3,
        r"tensor 'model\.layers\.\d+\.[\w.]+\.weight': the reconstructed weights overflow "
        r"float32 \(check --alpha 1e\+308; largest finite float32 is 3\.4028e\+38\)$",
        out,
    )
    assert "base" not in r.stderr


def test_base_nonfinite_in_selected_module_names_base(tmp_path):
    base = build_checkpoint(tmp_path / "base", step=0, tensors_edit=_edited(**{Q: {(0, 0): float("inf")}}))
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10")
    out = tmp_path / "o"
    r = run_main("reconstruct", str(base), str(ck), "--rank", "1", "--out", str(out), "--device", "cpu", "--quiet")
    _assert_refused(r, 3, rf"error: {re.escape(str(base))}: tensor '{re.escape(Q)}' has non-finite values", out)


def test_float16_cast_overflow_refused_for_rest_and_modules(tmp_path):
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10")
    out = tmp_path / "o"
    base = build_checkpoint(tmp_path / "b1", step=0, tensors_edit=_edited(**{NORM: {(3,): 1e5}}))
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--dtype",
        "float16",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        3,
        r"tensor 'model\.norm\.weight': base values \(\|values\| up to 1e\+05\) overflow float16 "
        r"\(use --dtype float32 or bfloat16; largest finite float16 is 65504\)$",
        out,
    )
    # a selected module whose weight is 1e5 in base and checkpoint: theta_0 + update is 1e5 there
    base2 = build_checkpoint(tmp_path / "b2", step=0, tensors_edit=_edited(**{Q: {(3, 4): 1e5}}))
    ck2 = build_checkpoint(tmp_path / "run2" / "checkpoint-10", tensors_edit=_edited(**{Q: {(3, 4): 1e5}}))
    r = run_main(
        "reconstruct",
        str(base2),
        str(ck2),
        "--rank",
        "1",
        "--dtype",
        "float16",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        3,
        rf"tensor '{re.escape(Q)}': the reconstructed weights overflow float16 "
        r"\(check --alpha 1, or write --dtype float32;",
        out,
    )
    # bfloat16 holds 1e5: the same inputs are written, the large base value kept to bf16 precision
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--dtype",
        "bfloat16",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert float(_tensors(out)[NORM][3]) == float(torch.tensor(1e5).to(torch.bfloat16))


# ---------------------------------------------------------------- 3. non-finite values never copied in


def test_introduces_nonfinite_is_elementwise():
    b = torch.tensor([1.0, float("nan"), 2.0, float("inf")])
    assert not introduces_nonfinite(torch.tensor([1.0, float("nan"), 3.0, float("inf")]), b)
    assert not introduces_nonfinite(torch.tensor([1.0, 5.0, 3.0, -float("inf")]), b)
    assert introduces_nonfinite(torch.tensor([1.0, float("nan"), float("nan"), 4.0]), b)  # NaN where base is 2
    assert introduces_nonfinite(torch.tensor([float("inf"), 0.0, 0.0, 0.0]).half(), b)
    assert not introduces_nonfinite(torch.tensor([1, 2, 3, 4]), b)


def test_rounding_stats_never_zero_error_for_nonfinite():
    base = torch.tensor([0.0, 1.0, 2.0])
    intended = torch.tensor([0.5, float("nan"), 0.0])
    st = rounding_stats(base, intended, base + intended)
    assert st.rel_error != st.rel_error  # NaN, not 0.0
    total = RoundingStats()
    total.add(rounding_stats(base, torch.tensor([0.5, 0.0, 0.0]), base + torch.tensor([0.5, 0.0, 0.0])))
    assert total.rel_error == 0.0
    total.add(st)
    assert total.rel_error != total.rel_error
    inf = rounding_stats(base, torch.tensor([0.5, 0.0, 0.0]), torch.tensor([float("inf"), 1.0, 2.0]))
    assert inf.introduced_nonfinite == 1 and inf.rel_error != inf.rel_error


def test_rest_checkpoint_refuses_nonfinite_unselected_tensor(base, tmp_path):
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10", tensors_edit=_edited(**{NORM: {(7,): float("nan")}}))
    out = tmp_path / "o"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(r, 3, rf"error: {re.escape(str(ck))}: tensor 'model\.norm\.weight' has non-finite values", out)


def test_base_nonfinite_rest_tensor_is_kept_and_reported_as_unknown_error(tmp_path):
    """The rule is about values the base did not have: a NaN of the base may pass through, and the
    rounding report then says null (unknown), never 0."""
    base = build_checkpoint(tmp_path / "base", step=0, tensors_edit=_edited(**{NORM: {(7,): float("nan")}}))
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10")
    o1, o2 = tmp_path / "o1", tmp_path / "o2"
    r = run_main("reconstruct", str(base), str(ck), "--rank", "1", "--out", str(o1), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert torch.isnan(_tensors(o1)[NORM][7])  # --rest base: the base's own value, bit for bit
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(o2),
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert torch.isfinite(_tensors(o2)[NORM]).all()
    assert json.loads(r.stdout)["outputs"][0]["rel_error"] is None
    report = json.loads((o2 / "rank1tools-rounding.json").read_text())
    row = next(t for t in report["tensors"] if t["tensor"] == NORM)
    assert row["rel_error"] is None and report["rel_error"] is None


# ---------------------------------------------------------------- 4. tied base, untied checkpoint


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A tied base and a checkpoint that stores its own lm_head (embedding + a planted update)."""
    root = tmp_path_factory.mktemp("untie")
    base = build_model(root / "base", tie=True).path

    def add_head(t):
        g = torch.Generator().manual_seed(5)
        emb = t[EMB]
        u, v = torch.randn(emb.shape[0], 1, generator=g), torch.randn(1, emb.shape[1], generator=g)
        t[HEAD] = emb + 1e-3 * u @ v + 1e-5 * torch.randn(emb.shape, generator=g)
        return t

    ck = build_checkpoint(root / "run" / "checkpoint-10", shape=TIED, tensors_edit=add_head)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    return base, ck


def test_rest_checkpoint_keeps_the_checkpoints_own_head(untied, tmp_path):
    base, ck = untied
    out = tmp_path / "o"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got, theirs = _tensors(out), _tensors(ck)
    assert torch.equal(got[HEAD], theirs[HEAD]) and torch.equal(got[EMB], theirs[EMB])
    assert not torch.equal(got[HEAD], got[EMB])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    res = json.loads(r.stdout)
    assert res["untied_lm_head"] is True and len(res["notes"]) == 1
    assert re.search(
        r"^rank1: note: .*stores its own lm_head\.weight but base .* ties it to the embedding: the output "
        r"stores the head, copied \(--rest checkpoint\), and its config\.json says "
        r"tie_word_embeddings: false$",
        r.stderr,
        re.M,
    ), r.stderr


def test_rest_base_keeps_the_base_tied(untied, tmp_path):
    base, ck = untied
    out = tmp_path / "o"
    r = run_main(
        "reconstruct", str(base), str(ck), "--rank", "1", "--out", str(out), "--device", "cpu", "--quiet", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert HEAD not in _tensors(out) and json.loads(r.stdout)["untied_lm_head"] is False
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def _rank1_formula(w0: np.ndarray, wt: np.ndarray) -> np.ndarray:
    D = wt - w0
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    D1 = S[0] * np.outer(U[:, 0], Vt[0])
    return w0 + np.linalg.norm(D) / np.linalg.norm(D1) * D1


def test_all_2d_selects_and_writes_the_untied_head(untied, tmp_path):
    base, ck = untied
    out = tmp_path / "o"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--all-2d",
        "--exact",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got, b, c = _tensors(out), _tensors(base), _tensors(ck)
    want = _rank1_formula(b[EMB].double().numpy(), c[HEAD].double().numpy())  # the head's base value: the embedding
    np.testing.assert_allclose(got[HEAD].double().numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
    want_emb = _rank1_formula(b[EMB].double().numpy(), c[EMB].double().numpy())
    np.testing.assert_allclose(got[EMB].double().numpy(), want_emb, rtol=0, atol=2e-6 * np.abs(want_emb).max())
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert "reconstructed (selected)" in json.loads(r.stdout)["notes"][0]


def test_decompose_selects_the_untied_head(untied, tmp_path):
    base, ck = untied
    out = tmp_path / "d"
    r = run_main(
        "decompose",
        str(base),
        str(ck),
        "--all-2d",
        "--rank",
        "2",
        "--exact",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    names = [m["name"] for m in manifest["modules"]]
    assert names[-1] == HEAD and EMB in names and len(names) == len(matrix_module_names(TIED)) + 2
    with safe_open(str(out / "factors" / f"{HEAD}.safetensors"), "pt") as f:
        S = f.get_tensor("S")[0].double().numpy()
    D = _tensors(ck)[HEAD].double().numpy() - _tensors(base)[EMB].double().numpy()
    np.testing.assert_allclose(S, np.linalg.svd(D, compute_uv=False)[:2], rtol=1e-5)
    only = tmp_path / "h"
    r = run_main(
        "decompose",
        str(base),
        str(ck),
        "--include",
        "lm_*",
        "--rank",
        "1",
        "--out",
        str(only),
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert [m["name"] for m in json.loads((only / "manifest.json").read_text())["modules"]] == [HEAD]


# ---------------------------------------------------------------- 5. memory


def test_available_memory_source(monkeypatch):
    monkeypatch.delenv("RANK1_AVAILABLE_MEMORY", raising=False)
    real = available_memory_bytes()
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable:"))
        assert real is not None and abs(real - kb * 1024) < 2**30  # read moments apart
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", "123456")
    assert available_memory_bytes() == 123456
    check_memory(123456, "x")
    with pytest.raises(ResourceError, match=r"^x: needs about 0\.000123 GB of memory but 0\.000123 GB are available$"):
        check_memory(123457, "x")
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", "lots")
    with pytest.raises(UsageError, match="RANK1_AVAILABLE_MEMORY"):
        available_memory_bytes()


def test_memory_check_refuses_before_any_work(base, tmp_path, monkeypatch):
    ck = build_checkpoint(tmp_path / "run" / "checkpoint-10")
    out = tmp_path / "o"
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", "100000")
    # decompose, fp32 160 x 64 MLP matrices (N = 10240, R = 40960 bytes), rank 8 (randomized,
    # sketch 18): 12 N + R + 16 (m + n) 18 = 228352 bytes (the next update is formed during the SVD)
    r = run_main("decompose", str(base), str(ck), "--out", str(out), "--device", "cpu", "--quiet")
    _assert_refused(
        r,
        3,
        r"error: tensor 'model\.layers\.\d\.mlp\.(gate|up|down)_proj\.weight' \[(160, 64|64, 160)\]: needs about "
        r"0\.000228 GB of memory but 0\.0001 GB are available$",
        out,
    )
    # reconstruct --rest checkpoint: the largest need is an unselected 128 x 64 tensor, the embedding or
    # lm_head (N = 8192): R + 20 N + 4 N = 229376 bytes
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        3,
        r"error: tensor '(lm_head|model\.embed_tokens)\.weight' \[128, 64\]: needs about 0\.000229 GB of "
        r"memory but 0\.0001 GB are available$",
        out,
    )
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", "300000")
    r = run_main("decompose", str(base), str(ck), "--out", str(out), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr


def test_header_declaring_a_huge_tensor_is_refused_without_reading(tmp_path, monkeypatch):
    """A consistent header for a 4 GiB tensor (sparse files): refused from the header alone."""
    name = "model.layers.0.mlp.up_proj.weight"
    for d in ("base", "ck"):
        header = json.dumps({name: {"dtype": "F32", "shape": [32768, 32768], "data_offsets": [0, 4 * 32768**2]}})
        header += " " * (-len(header) % 8)
        (tmp_path / d).mkdir()
        with open(tmp_path / d / "model.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header.encode())
            f.truncate(8 + len(header) + 4 * 32768**2)
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", str(8 * 10**9))
    out = tmp_path / "o"
    r = run_main(
        "decompose", str(tmp_path / "base"), str(tmp_path / "ck"), "--out", str(out), "--device", "cpu", "--quiet"
    )
    _assert_refused(
        r,
        3,
        rf"tensor '{name}' \[32768, 32768\]: needs about \d+(\.\d+)? GB of memory but 8 GB "
        r"are available$",
        out,
    )
    r = run_main(
        "reconstruct",
        str(tmp_path / "base"),
        str(tmp_path / "ck"),
        "--rank",
        "1",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        3,
        rf"tensor '{name}' \[32768, 32768\]: needs about \d+(\.\d+)? GB of memory but 8 GB "
        r"are available$",
        out,
    )


@pytest.mark.integration
def test_untied_output_loads_its_own_head_with_transformers(untied, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, ck = untied
    out = tmp_path / "o"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    theirs = _tensors(ck)
    assert torch.equal(model.lm_head.weight.detach(), theirs[HEAD])
    assert torch.equal(model.model.embed_tokens.weight.detach(), theirs[EMB])


def test_untied_base_with_tied_checkpoint_writes_the_checkpoints_embedding_as_head(tmp_path):
    """The reverse of the cases above: the checkpoint's head *is* its embedding, so an output that
    keeps the base's untied layout stores that embedding as lm_head (and stays untied)."""
    base = build_model(tmp_path / "base", tie=False).path
    ck = build_checkpoint(tmp_path / "ck", shape=TIED, step=50)
    out = tmp_path / "out"
    r = run_main(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--rest",
        "checkpoint",
        "--out",
        str(out),
        "--device",
        "cpu",
        "-q",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    got, theirs = _tensors(out), _tensors(ck)
    assert HEAD not in theirs and torch.equal(got[HEAD], theirs[EMB]) and torch.equal(got[EMB], theirs[EMB])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    assert json.loads(r.stdout)["untied_lm_head"] is False  # nothing was untied: the base already was
