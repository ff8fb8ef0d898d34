"""The in-memory straight-line step (math/linear_step, docs/reground.md) equals
`rank1 extrapolate --method linear` run on the same states written to disk: two-point and lstsq,
norm weights copied or extrapolated, a bf16 origin; and a dense numpy line for the step itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.math.linear_step import extrapolate_state, is_extrapolated, line_updates
from rank1tools.synthetic import write_model

from _extrapolate_support import SHAPE, lstsq_reference
from _support import run_main

STEPS = [10, 20, 30, 40]


def _states(bdt: torch.dtype) -> tuple[dict, list[dict]]:
    """An origin and four noisy, drifting points (float32), built in memory."""
    g = torch.Generator().manual_seed(7)
    shapes = {
        "model.embed_tokens.weight": (SHAPE.vocab, SHAPE.hidden),
        "model.layers.0.self_attn.q_proj.weight": (SHAPE.hidden, SHAPE.hidden),
        "model.layers.0.mlp.up_proj.weight": (SHAPE.intermediate, SHAPE.hidden),
        "model.layers.0.input_layernorm.weight": (SHAPE.hidden,),
        "model.norm.weight": (SHAPE.hidden,),
    }
    origin = {n: (0.02 * torch.randn(s, generator=g)).to(bdt) for n, s in shapes.items()}
    drift = {n: 1e-3 * torch.randn(s, generator=g) for n, s in shapes.items()}
    points = [
        {n: origin[n].float() + t * drift[n] + 3e-4 * torch.randn(drift[n].shape, generator=g) for n in shapes}
        for t in STEPS
    ]
    return origin, points


def _load(folder) -> dict[str, torch.Tensor]:
    out = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            out[name] = f.get_tensor(name)
    return out


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16-origin"])
def on_disk(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("states")
    origin, points = _states(request.param)
    write_model(root / "base", origin, SHAPE.config(request.param))
    for s, p in zip(STEPS, points):
        write_model(root / "run" / f"checkpoint-{s}", p, SHAPE.config(torch.float32))
    return root, origin, points


@pytest.mark.parametrize(
    "mode,args,kw",
    [
        ("lstsq", [], {}),
        ("lstsq", ["--fit-window", "3"], {"window": 3}),
        ("two-point", [], {"from_step": 10, "to_step": 40}),
        ("two-point", ["--from", "0", "--to", "30"], {"from_step": 0, "to_step": 30}),
    ],
)
@pytest.mark.parametrize("norms", ["copy", "extrapolate"])
def test_in_memory_step_equals_extrapolate_linear(on_disk, tmp_path, mode, args, kw, norms):
    root, origin, points = on_disk
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--method",
        "linear",
        "--mode",
        mode,
        "--target-step",
        "70",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--out",
        str(out),
        *args,
        *(["--extrapolate-norms"] if norms == "extrapolate" else []),
    )
    assert r.returncode == 0, r.stderr
    written = _load(out)
    w = kw.get("window", len(STEPS))
    mem = extrapolate_state(
        origin,
        points[-w:],
        STEPS[-w:],
        70,
        mode=mode,
        from_step=kw.get("from_step"),
        to_step=kw.get("to_step"),
        norms=norms,
    )
    assert set(mem) == set(written)
    for name, got in written.items():
        want = mem[name].to(torch.float32)
        moved = want.to(torch.float64) - origin[name].to(torch.float64)
        scale = float(moved.abs().max())
        err = float((got.to(torch.float64) - want.to(torch.float64)).abs().max())
        assert err <= 1e-6 * scale, f"{name}: in memory vs on disk {err:.3g} (max |update| {scale:.3g})"
        if norms == "copy" and name.endswith("norm.weight"):
            assert torch.equal(mem[name], points[-1][name])  # the later point, bit for bit


def test_is_extrapolated_selection():
    m, v, nw = torch.zeros(3, 4), torch.zeros(4), "model.layers.0.input_layernorm.weight"
    assert is_extrapolated("model.layers.0.mlp.up_proj.weight", m, tensors="matrices")
    assert not is_extrapolated("model.layers.0.mlp.up_proj.bias", v, tensors="matrices")
    assert is_extrapolated("model.layers.0.mlp.up_proj.bias", v)
    assert not is_extrapolated(nw, v) and is_extrapolated(nw, v, norms="extrapolate")
    assert not is_extrapolated(nw, v, norms="extrapolate", tensors="matrices")
    assert not is_extrapolated("ids", torch.zeros(3, 4, dtype=torch.int64))


def test_line_updates_against_numpy():
    g = torch.Generator().manual_seed(3)
    M = torch.randn(5, 40, generator=g)
    steps = [2.0, 4.0, 6.0, 9.0, 12.0]
    got = list(line_updates(M, steps, [15.0, 30.0]))
    for s, d in zip((15.0, 30.0), got):
        want, _ = lstsq_reference(M.double().numpy(), steps, s)
        np.testing.assert_allclose(d.numpy(), want, rtol=1e-12, atol=1e-12)
    a, b = M[1].double(), M[3].double()
    (d,) = line_updates(M, steps, [21.0], mode="two-point", from_step=4.0, to_step=9.0)
    np.testing.assert_allclose(d.numpy(), (a + (21.0 - 4.0) / 5.0 * (b - a)).numpy(), rtol=1e-12, atol=1e-15)
    (d0,) = line_updates(M, steps, [18.0], mode="two-point", from_step=0.0, to_step=6.0)  # 0: the origin
    np.testing.assert_allclose(d0.numpy(), (3.0 * M[2].double()).numpy(), rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="mode must be one of"):
        next(line_updates(M, steps, [1.0], mode="cubic"))


def test_planted_line_is_recovered():
    """Points exactly on a line (dyadic values, exact in float32): both modes land on the line."""
    origin = {"w.weight": (torch.arange(60.0) / 64).reshape(6, 10)}
    direction = ((torch.arange(60.0) - 30) / 1024).reshape(6, 10)
    pts = [{"w.weight": origin["w.weight"] + s * direction} for s in (1, 2, 3)]
    for mode in ("lstsq", "two-point"):
        got = extrapolate_state(origin, pts, [1, 2, 3], 8, mode=mode)["w.weight"]
        assert torch.equal(got, origin["w.weight"] + 8 * direction), mode
