"""Mixture-of-experts checkpoints (docs/formats.md#mixture-of-experts-tensors): a tiny Qwen3-MoE
(4 experts) built by transformers, saved in both layouts: per-expert 2-D weights (what
`save_pretrained` of transformers 5.x writes: `mlp.experts.N.gate_proj.weight`) and fused 3-D expert
tensors (`mlp.experts.gate_up_proj` [4, 2i, h], `mlp.experts.down_proj` [4, h, i]: the model's
in-memory state dict, which transformers 5.x also loads; written with safetensors since
`save_pretrained` converts it back to per-expert tensors)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.modules import expert_slices, parse_matrix_module
from rank1tools.plot_common import plots_available

from _support import run_main

pytestmark = pytest.mark.integration

STEPS = [10, 20, 30]
TARGET = 50
EXPERTS = 4
LAYERS = 2


def _config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=8,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )


def _arrays(folder: Path) -> dict[str, np.ndarray]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).double().numpy() for k in f.keys()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"split": root, "fused": root}, each with base/ and run/checkpoint-{10,20,30}/: the same
    weights in both layouts; every matrix but expert 0's moves along a rank-1 direction (its own per
    expert) growing with the step, plus a little noise."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("moe")
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(_config()).float()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    direction = {
        k: torch.randn((*v.shape[:-1], 1), generator=g) @ torch.randn((*v.shape[:-2], 1, v.shape[-1]), generator=g)
        for k, v in base.items()
        if v.ndim >= 2
    }
    for k, d in direction.items():  # expert 0 stays put (noise only): "which experts moved"
        if d.ndim == 3:
            d[0] = 0
        elif ".experts.0." in k:
            d.zero_()
    states = [base] + [
        {
            k: v + 1e-4 * s * direction[k] + 1e-6 * torch.randn(v.shape, generator=g) if k in direction else v
            for k, v in base.items()
        }
        for s in STEPS
    ]
    out = {}
    for layout in ("split", "fused"):
        folders = [root / layout / "base"] + [root / layout / "run" / f"checkpoint-{s}" for s in STEPS]
        for folder, state in zip(folders, states):
            model.load_state_dict(state)
            if layout == "split":
                model.save_pretrained(folder)
            else:
                folder.mkdir(parents=True)
                save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
                model.config.save_pretrained(folder)
        out[layout] = root / layout
    return out


def _expert_matrices(folder: Path) -> dict[str, np.ndarray]:
    """Every 2-D matrix module of a checkpoint, a fused expert tensor as one matrix per expert
    (`NAME[e]`), computed here with numpy."""
    out = {}
    for name, a in _arrays(folder).items():
        if a.ndim == 3:
            out.update({f"{name}[{e}]": a[e] for e in range(a.shape[0])})
        elif a.ndim == 2 and parse_matrix_module(name, a.shape) is not None:
            out[name] = a
    return out


def test_names_of_experts_routers_and_shared_experts():
    router = parse_matrix_module("model.layers.3.mlp.gate.weight", (4, 16))
    assert (router.layer, router.type, router.expert) == (3, "router", None)
    assert parse_matrix_module("model.layers.0.block_sparse_moe.gate.weight", (8, 16)).type == "router"  # Mixtral
    assert parse_matrix_module("model.layers.0.mlp.router.weight", (8, 16)).type == "router"  # gpt-oss
    dense = parse_matrix_module("model.layers.0.mlp.gate_proj.weight", (32, 16))
    assert (dense.type, dense.expert) == ("gate", None)
    routed = parse_matrix_module("model.layers.1.block_sparse_moe.experts.12.w2.weight", (16, 8))
    assert (routed.layer, routed.type, routed.expert) == (1, "down", 12)
    shared = parse_matrix_module("model.layers.2.mlp.shared_experts.up_proj.weight", (8, 16))
    assert (shared.type, shared.expert) == ("up", "shared")
    fused = parse_matrix_module("model.layers.1.mlp.experts.gate_up_proj[3]", (16, 16))
    assert (fused.layer, fused.type, fused.expert) == (1, "gate_up", 3)
    shapes = {
        "model.layers.0.mlp.experts.down_proj": (4, 16, 8),
        "model.layers.0.mlp.experts.down_proj_scales": (4, 16, 2),  # gpt-oss MXFP4 scales: not a matrix
        "model.norm.weight": (16,),
    }
    assert expert_slices(shapes) == {
        **{f"model.layers.0.mlp.experts.down_proj[{e}]": (16, 8) for e in range(4)},
        "model.layers.0.mlp.experts.down_proj_scales": (4, 16, 2),
        "model.norm.weight": (16,),
    }


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_every_expert_matrix_once_with_float64_sigma(runs, tmp_path, layout):
    root = runs[layout]
    store = tmp_path / "store"
    plots = ["--plots"] if layout == "fused" and plots_available() else []
    r = run_main(
        "decompose", str(root / "base"), "--run", str(root / "run"), "--rank", "2", *plots, "--out", str(store), "-q"
    )
    assert r.returncode == 0, r.stderr
    base = _expert_matrices(root / "base")
    with open(store / "spectrum.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["module"] for r in rows}) == sorted(base)
    assert len(rows) == len(base) * len(STEPS)  # every matrix once per step
    for step in STEPS:
        ck = _expert_matrices(root / "run" / f"checkpoint-{step}")
        for row in (r for r in rows if int(r["step"]) == step):
            name = row["module"]
            s = np.linalg.svd(ck[name] - base[name], compute_uv=False)
            assert float(row["sigma_1"]) == pytest.approx(s[0], rel=1e-5), name
            mod = parse_matrix_module(name, base[name].shape)
            assert row["type"] == mod.type and row["expert"] == ("" if mod.expert is None else str(mod.expert))
    experts = {r["module"]: r["expert"] for r in rows if "experts" in r["module"]}
    assert len(experts) == LAYERS * EXPERTS * (3 if layout == "split" else 2)  # gate/up/down or gate_up/down
    assert {e for e in experts.values()} == {str(e) for e in range(EXPERTS)}
    routers = {r["module"] for r in rows if r["type"] == "router"}
    assert routers == {f"model.layers.{i}.mlp.gate.weight" for i in range(LAYERS)}
    assert all(r["expert"] == "" for r in rows if "experts" not in r["module"])
    summary = json.loads((store / "summary.json").read_text())
    assert list(summary["by_expert"]) == [str(e) for e in range(EXPERTS)]
    e1 = [float(r["energy_1"]) for r in rows if r["expert"] == "2"]
    assert summary["by_expert"]["2"]["energy_1"] == pytest.approx(sum(e1) / len(e1), rel=1e-12)
    assert summary["by_expert"]["2"]["n"] == len(e1)
    assert "router" in summary["by_type"]
    moved = summary["by_expert"]
    assert moved["0"]["rel_update"] < 0.01 * min(moved[e]["rel_update"] for e in "123")  # expert 0 stayed put
    assert moved["0"]["energy_1"] < 0.9 < min(moved[e]["energy_1"] for e in "123")  # noise vs a rank-1 update
    if plots:
        assert sorted(p.name for p in (store / "plots").glob("energy_by_expert.*")) == [
            "energy_by_expert.png",
            "energy_by_expert.svg",
        ]


def test_reconstruct_of_a_fused_tensor_is_the_experts_stacked(runs, tmp_path):
    """reconstruct --rank 1 of the fused layout: each expert of a fused tensor equals base + its own
    rank-1 update (float64 SVD here), and down_proj's experts equal the split layout's own
    reconstructions of the same matrices (gate_up has no split counterpart: gate and up are apart)."""
    ck = "run/checkpoint-30"
    for layout in ("fused", "split"):
        r = run_main(
            "reconstruct",
            str(runs[layout] / "base"),
            str(runs[layout] / ck),
            "--rank",
            "1",
            "--no-norm-match",
            "--dtype",
            "float32",
            "--out",
            str(tmp_path / layout),
            "-q",
        )
        assert r.returncode == 0, r.stderr
    fused, split = _arrays(tmp_path / "fused"), _arrays(tmp_path / "split")
    base, theirs = _arrays(runs["fused"] / "base"), _arrays(runs["fused"] / ck)
    for name in (n for n, a in base.items() if a.ndim == 3):
        want = []
        for e in range(EXPERTS):
            U, S, Vt = np.linalg.svd(theirs[name][e] - base[name][e])
            want.append(base[name][e] + S[0] * np.outer(U[:, 0], Vt[0]))
        np.testing.assert_allclose(fused[name], np.stack(want), rtol=0, atol=1e-6)
        if name.endswith("down_proj"):
            stacked = np.stack([split[name.replace("experts.", f"experts.{e}.") + ".weight"] for e in range(EXPERTS)])
            np.testing.assert_array_equal(fused[name], stacked)


def _lstsq(root: Path) -> dict[str, np.ndarray]:
    """Per-element least-squares line over the history at TARGET; norm weights from the last checkpoint."""
    base = _arrays(root / "base")
    hist = [_arrays(root / "run" / f"checkpoint-{s}") for s in STEPS]
    t = np.array(STEPS, float)
    tc = t - t.mean()
    out = {}
    for name, b in base.items():
        if "norm" in name:
            out[name] = hist[-1][name]
            continue
        D = np.stack([h[name] - b for h in hist])
        slope = np.tensordot(tc, D - D.mean(axis=0), axes=1) / (tc @ tc)
        out[name] = b + D.mean(axis=0) + slope * (TARGET - t.mean())
    return out


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_extrapolated_moe_loads_with_the_reference_logits(runs, tmp_path, layout):
    """extrapolate --method linear on either layout writes the layout of its base, which transformers
    loads; its logits equal those of the same weights (computed here, on the fused layout) built in memory."""
    transformers = pytest.importorskip("transformers")
    root, out = runs[layout], tmp_path / "ex"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--method",
        "linear",
        "--mode",
        "lstsq",
        "--target-step",
        str(TARGET),
        "--dtype",
        "float32",
        "--out",
        str(out),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert set(_arrays(out)) == set(_arrays(root / "base"))  # the base's layout
    want = transformers.Qwen3MoeForCausalLM(_config()).float().eval()
    want.load_state_dict({k: torch.from_numpy(v).float() for k, v in _lstsq(runs["fused"]).items()})
    got = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 2, 33, 17, 40, 8]])
    with torch.no_grad():
        la, lb = got(ids).logits, want(ids).logits
    torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)


def test_inspect_counts_every_expert_matrix(runs):
    from rank1tools.commands.inspect import inspect_model

    split, fused = (inspect_model(str(runs[layout] / "base")) for layout in ("split", "fused"))
    dense = {"q": LAYERS, "k": LAYERS, "v": LAYERS, "o": LAYERS, "router": LAYERS}
    assert split.module_types == {**dense, "gate": LAYERS * EXPERTS, "up": LAYERS * EXPERTS, "down": LAYERS * EXPERTS}
    assert fused.module_types == dict(sorted({**dense, "gate_up": LAYERS * EXPERTS, "down": LAYERS * EXPERTS}.items()))
    assert split.matrix_parameters == fused.matrix_parameters  # the same weights in either layout


def _alpharl(root: Path, fits: Path, y_star: float) -> dict[str, np.ndarray]:
    """AlphaRL from the fit store's tensors: W = θ₀ + x̂ v̂ᵀ per module, an expert `NAME[e]` of a
    fused tensor at its index (docs/concepts.md#extrapolation-three-methods)."""
    out = {k: v.copy() for k, v in _arrays(root / "base").items()}
    for m in json.loads((fits / "manifest.json").read_text())["modules"]:
        with safe_open(str(fits / m["file"]), "pt") as f:
            g = {k: f.get_tensor(k).double().numpy() for k in f.keys()}
        a, b = g["score_line"]
        x_hat = g["x_mean"] + g["x_scale"] * ((y_star - a) / b) * g["x_loadings"].reshape(-1)
        name, _, index = m["name"].partition("[")
        target = out[name][int(index[:-1])] if index else out[name]
        target += np.outer(x_hat, g["v_last"])
    return out


@pytest.mark.parametrize("layout", ["split", "fused"])
def test_alpharl_on_experts_loads_with_the_reference_logits(runs, tmp_path, layout):
    """decompose -> fit-pls -> extrapolate --method alpharl: every expert of a fused tensor is fitted and
    moved on its own, the output keeps the base's layout and transformers loads it."""
    transformers = pytest.importorskip("transformers")
    root = runs[layout]
    (tmp_path / "m.csv").write_text("step,acc\n10,0.2\n20,0.3\n30,0.41\n")
    for args in (
        ["decompose", str(root / "base"), "--run", str(root / "run"), "--rank", "1", "--out", str(tmp_path / "f")],
        [
            "fit-pls",
            str(tmp_path / "f"),
            "--metrics",
            str(tmp_path / "m.csv"),
            "--no-plots",
            "--out",
            str(tmp_path / "p"),
        ],
        ["extrapolate", str(root / "base"), "--method", "alpharl", "--fits", str(tmp_path / "p")]
        + ["--target-metric", "0.5", "--dtype", "float32", "--out", str(tmp_path / "ex")],
    ):
        r = run_main(*args, "-q")
        assert r.returncode == 0, (args[0], r.stderr)
    got_arrays, want_arrays = _arrays(tmp_path / "ex"), _alpharl(root, tmp_path / "p", 0.5)
    assert set(got_arrays) == set(want_arrays)  # the base's layout
    for name, want in want_arrays.items():
        np.testing.assert_allclose(got_arrays[name], want, rtol=0, atol=1e-6, err_msg=name)
    got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ex", dtype=torch.float32).eval()
    ids = torch.tensor([[3, 7, 11, 2, 30, 9]])
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
    model.load_state_dict(_fused_state(want_arrays), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-5)


def _fused_state(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """A state dict in the model's in-memory (fused) layout from either layout's arrays."""
    out, experts = {}, {}
    for name, a in arrays.items():
        if ".experts." in name and a.ndim == 2:  # model.layers.L.mlp.experts.E.gate_proj.weight
            head, rest = name.split(".experts.")
            e, proj = rest.split(".")[:2]
            experts.setdefault((head, proj), {})[int(e)] = a
        else:
            out[name] = torch.from_numpy(a).float()
    for (head, proj), by_e in experts.items():
        if proj == "down_proj":
            out[f"{head}.experts.down_proj"] = torch.from_numpy(np.stack([by_e[e] for e in sorted(by_e)])).float()
    for (head, proj), by_e in experts.items():
        if proj == "gate_proj":
            up = experts[(head, "up_proj")]
            gate_up = np.stack([np.concatenate([by_e[e], up[e]]) for e in sorted(by_e)])
            out[f"{head}.experts.gate_up_proj"] = torch.from_numpy(gate_up).float()
    return out


def test_hub_source_reads_one_expert_at_a_time(runs, tmp_path, monkeypatch):
    """A fused expert tensor on the Hub (the fake one of tests/test_hub.py): each expert reads back the
    local bytes, and with the evict policy the shard goes only once every expert of it was read."""
    import test_hub

    from rank1tools.io.hub_open import open_hub_checkpoint

    from hub_server import FakeHub, folder_files

    hub = FakeHub(test_hub.TOKEN)
    hub.create_repo("org/moe").commit("Upload model", folder_files(runs["fused"] / "base"))
    url = hub.start()
    try:
        test_hub._point_huggingface_hub(monkeypatch, url, tmp_path / "hf_home")
        fused = "model.layers.1.mlp.experts.down_proj"
        local = _arrays(runs["fused"] / "base")[fused]
        ck = open_hub_checkpoint("hf://org/moe", policy="evict")
        slices = [f"{fused}[{e}]" for e in range(EXPERTS)]
        ck.expect(slices)
        cached = lambda: list((tmp_path / "hf_home" / "hub").rglob("model.safetensors"))  # noqa: E731
        for e, name in enumerate(slices):
            np.testing.assert_array_equal(ck.read_raw(name).double().numpy(), local[e])
            assert bool(cached()) == (e < EXPERTS - 1), e  # evicted after the last expert only
        ck.close()
    finally:
        hub.stop()
