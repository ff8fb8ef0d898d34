"""One contract for every command that writes a checkpoint (docs/formats.md#written-checkpoints).

Whatever the writer (reconstruct, each extrapolate method, the demo trainer's saver), the written
checkpoint
  - holds exactly the base's tensor names and shapes, plus `lm_head.weight` exactly when the output
    unties a head the base ties (training untied it); dtypes are the base's unless `--dtype`;
  - has a `config.json` that agrees with what it stores: `tie_word_embeddings` is false exactly when
    `lm_head.weight` is stored, the dtype field names the stored dtype, the sizes match the tensors;
  - loads with `transformers` with an empty load report (no missing, unexpected or mismatched keys),
    and the loaded head is the stored head (untied) or the embedding (tied).

Parametrised over the head (tied; untied; tied base whose run unties it; untied base whose run
stores no head) x a single-file or sharded base and run x bf16 or fp32. Each case's run is built
with `rank1tools.synthetic` (safetensors / huggingface_hub savers), read back with safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rank1tools.synthetic import LlamaShape, checkpoint_tensors, make_base, write_model

from _support import SMALL_SHARD, reference_tensors, run_main

HEAD, EMB = "lm_head.weight", "model.embed_tokens.weight"
STEPS = [10, 20, 30]
HEADS = ["tied", "untied", "untied-by-training", "untied-base-tied-run"]
LAYOUTS = ["single", "sharded"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SAFETENSORS_DTYPE = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
CONFIG_DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _run_tensors(head: str, step: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One checkpoint's tensors for the head variant (a planted update on every tensor)."""
    if head in ("tied", "untied-base-tied-run"):
        return checkpoint_tensors(LlamaShape(tie=True), step, STEPS[-1], dtype, dtype)
    if head == "untied":
        return checkpoint_tensors(LlamaShape(tie=False), step, STEPS[-1], dtype, dtype)
    # untied-by-training: the checkpoint's head is its embedding plus a growing rank-1 update
    t = checkpoint_tensors(LlamaShape(tie=True), step, STEPS[-1], dtype, dtype)
    g = torch.Generator().manual_seed(11)
    emb = t[EMB].float()
    u, v = torch.randn(emb.shape[0], 1, generator=g), torch.randn(1, emb.shape[1], generator=g)
    t[HEAD] = (emb + (step / STEPS[-1]) * 2e-3 * u @ v).to(dtype)
    return t


class Case:
    def __init__(self, root: Path, head: str, layout: str, dtype: str):
        self.head, self.layout, self.dtype = head, layout, DTYPES[dtype]
        shard = SMALL_SHARD if layout == "sharded" else None
        base_tied = head in ("tied", "untied-by-training")
        self.base = make_base(root / "base", LlamaShape(tie=base_tied), self.dtype, max_shard_size=shard)
        self.run = root / "run"
        for step in STEPS:
            run_tied = head in ("tied", "untied-base-tied-run")
            cfg = LlamaShape(tie=run_tied).config(self.dtype)
            folder = write_model(self.run / f"checkpoint-{step}", _run_tensors(head, step, self.dtype), cfg, shard)
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}) + "\n")
        self.last = self.run / f"checkpoint-{STEPS[-1]}"
        self.root = root
        self._fits: Path | None = None

    def fits(self) -> Path:
        """decompose + fit-pls (against the step) of the run, for alpharl."""
        if self._fits is None:
            store, fits = self.root / "store", self.root / "fits"
            r = run_main(
                "decompose",
                str(self.base),
                "--run",
                str(self.run),
                "--rank",
                "1",
                "--out",
                str(store),
                "--device",
                "cpu",
                "--quiet",
            )
            assert r.returncode == 0, r.stderr
            r = run_main("fit-pls", str(store), "--out", str(fits), "--no-plots", "--quiet")
            assert r.returncode == 0, r.stderr
            self._fits = fits
        return self._fits


_CASES: dict[tuple, Case] = {}


@pytest.fixture(params=[(h, lay, d) for h in HEADS for lay in LAYOUTS for d in DTYPES], ids=lambda p: "-".join(p))
def case(request, tmp_path_factory) -> Case:
    if request.param not in _CASES:
        _CASES[request.param] = Case(tmp_path_factory.mktemp("-".join(request.param)), *request.param)
    return _CASES[request.param]


# Each writer: (arguments after `rank1`, given the case and the output folder) -> the output
# checkpoint folder. `--dtype` is left at its default so the dtype contract is the base's.
def _reconstruct(c: Case, out: Path):
    return ["reconstruct", c.base, c.last, "--rank", "1", "--out", out]


def _reconstruct_rest_checkpoint(c: Case, out: Path):
    return ["reconstruct", c.base, c.last, "--rank", "2", "--rest", "checkpoint", "--all-2d", "--out", out]


def _relex(c: Case, out: Path):
    return ["extrapolate", c.base, "--run", c.run, "--method", "relex", "--target-step", "40", "--out", out]


def _linear(c: Case, out: Path):
    return ["extrapolate", c.base, "--run", c.run, "--method", "linear", "--target-step", "40", "--out", out]


def _linear_two_point_rest_base(c: Case, out: Path):
    return [
        "extrapolate",
        c.base,
        "--run",
        c.run,
        "--method",
        "linear",
        "--mode",
        "two-point",
        "--from",
        "0",
        "--target-step",
        "40",
        "--include",
        "model.layers.*",
        "--rest",
        "base",
        "--out",
        out,
    ]


def _alpharl(c: Case, out: Path):
    return ["extrapolate", c.base, "--method", "alpharl", "--fits", c.fits(), "--target-step", "40", "--out", out]


def _alpharl_container_last(c: Case, out: Path):
    return [
        "extrapolate",
        c.base,
        "--method",
        "alpharl",
        "--fits",
        c.fits(),
        "--target-step",
        "40",
        "--container",
        "last",
        "--last-checkpoint",
        c.last,
        "--out",
        out,
    ]


WRITERS = {
    f.__name__.lstrip("_"): f
    for f in (
        _reconstruct,
        _reconstruct_rest_checkpoint,
        _relex,
        _linear,
        _linear_two_point_rest_base,
        _alpharl,
        _alpharl_container_last,
    )
}


def _stored(folder: Path) -> dict:
    return reference_tensors(folder)


def assert_checkpoint_contract(out: Path, base: Path, *, untied: bool, transformers=None) -> None:
    """The contract of the module docstring; `untied`: the command reported that it untied the head."""
    got, want = _stored(out), _stored(base)
    base_tied = HEAD not in want
    expected_names = set(want) | ({HEAD} if untied and base_tied else set())
    assert set(got) == expected_names, (
        f"tensors differ from the base's: missing {sorted(expected_names - set(got))}, "
        f"extra {sorted(set(got) - expected_names)}"
    )
    for name, ref in got.items():
        src = want.get(name, want.get(EMB) if name == HEAD else None)
        assert ref.shape == src.shape, f"{name}: shape {ref.shape} != base {src.shape}"
        assert ref.dtype_code == src.dtype_code, f"{name}: dtype {ref.dtype_code} != base {src.dtype_code}"
    cfg = json.loads((out / "config.json").read_text())
    stores_head = HEAD in got
    assert cfg.get("tie_word_embeddings", True) is (not stores_head), (
        f"config.json tie_word_embeddings={cfg.get('tie_word_embeddings')} but lm_head stored={stores_head}"
    )
    dtypes = {SAFETENSORS_DTYPE[r.dtype_code] for r in got.values()}
    assert len(dtypes) == 1
    field = cfg.get("dtype", cfg.get("torch_dtype"))
    assert field == CONFIG_DTYPE[dtypes.pop()], f"config dtype {field!r} disagrees with the stored tensors"
    assert [cfg["vocab_size"], cfg["hidden_size"]] == list(got[EMB].shape)
    if transformers is not None:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        report = {k: list(v) for k, v in info.items() if v}
        assert not report, f"transformers load report of {out}: {report}"
        head, emb = model.lm_head.weight.detach(), model.model.embed_tokens.weight.detach()
        if stores_head:
            assert torch.equal(head, got[HEAD].tensor.to(head.dtype))
        else:
            assert head.data_ptr() == emb.data_ptr() or torch.equal(head, emb)
        assert torch.equal(emb, got[EMB].tensor.to(emb.dtype))


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.mark.integration
@pytest.mark.parametrize("writer", list(WRITERS))
def test_written_checkpoint_keeps_the_contract(case, writer, tmp_path, transformers):
    out = tmp_path / "out"
    r = run_main(*map(str, WRITERS[writer](case, out)), "--device", "cpu", "--quiet", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    untied = result.get("untied_lm_head", False) or any("tie_word_embeddings: false" in n for n in result["notes"])
    assert_checkpoint_contract(out, case.base, untied=untied, transformers=transformers)
    if case.head == "untied-by-training" and writer in (
        "relex",
        "linear",
        "reconstruct_rest_checkpoint",
        "alpharl_container_last",
    ):
        assert HEAD in _stored(out), f"{writer}: the run's own head was dropped"  # the head the run trained
    if case.head in ("untied", "untied-base-tied-run"):
        assert HEAD in _stored(out), f"{writer}: the base's own head was dropped"


@pytest.mark.integration
def test_demo_saver_keeps_the_contract(tmp_path, transformers):
    """The demo trainer's checkpoints (tied head, float32, one file: the only layout it writes)."""
    from rank1tools.demo.checkpoints import write_model_folder
    from rank1tools.demo.model import TinyLlama, TinyLlamaConfig

    torch.manual_seed(0)
    model = TinyLlama(TinyLlamaConfig())
    base, later = tmp_path / "base", tmp_path / "later"
    write_model_folder(base, model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3)
    write_model_folder(later, model)
    assert_checkpoint_contract(later, base, untied=False, transformers=transformers)


@pytest.mark.parametrize("head", ["untied", "untied-base-tied-run"])
def test_untied_base_head_is_extrapolated_like_any_tensor(head, tmp_path_factory, tmp_path):
    """The base's own head is extrapolated with the others (per-element least squares here, against
    an independent float64 computation); a checkpoint that ties its head contributes its embedding."""
    import numpy as np

    key = (head, "single", "fp32")
    if key not in _CASES:
        _CASES[key] = Case(tmp_path_factory.mktemp("-".join(key)), *key)
    c = _CASES[key]
    out = tmp_path / "out"
    r = run_main(
        "extrapolate",
        str(c.base),
        "--run",
        str(c.run),
        "--method",
        "linear",
        "--target-step",
        "40",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    b = _stored(c.base)[HEAD].tensor.double().numpy()
    hist = []
    for s in STEPS:
        t = _stored(c.run / f"checkpoint-{s}")
        hist.append((t[HEAD] if HEAD in t else t[EMB]).tensor.double().numpy() - b)
    t = np.array(STEPS, float)
    D = np.stack(hist)
    slope = np.tensordot(t - t.mean(), D - D.mean(axis=0), axes=1) / ((t - t.mean()) @ (t - t.mean()))
    want = b + D.mean(axis=0) + slope * (40 - t.mean())
    got = _stored(out)[HEAD].tensor.double().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
