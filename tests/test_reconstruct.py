"""rank1 reconstruct: numbers against the float64 formula, --rest, tied embeddings, rounding report,
factor store, loading with transformers, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.commands.reconstruct import parse_ranks, reconstruct
from rank1tools.commands.reconstruct.plan import ReconstructOptions
from rank1tools.errors import UsageError
from rank1tools.io import open_checkpoint
from rank1tools.synthetic import LlamaShape, make_base, make_run, matrix_module_names

from _support import run_main

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)
UNTIED = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=False)


def _cli(*args: str) -> tuple[int, str, str]:
    r = run_main(*args)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """fp32 base and an fp32 checkpoint with rank-1 drift + dense noise (tied embeddings)."""
    root = tmp_path_factory.mktemp("rec")
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [10, 20], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=3e-4)
    return root / "base", root / "run" / "checkpoint-20"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(folder)
    return {n: ck.read_raw(n) for n in ck.names}


def _formula(w0: np.ndarray, wt: np.ndarray, k: int, alpha: float, norm_match: bool) -> np.ndarray:
    """W = w0 + alpha * (||D|| / ||D_k||) * D_k in float64 with numpy's SVD."""
    D = wt - w0
    U, S, Vt = np.linalg.svd(D, full_matrices=False)
    Dk = (U[:, :k] * S[:k]) @ Vt[:k]
    scale = np.linalg.norm(D) / np.linalg.norm(Dk) if norm_match else 1.0
    return w0 + alpha * scale * Dk


@pytest.mark.parametrize(
    "rank,alpha,norm_match", [("1", 1.0, True), ("3", 1.0, False), ("2", -0.5, True), ("5%", 2.0, True)]
)
def test_matches_float64_formula(pair, tmp_path, rank, alpha, norm_match):
    base, ck = pair
    out = tmp_path / "out"
    reconstruct(
        str(base),
        str(ck),
        str(out),
        options=ReconstructOptions(rank=rank, alpha=alpha, norm_match=norm_match, exact=True, device="cpu"),
    )
    got, b, c = _tensors(out), _tensors(base), _tensors(ck)
    mods = set(matrix_module_names(SHAPE))
    for name in mods:
        k = parse_ranks(rank)[0].resolve(b[name].shape)
        want = _formula(b[name].double().numpy(), c[name].double().numpy(), k, alpha, norm_match)
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=2e-6 * np.abs(want).max())
    for name in set(b) - mods:  # --rest base (default): bit-identical base values
        assert torch.equal(got[name], b[name]), name
    assert "lm_head.weight" not in got  # tied embeddings stay tied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_randomized_rank1_close_to_formula(pair, tmp_path):
    base, ck = pair
    reconstruct(str(base), str(ck), str(tmp_path / "o"), options=ReconstructOptions(rank="1", device="cpu"))
    got, b, c = _tensors(tmp_path / "o"), _tensors(base), _tensors(ck)
    for name in matrix_module_names(SHAPE):
        want = _formula(b[name].double().numpy(), c[name].double().numpy(), 1, 1.0, True)
        upd = want - b[name].double().numpy()
        err = np.linalg.norm(got[name].double().numpy() - want) / np.linalg.norm(upd)
        assert err < 1e-4, name


def test_full_rank_reproduces_checkpoint_and_rest_checkpoint(pair, tmp_path):
    base, ck = pair
    kv = SHAPE.kv_heads * SHAPE.hidden // SHAPE.heads
    out = tmp_path / "full"
    # full rank of every module = min(m, n); k/v are kv x hidden, the smallest
    reconstruct(
        str(base),
        str(ck),
        str(out),
        options=ReconstructOptions(rank="100%", rest="checkpoint", device="cpu", include=["*"]),
    )
    got, c = _tensors(out), _tensors(ck)
    assert min(SHAPE.hidden, kv) == kv
    for name, t in c.items():
        if t.dim() == 2:  # reconstructed at full rank: the checkpoint within float32 rounding
            np.testing.assert_allclose(got[name].numpy(), t.numpy(), rtol=0, atol=1e-6)
        else:  # --rest checkpoint: exactly the checkpoint
            assert torch.equal(got[name], t), name


def test_several_ranks_one_pass_and_provenance(pair, tmp_path):
    base, ck = pair
    res = reconstruct(
        str(base), str(ck), str(tmp_path / "multi"), options=ReconstructOptions(rank="1,2,1%", exact=True, device="cpu")
    )
    assert [o.rank for o in res.outputs] == ["1", "2", "1%"]
    assert sorted(p.name for p in (tmp_path / "multi").iterdir()) == [
        "rank-1",
        "rank-1pct",
        "rank-2",
        "rank1tools.json",
    ]
    top = json.loads((tmp_path / "multi" / "rank1tools.json").read_text())  # marks the parent as rank1's (--force)
    assert top["tool"] == "rank1tools" and top["outputs"] == ["rank-1", "rank-2", "rank-1pct"]
    assert top["parameters"]["rank"] == ["1", "2", "1%"]
    r1, r1pct = _tensors(tmp_path / "multi" / "rank-1"), _tensors(tmp_path / "multi" / "rank-1pct")
    for name in matrix_module_names(SHAPE):  # ceil(0.01 * min(m, n)) = 1 for these shapes
        assert torch.equal(r1[name], r1pct[name])
    prov = json.loads((tmp_path / "multi" / "rank-2" / "rank1tools.json").read_text())
    assert prov["command"] == "reconstruct" and prov["parameters"]["rank"] == "2"
    assert [i["source"] for i in prov["inputs"]] == [str(base), str(ck)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_factor_store_gives_same_weights_without_reading_checkpoint(pair, tmp_path, monkeypatch):
    base, ck = pair
    fac = tmp_path / "factors"
    # exact SVD on both sides: the same triplets, so the outputs must agree bit for bit
    decompose(str(base), [str(ck)], str(fac), options=DecomposeOptions(rank=4, device="cpu", exact=True))
    direct = tmp_path / "direct"
    reconstruct(str(base), str(ck), str(direct), options=ReconstructOptions(rank="2", device="cpu", exact=True))
    from rank1tools.io import checkpoint as ckmod

    real_read = ckmod.Checkpoint.read
    ck_label = str(ck)

    def guarded(self, name, **kw):
        assert self.label != ck_label, f"checkpoint tensor {name} was read"
        return real_read(self, name, **kw)

    monkeypatch.setattr(ckmod.Checkpoint, "read", guarded)
    res = reconstruct(
        str(base),
        str(ck),
        str(tmp_path / "viafactors"),
        options=ReconstructOptions(rank="2", device="cpu", factors=str(fac)),
    )
    assert res.used_factors
    a, b = _tensors(direct), _tensors(tmp_path / "viafactors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    with pytest.raises(UsageError, match="holds 4"):
        reconstruct(str(base), str(ck), str(tmp_path / "x"), options=ReconstructOptions(rank="5", factors=str(fac)))


def test_rounding_report_bf16_loses_tiny_update(tmp_path):
    make_base(tmp_path / "base", SHAPE, dtype=torch.bfloat16)
    # an update of ~1e-6 per element: below half a bf16 ulp of weights ~0.02 (6e-5), far above
    # float32's (1e-9). Only elements of a rank-1 u v^T near zero (small u_i times small v_j), or
    # on weights near zero, fall outside that: "about 100 %" and "about 0 %".
    make_run(tmp_path / "run", [1], SHAPE, base_dtype=torch.bfloat16, dtype=torch.float32, rank1_scale=5e-5, noise=0.0)
    base, ck = tmp_path / "base", tmp_path / "run" / "checkpoint-1"
    code, out, err = _cli(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "bf16"),
        "--json",
        "--quiet",
        "--device",
        "cpu",
    )
    assert code == 0, err
    rep = json.loads(out)["outputs"][0]
    assert rep["lost_fraction"] > 0.9 and rep["rel_error"] > 0.9
    assert "rank1: warning:" in err and "--dtype float32" in err
    prov = json.loads((tmp_path / "bf16" / "rank1tools.json").read_text())
    assert prov["argv"] == [
        "rank1",
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "bf16"),
        "--json",
        "--quiet",
        "--device",
        "cpu",
    ]
    on_disk = json.loads((tmp_path / "bf16" / "rank1tools-rounding.json").read_text())
    assert on_disk["lost_fraction"] == rep["lost_fraction"]
    code, out, err = _cli(
        "reconstruct",
        str(base),
        str(ck),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "f32"),
        "--json",
        "--quiet",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    )
    rep = json.loads(out)["outputs"][0]
    assert code == 0 and rep["lost_fraction"] < 0.01 and rep["rel_error"] < 1e-2 and "warning" not in err
    cfg = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32"
    with safe_open(str(tmp_path / "f32" / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.norm.weight").get_dtype() == "F32"


@pytest.mark.integration
def test_output_loads_with_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    make_base(tmp_path / "base", UNTIED, dtype=torch.float32)
    make_run(tmp_path / "run", [5], UNTIED, noise=1e-4)
    out = tmp_path / "out"
    reconstruct(
        str(tmp_path / "base"),
        str(tmp_path / "run" / "checkpoint-5"),
        str(out),
        options=ReconstructOptions(rank="2", device="cpu", max_shard_size="60KB", exact=True),
    )
    assert (out / "model.safetensors.index.json").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    # the same weights built in memory from the formula
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    b, c = _tensors(tmp_path / "base"), _tensors(tmp_path / "run" / "checkpoint-5")
    state = ref.state_dict()
    for name in matrix_module_names(UNTIED):  # W = w0 + (||D|| / ||D_2||) D_2, written out
        d = c[name] - b[name]
        U, S, Vh = torch.linalg.svd(d, full_matrices=False)
        d2 = (U[:, :2] * S[:2]) @ Vh[:2]
        state[name] = b[name] + d2 * (torch.linalg.norm(d.double()) / torch.linalg.norm(d2.double())).float()
    ref.load_state_dict(state)
    ids = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_input(pair, tmp_path):
    base, ck = pair
    o = str(tmp_path / "o")
    for args, code, needle in [
        (["--rank", "0"], 2, "--rank 0"),
        (["--rank", "-3"], 2, "--rank -3"),
        (["--rank", "49"], 2, "exceeds min(m, n)"),
        (["--rank", "abc"], 2, "--rank 'abc'"),
        (["--rank", "1", "--dtype", "int8"], 2, "--dtype 'int8'"),
        (["--rank", "1", "--rest", "zero"], 2, "--rest 'zero'"),
    ]:
        c, out, err = _cli("reconstruct", str(base), str(ck), "--out", o, *args)
        assert c == code, (args, err)
        assert err.startswith("rank1: error:") and needle in err and err.count("\n") == 1, err
        assert out == "" and not Path(o).exists()
    inside = str(base / "sub")
    c, out, err = _cli("reconstruct", str(base), str(ck), "--out", inside, "--rank", "1")
    assert c == 4 and "must not be inside" in err and not Path(inside).exists()
