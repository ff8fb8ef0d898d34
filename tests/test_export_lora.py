"""rank1 export-lora: the adapter loads with the real `peft` on the base, merges to
`reconstruct --rank k`'s weights and gives its logits; B A against a float64 SVD; naming and
adapter_config.json against what `peft` itself saves; Conv1D, modules_to_save, options, exit codes,
output safety."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from _support import run_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.integration

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _read(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def _drift(model, seed: int, rank: int = 3, norms: bool = False) -> None:
    """Add a rank-`rank` update plus small dense noise to every 2-D weight in the blocks (and, with
    `norms`, change the norm weights), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name or ".h." in name:
                if p.ndim == 2 and name.endswith(".weight"):
                    m, n = p.shape
                    U, V = torch.randn(m, rank, generator=g), torch.randn(n, rank, generator=g)
                    S = torch.tensor([0.08, 0.03, 0.01][:rank])
                    p += (U * S) @ V.T / (m * n) ** 0.25 + 1e-4 * torch.randn(m, n, generator=g)
                elif norms and p.ndim == 1 and "norm" in name:
                    p += 0.05 * torch.randn(p.shape, generator=g)
        if norms:
            model.model.norm.weight += 0.05


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny untied Llama (float32) saved by transformers, and a checkpoint of it with a low-rank
    drift in every projection (plus changed norms in `ckpt_norms`)."""
    root = tmp_path_factory.mktemp("lora")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "base")
    _drift(model, 1)
    model.save_pretrained(root / "ckpt")
    _drift(model, 2, norms=True)
    model.save_pretrained(root / "ckpt_norms")
    assert (
        run_main(
            "decompose",
            str(root / "base"),
            str(root / "ckpt"),
            "--rank",
            "4",
            "--exact",
            "--out",
            str(root / "spectra"),
            "--device",
            "cpu",
            "--quiet",
        ).returncode
        == 0
    )
    return root


def _export(*args) -> tuple[int, dict | None, str]:
    r = run_main("export-lora", *map(str, args), "--device", "cpu", "--quiet", "--json")
    return r.returncode, (json.loads(r.stdout) if r.returncode == 0 else None), r.stderr


def _reconstruct(*args) -> None:
    r = run_main("reconstruct", *map(str, args), "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr


def _peft_merged(base: Path, adapter: Path):
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return peft.PeftModel.from_pretrained(model, adapter).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


IDS = torch.tensor([[1, 5, 9, 2, 33, 17, 4, 60], [7, 7, 3, 12, 50, 1, 0, 44]])


@pytest.mark.parametrize("source", ["factors", "direct"])
@pytest.mark.parametrize("norm_match", [True, False])
def test_peft_merge_equals_reconstruct_and_logits_match(llama, tmp_path, source, norm_match):
    k = 2
    extra = ["--factors", llama / "spectra"] if source == "factors" else ["--exact"]
    extra += [] if norm_match else ["--no-norm-match"]
    code, res, err = _export(llama / "base", llama / "ckpt", "--rank", k, *extra, "--out", tmp_path / "ad")
    assert code == 0, err
    assert res["rank"] == k and res["modules"] == 14 and res["used_factors"] == (source == "factors")
    assert res["target_modules"] == sorted(PROJ) and res["left_out"] == []
    _reconstruct(llama / "base", llama / "ckpt", "--rank", k, *extra, "--dtype", "float32", "--out", tmp_path / "rec")
    rec, base = _read(tmp_path / "rec"), _read(llama / "base")

    model = _peft_merged(llama / "base", tmp_path / "ad")
    with torch.no_grad():
        unmerged_logits = model(IDS).logits
    merged = model.merge_and_unload()
    state = {n: p.detach() for n, p in merged.state_dict().items()}
    assert set(state) >= set(rec)
    for name, w in rec.items():
        if any(p in name for p in PROJ):  # the update itself agrees to 1e-5 relative
            assert _rel(state[name] - base[name], w - base[name]) < 1e-5, name
        else:
            assert torch.equal(state[name], w), name
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rec", dtype=torch.float32).eval()
    with torch.no_grad():
        ref, got = want(IDS).logits, merged(IDS).logits
    assert float((got - ref).abs().max()) < 1e-4
    assert float((unmerged_logits - ref).abs().max()) < 1e-4


def test_factors_against_a_float64_svd(llama, tmp_path):
    """B A = c * dW_k with c = ||dW|| / ||dW_k||, dW_k from numpy's float64 SVD; B and A balanced."""
    code, _, err = _export(llama / "base", llama / "ckpt", "--rank", 2, "--exact", "--out", tmp_path / "ad")
    assert code == 0, err
    ad, base, ck = _read(tmp_path / "ad"), _read(llama / "base"), _read(llama / "ckpt")
    for name in [n for n in base if any(p in n for p in PROJ)]:
        D = ck[name].double().numpy() - base[name].double().numpy()
        U, S, Vt = np.linalg.svd(D, full_matrices=False)
        Dk = (U[:, :2] * S[:2]) @ Vt[:2]
        want = np.linalg.norm(D) / np.linalg.norm(Dk) * Dk
        module = "base_model.model." + name.removesuffix(".weight")
        A, B = ad[f"{module}.lora_A.weight"].double().numpy(), ad[f"{module}.lora_B.weight"].double().numpy()
        assert A.shape == (2, D.shape[1]) and B.shape == (D.shape[0], 2)
        assert np.linalg.norm(B @ A - want) / np.linalg.norm(want) < 1e-5, name
        np.testing.assert_allclose(np.linalg.norm(B, axis=0), np.linalg.norm(A, axis=1), rtol=1e-5)


def test_names_config_and_bytes_match_what_peft_saves(llama, tmp_path):
    code, res, err = _export(llama / "base", llama / "ckpt", "--rank", 3, "--out", tmp_path / "ad")
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(llama / "base", dtype=torch.float32)
    lc = peft.LoraConfig(r=3, lora_alpha=3, target_modules=res["target_modules"], task_type="CAUSAL_LM")
    peft.get_peft_model(model, lc).save_pretrained(tmp_path / "peft")
    ours, theirs = _read(tmp_path / "ad"), _read(tmp_path / "peft")
    assert {n: tuple(t.shape) for n, t in ours.items()} == {n: tuple(t.shape) for n, t in theirs.items()}
    assert all(t.dtype == torch.float32 for t in ours.values())
    cfg_ours = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    cfg_theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(cfg_ours) == set(cfg_theirs)
    differ = {k for k in cfg_ours if cfg_ours[k] != cfg_theirs[k]}
    assert sorted(cfg_ours["target_modules"]) == sorted(cfg_theirs["target_modules"])
    assert differ <= {"base_model_name_or_path", "target_modules", "peft_version"}
    assert cfg_ours["base_model_name_or_path"] == str(llama / "base")
    # the weight file is what safetensors' own save_file writes for the same tensors
    from safetensors.torch import save_file

    save_file(ours, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "ad" / "adapter_model.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert res["adapter_bytes"] == (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    assert res["checkpoint_bytes"] == sum(t.numel() * 4 for t in _read(llama / "ckpt").values())
    prov = json.loads((tmp_path / "ad" / "rank1tools.json").read_text())
    assert prov["command"] == "export-lora" and prov["parameters"]["rank"] == 3


def test_same_inputs_same_bytes(llama, tmp_path):
    for out in ("a", "b"):
        assert _export(llama / "base", llama / "ckpt", "--rank", 1, "--out", tmp_path / out)[0] == 0
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_selection_dtype_and_full_paths(llama, tmp_path):
    code, res, err = _export(
        llama / "base",
        llama / "ckpt",
        "--rank",
        1,
        "--include",
        "*layers.0.*q_proj*",
        "--include",
        "*v_proj*",
        "--dtype",
        "bfloat16",
        "--out",
        tmp_path / "ad",
    )
    assert code == 0, err
    assert res["target_modules"] == ["model.layers.0.self_attn.q_proj", "v_proj"] and res["dtype"] == "bfloat16"
    ad = _read(tmp_path / "ad")
    assert len(ad) == 6 and all(t.dtype == torch.bfloat16 for t in ad.values())
    model = _peft_merged(llama / "base", tmp_path / "ad")  # PEFT adds no layer the adapter does not fill
    lora_layers = [n for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(lora_layers) == sorted(
        "base_model.model." + n.removesuffix(".weight").removeprefix("")
        for n in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.v_proj.weight",
            "model.layers.1.self_attn.v_proj.weight",
        ]
    )


def test_left_out_and_modules_to_save(llama, tmp_path):
    code, res, err = _export(llama / "base", llama / "ckpt_norms", "--rank", 2, "--exact", "--out", tmp_path / "ad")
    assert code == 0, err
    left = {x["name"] for x in res["left_out"]}
    assert left == {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")
    }
    assert "5 tensors that changed are not in the adapter" in err and "--modules-to-save" in err

    code, res, err = _export(
        llama / "base", llama / "ckpt_norms", "--rank", 2, "--exact", "--modules-to-save", "--out", tmp_path / "saved"
    )
    assert code == 0, err
    assert res["left_out"] == [] and "model.norm" in res["modules_to_save"] and len(res["modules_to_save"]) == 5
    _reconstruct(
        llama / "base",
        llama / "ckpt_norms",
        "--rank",
        2,
        "--exact",
        "--rest",
        "checkpoint",
        "--dtype",
        "float32",
        "--out",
        tmp_path / "rec",
    )
    rec, base = _read(tmp_path / "rec"), _read(llama / "base")
    merged = _peft_merged(llama / "base", tmp_path / "saved").merge_and_unload()
    state = merged.state_dict()
    for name, w in rec.items():
        if any(p in name for p in PROJ):
            assert _rel(state[name] - base[name], w - base[name]) < 1e-5, name
        else:
            assert torch.equal(state[name], w), name


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(
        vocab_size=64,
        n_positions=16,
        n_embd=32,
        n_layer=2,
        n_head=4,
        initializer_range=0.3,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(root / "base")
    _drift(model, 3)
    model.save_pretrained(root / "ckpt")
    return root


def test_gpt2_conv1d_fan_in_fan_out(gpt2, tmp_path):
    code, res, err = _export(gpt2 / "base", gpt2 / "ckpt", "--rank", 2, "--exact", "--out", tmp_path / "ad")
    assert code == 0, err
    assert res["fan_in_fan_out"] is True and res["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    ad = _read(tmp_path / "ad")
    assert tuple(ad["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape) == (96, 2)
    _reconstruct(gpt2 / "base", gpt2 / "ckpt", "--rank", 2, "--exact", "--dtype", "float32", "--out", tmp_path / "rec")
    rec, base = _read(tmp_path / "rec"), _read(gpt2 / "base")
    model = _peft_merged(gpt2 / "base", tmp_path / "ad")
    with torch.no_grad():
        unmerged = model(IDS).logits
    merged = model.merge_and_unload()
    state = merged.state_dict()
    for name, w in rec.items():
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            assert _rel(state[name] - base[name], w - base[name]) < 1e-5, name
    want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "rec", dtype=torch.float32).eval()
    with torch.no_grad():
        assert float((unmerged - want(IDS).logits).abs().max()) < 1e-4


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--rank", "0"], 2, "--rank '0': expected a positive integer"),
        (["--rank", "x"], 2, "--rank 'x': expected a positive integer"),
        (["--rank", "40"], 2, "--rank 40 exceeds min(m, n) = 32 of model.layers.0.mlp.down_proj.weight [32, 48]"),
        (["--rank", "1", "--dtype", "int8"], 2, "--dtype"),
        (["--rank", "1", "--include", "*embed_tokens*"], 2, "model.embed_tokens.weight: an embedding"),
        (["--rank", "1", "--include", "*norm*"], 2, "no tensors selected"),
        (["--rank", "5", "--factors", "SPECTRA"], 2, "holds 4; rerun decompose with a larger --rank"),
    ],
)
def test_usage_errors_are_one_line(llama, tmp_path, args, code, message):
    args = [str(llama / "spectra") if a == "SPECTRA" else a for a in args]
    r = run_main(
        "export-lora", str(llama / "base"), str(llama / "ckpt"), *args, "--out", str(tmp_path / "ad"), "--device", "cpu"
    )
    assert r.returncode == code, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("rank1: error: ") and message in r.stderr
    assert not (tmp_path / "ad").exists() and list(tmp_path.iterdir()) == []


def test_a_head_tied_in_the_base_is_refused(tmp_path):
    """A checkpoint that unties the base's tied lm_head: a LoRA on the head would change the
    embedding too once merged, so it is refused; left out (and not saved in full) otherwise."""
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tensors = _read(tmp_path / "base")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 0.01
    (tmp_path / "ckpt").mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
    for args in (["--include", "lm_head.weight"], ["--all-2d"]):
        r = run_main(
            "export-lora",
            str(tmp_path / "base"),
            str(tmp_path / "ckpt"),
            "--rank",
            "1",
            *args,
            "--out",
            str(tmp_path / "ad"),
            "--device",
            "cpu",
        )
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert "lm_head.weight: tied to the embedding in base" in r.stderr and "--exclude 'lm_head.weight'" in r.stderr
    # --all-2d takes every other 2-D tensor but the embedding
    code, res, err = _export(
        tmp_path / "base",
        tmp_path / "ckpt",
        "--rank",
        1,
        "--all-2d",
        "--exclude",
        "lm_head.weight",
        "--modules-to-save",
        "--out",
        tmp_path / "ad",
    )
    assert code == 0, err
    assert res["modules"] == 7 and res["modules_to_save"] == []
    assert [(x["name"], x["reason"]) for x in res["left_out"]] == [
        ("lm_head.weight", "tied embedding / lm_head: saving one in full would untie them")
    ]


def test_input_errors(llama, tmp_path):
    other = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(other).save_pretrained(tmp_path / "other")
    r = run_main(
        "export-lora",
        str(llama / "base"),
        str(tmp_path / "other"),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "ad"),
        "--device",
        "cpu",
    )
    assert r.returncode == 3 and r.stderr.count("\n") == 1 and "shape" in r.stderr
    r = run_main(
        "export-lora",
        str(llama / "base"),
        str(llama / "ckpt_norms"),
        "--rank",
        "1",
        "--factors",
        str(llama / "spectra"),
        "--out",
        str(tmp_path / "ad"),
        "--device",
        "cpu",
    )
    assert r.returncode == 3 and "factor store holds no decomposition of" in r.stderr
    assert not (tmp_path / "ad").exists()


def test_output_safety(llama, tmp_path):
    out = tmp_path / "ad"
    assert _export(llama / "base", llama / "ckpt", "--rank", 1, "--out", out)[0] == 0
    code, _, err = _export(llama / "base", llama / "ckpt", "--rank", 1, "--out", out)
    assert code == 4 and "already exists; pass --force" in err
    code, res, err = _export(llama / "base", llama / "ckpt", "--rank", 2, "--out", out, "--force")
    assert code == 0 and res["rank"] == 2 and json.loads((out / "adapter_config.json").read_text())["r"] == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    code, _, err = _export(llama / "base", llama / "ckpt", "--rank", 1, "--out", mine, "--force")
    assert code == 4 and "was not written by rank1" in err and (mine / "notes.txt").read_text() == "keep"
    code, _, err = _export(llama / "base", llama / "ckpt", "--rank", 1, "--out", llama / "ckpt" / "ad")
    assert code == 4 and "inside" in err and not (llama / "ckpt" / "ad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ad", "mine"]  # no staging or lock left


def test_nonfinite_weights_leave_no_output(llama, tmp_path):
    tensors = _read(llama / "ckpt")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    (tmp_path / "bad").mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(llama / "ckpt" / "config.json", tmp_path / "bad")
    r = run_main(
        "export-lora",
        str(llama / "base"),
        str(tmp_path / "bad"),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "ad"),
        "--device",
        "cpu",
    )
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    assert "tensor 'model.layers.1.mlp.up_proj.weight' has non-finite values" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]  # no adapter, staging folder or lock


def test_library_options_are_checked():
    from rank1tools.commands.export_lora.plan import ExportLoraOptions
    from rank1tools.errors import UsageError

    for bad in ({"rank": 0}, {"rank": True}, {"dtype": "int8"}):
        with pytest.raises(UsageError):
            ExportLoraOptions(**bad)


def test_memory_is_checked_before_any_work(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", "20000")
    r = run_main(
        "export-lora",
        str(llama / "base"),
        str(llama / "ckpt"),
        "--rank",
        "1",
        "--out",
        str(tmp_path / "ad"),
        "--device",
        "cpu",
    )
    # the largest working set: an MLP projection's update and its SVD
    assert r.returncode == 3 and r.stderr.count("\n") == 1
    assert "tensor 'model.layers.0.mlp.down_proj.weight' [32, 48]: needs about" in r.stderr
    assert not (tmp_path / "ad").exists()


def test_an_exported_adapter_reads_back_as_the_reconstruction(llama, tmp_path):
    """Round trip through rank1's own PEFT reader (io/peft_adapter): the exported adapter opened on
    the base is, tensor for tensor, `reconstruct --rank k` of the same step (float32, 1e-5 of the
    tensor's largest value)."""
    from rank1tools.io.sources import open_source

    k = 2
    code, _, err = _export(llama / "base", llama / "ckpt", "--rank", k, "--exact", "--out", tmp_path / "ad")
    assert code == 0, err
    _reconstruct(
        llama / "base", llama / "ckpt", "--rank", k, "--exact", "--dtype", "float32", "--out", tmp_path / "rec"
    )
    want = _read(tmp_path / "rec")
    got = open_source(str(tmp_path / "ad"), base=open_source(str(llama / "base")))
    assert set(got.entries) == set(want)
    for name, w in want.items():
        g = got.read(name).float()
        scale = float(w.abs().max())
        assert float((g - w).abs().max()) <= 1e-5 * scale, name


@pytest.mark.parametrize("rest, save", [("base", []), ("checkpoint", ["--modules-to-save"])])
def test_reconstruct_format_peft_is_export_lora(llama, tmp_path, rest, save):
    """`reconstruct --format peft` writes export-lora's adapter for the same options, byte for byte
    (`--rest checkpoint` as `--modules-to-save`)."""
    k = 2
    args = [llama / "base", llama / "ckpt_norms", "--rank", k, "--exact"]
    code, _, err = _export(*args, *save, "--out", tmp_path / "export")
    assert code == 0, err
    r = run_main("reconstruct", *map(str, args), "--rest", rest, "--format", "peft", "--out", str(tmp_path / "rec"))
    assert r.returncode == 0, r.stderr
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "rec" / f).read_bytes() == (tmp_path / "export" / f).read_bytes(), f


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--rank", "1,2"], "one integer --rank"),
        (["--rank", "1%"], "one integer --rank"),
        (["--rank", "2", "--alpha", "2"], "--alpha 2 applies to merged checkpoints"),
    ],
)
def test_reconstruct_format_peft_refusals(llama, tmp_path, extra, words):
    r = run_main(
        "reconstruct",
        str(llama / "base"),
        str(llama / "ckpt"),
        *extra,
        "--format",
        "peft",
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def alpharl_fits(llama, tmp_path_factory):
    """A three-checkpoint run of the tiny Llama (base + growing low-rank drift), decomposed at rank
    1 and fitted against a metric: a fit store for extrapolate alpharl."""
    root = tmp_path_factory.mktemp("alpharl")
    model = transformers.AutoModelForCausalLM.from_pretrained(llama / "base", dtype=torch.float32)
    for step in (10, 20, 30):
        _drift(model, 100 + step)
        model.save_pretrained(root / "run" / f"checkpoint-{step}")
    (root / "m.csv").write_text("step,acc\n10,0.2\n20,0.3\n30,0.41\n")
    for args in (
        ["decompose", str(llama / "base"), "--run", str(root / "run"), "--rank", "1", "--out", str(root / "f")],
        ["fit-pls", str(root / "f"), "--metrics", str(root / "m.csv"), "--no-plots", "--out", str(root / "p")],
    ):
        r = run_main(*args, "-q")
        assert r.returncode == 0, (args[0], r.stderr)
    return root / "p"


def test_alpharl_format_peft_merges_to_the_checkpoint(llama, alpharl_fits, tmp_path):
    """extrapolate alpharl --format peft: a rank-1 adapter per target whose peft merge (and rank1's
    own reader) equals the checkpoint --format checkpoint writes, and whose logits match it."""
    common = ["extrapolate", str(llama / "base"), "--method", "alpharl", "--fits", str(alpharl_fits)]
    common += ["--target-metric", "0.5,0.6", "--dtype", "float32", "-q"]
    r = run_main(*common, "--out", str(tmp_path / "ck"))
    assert r.returncode == 0, r.stderr
    r = run_main(*common, "--format", "peft", "--out", str(tmp_path / "ad"), "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert [o["path"] for o in res["outputs"]] == [str(tmp_path / "ad" / f) for f in ("metric-0.5", "metric-0.6")]
    from rank1tools.io.sources import open_source

    for folder in ("metric-0.5", "metric-0.6"):
        config = json.loads((tmp_path / "ad" / folder / "adapter_config.json").read_text())
        assert config["r"] == 1 and config["lora_alpha"] == 1
        want = _read(tmp_path / "ck" / folder)
        merged = _peft_merged(llama / "base", tmp_path / "ad" / folder).merge_and_unload().state_dict()
        ours = open_source(str(tmp_path / "ad" / folder), base=open_source(str(llama / "base")))
        for name, w in want.items():
            assert _rel(merged[name], w) <= 1e-6, name
            assert _rel(ours.read(name).float(), w) <= 1e-6, name
        written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck" / folder, dtype=torch.float32)
        adapter = _peft_merged(llama / "base", tmp_path / "ad" / folder)
        with torch.no_grad():
            torch.testing.assert_close(adapter(IDS).logits, written.eval()(IDS).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--method", "alpharl", "--container", "last", "--format", "peft"], "--container base only"),
        (["--method", "relex", "--run", "RUN", "--target-step", "40", "--format", "peft"], "--format"),
    ],
)
def test_extrapolate_format_peft_refusals(llama, alpharl_fits, tmp_path, args, words):
    args = [a.replace("RUN", str(alpharl_fits.parent / "run")) for a in args]
    extra = ["--fits", str(alpharl_fits), "--target-metric", "0.5"] if "alpharl" in args else []
    r = run_main("extrapolate", str(llama / "base"), *args, *extra, "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("conv1d", [False, True])
def test_alpharl_adapter_rounding_figure_of_square_factors(conv1d):
    """The rounding figure of a rank-1 adapter pairs the factors by the layer's orientation, also
    for a square Conv1D (where their lengths cannot tell): float32 factors lose only float32 rounding, bfloat16
    ones lose what a direct float64 computation says."""
    from rank1tools.commands.extrapolate.alpharl_adapter import factors, rounding_error_sq

    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    B, A = factors(x, v, conv1d)
    err, want = rounding_error_sq(x, v, B, A, conv1d)
    assert want == pytest.approx(float((torch.outer(x, v) ** 2).sum()))
    assert err <= 1e-12 * want
    Bc, Ac = B.to(torch.bfloat16), A.to(torch.bfloat16)
    product = (Bc.double() @ Ac.double()).T if conv1d else Bc.double() @ Ac.double()
    err, _ = rounding_error_sq(x, v, Bc, Ac, conv1d)
    assert err == pytest.approx(float(((product - torch.outer(x, v)) ** 2).sum()), rel=1e-6)
