"""PEFT LoRA adapters as checkpoints (io/peft_adapter.py), against the real `peft` library.

Adapters are made by `peft` itself on tiny models built by `transformers` (random, non-zero B so
that every update is non-trivial); the reference for each tensor is peft's own
`merge_and_unload()`, and for decompose's singular values a dense float64 SVD of that update.
"""

from __future__ import annotations

import csv
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from rank1tools.errors import InputError
from rank1tools.io.sources import open_source

from _support import run_main

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = pytest.mark.integration


def _llama(tie: bool = False, hidden: int = 32):
    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def _gpt2():
    config = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().float() for k, v in model.state_dict().items()}


def _adapter(make_base, folder: Path, seed: int, **lora) -> dict[str, torch.Tensor]:
    """Save a peft adapter of `lora` (random A and B) on a fresh base; returns the merged weights."""
    base = make_base()
    lora.setdefault("init_lora_weights", False)  # B random, not zero: a non-trivial update
    torch.manual_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**lora))
    with torch.no_grad():  # a trained copy of each modules_to_save module
        for name, p in model.named_parameters():
            if ".modules_to_save." in name:
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(folder)
    return _state(model.merge_and_unload())


PLAIN = dict(
    r=4,
    lora_alpha=8,
    target_modules=["q_proj", "v_proj", "down_proj"],
    modules_to_save=["lm_head"],
    rank_pattern={"down_proj": 2},
    alpha_pattern={"layers.1.self_attn.q_proj": 3},
)


STEPS = (10, 20, 30)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    _llama().save_pretrained(root / "base")
    _gpt2().save_pretrained(root / "gpt2")
    _llama(tie=True).save_pretrained(root / "tied")
    merged = {
        "plain": _adapter(_llama, root / "plain", 1, **PLAIN),
        "rslora": _adapter(
            _llama, root / "rslora", 2, r=4, lora_alpha=16, use_rslora=True, target_modules="all-linear"
        ),
        "gpt2": _adapter(
            _gpt2, root / "gpt2-adapter", 3, r=4, lora_alpha=4, target_modules=["c_attn", "c_fc", "c_proj"]
        ),
        # LoRA on the embedding of a base that ties lm_head to it: the tied head moves with it
        "embedding": _adapter(lambda: _llama(tie=True), root / "embedding", 6, r=3, target_modules=["embed_tokens"]),
    }
    # a TRL-style run: checkpoint-N/ folders holding only an adapter (and trainer state)
    for step, seed in ((10, 11), (20, 12), (30, 13)):
        folder = root / "run" / f"checkpoint-{step}"
        merged[f"run{step}"] = _adapter(_llama, folder, seed, **PLAIN)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return root, merged


def _delta_reference(merged: dict, base: dict, name: str) -> np.ndarray:
    return (merged[name].double() - base[name].double()).numpy()


@pytest.mark.parametrize(
    ("adapter", "base"), [("plain", "base"), ("rslora", "base"), ("gpt2-adapter", "gpt2"), ("embedding", "tied")]
)
def test_every_tensor_equals_peft_merge_and_unload(world, adapter, base):
    root, merged = world
    ref = merged["gpt2" if adapter == "gpt2-adapter" else adapter]
    base_ck = open_source(str(root / base))
    ck = open_source(str(root / adapter), base=base_ck)
    assert ck.modules, "no LoRA module read"
    base_state = {n: base_ck.read(n) for n in base_ck.names}
    for name in ref:
        if name not in ck:
            continue  # a buffer transformers keeps out of the checkpoint
        got = ck.read(name)
        assert got.shape == ref[name].shape, name
        assert torch.allclose(got, ref[name], rtol=0, atol=1e-6), name
        if name in ck.modules:
            delta = ck.delta(name).double().numpy()
            np.testing.assert_allclose(delta, _delta_reference(ref, base_state, name), rtol=0, atol=1e-6)
            # rows and element ranges: the same values (a product of fewer rows may round differently)
            assert torch.allclose(ck.read(name, rows=(1, 3)), got[1:3], rtol=0, atol=1e-6)
            assert torch.allclose(ck.read_flat(name, 5, 77), got.reshape(-1)[5:77], rtol=0, atol=1e-6)
    if adapter == "plain":
        copy = pickle.loads(pickle.dumps(ck))  # as a Ray task receives it
        name = "model.layers.1.self_attn.q_proj.weight"
        assert torch.equal(copy.read(name), ck.read(name)) and copy.notes == ck.notes
        assert "lm_head.weight" in ck.full  # modules_to_save: the saved tensor replaces the base's
        assert not torch.equal(ck.read("lm_head.weight"), base_ck.read("lm_head.weight"))
        q1 = ck.modules["model.layers.1.self_attn.q_proj.weight"]
        assert (q1.rank, q1.scale) == (4, 3 / 4)  # alpha_pattern
        down = ck.modules["model.layers.0.mlp.down_proj.weight"]
        assert (down.rank, down.scale) == (2, 8 / 2)  # rank_pattern
    if adapter == "rslora":
        assert {m.scale for m in ck.modules.values()} == {16 / 2}  # lora_alpha / sqrt(r)
    if adapter == "gpt2-adapter":
        assert all(m.transpose for m in ck.modules.values())  # Conv1D: fan_in_fan_out
    if adapter == "embedding":
        assert list(ck.modules) == ["model.embed_tokens.weight"] and ck.lm_head_tied
        assert torch.allclose(ck.read("lm_head.weight"), ref["lm_head.weight"], rtol=0, atol=1e-6)


def _spectrum(out: Path) -> dict[tuple[str, int], dict]:
    with open(out / "spectrum.csv") as f:
        return {(r["module"], int(r["step"])): r for r in csv.DictReader(f)}


def test_decompose_of_a_trl_adapter_run_equals_a_dense_float64_svd(world, tmp_path):
    root, merged = world
    out = tmp_path / "dec"
    r = run_main("decompose", str(root / "base"), "--run", str(root / "run"), "--out", str(out), "--rank", "3", "-q")
    assert r.returncode == 0, r.stderr
    base = {n: t for n, t in _state(_llama()).items()}
    rows = _spectrum(out)
    manifest = json.loads((out / "manifest.json").read_text())
    modules = [m["name"] for m in manifest["modules"]]
    assert "model.layers.0.self_attn.q_proj.weight" in modules and "model.layers.0.mlp.up_proj.weight" in modules
    for name in modules:
        with safe_open(str(out / "factors" / (name + ".safetensors")), "pt") as f:
            S, U, V = f.get_tensor("S").double(), f.get_tensor("U").double(), f.get_tensor("V").double()
        for i, step in enumerate(STEPS):
            d = _delta_reference(merged[f"run{step}"], base, name)
            want = np.linalg.svd(d, compute_uv=False)[:3]
            scale = max(want[0], 1e-30)
            np.testing.assert_allclose(S[i].numpy(), want, rtol=0, atol=1e-5 * scale, err_msg=name)
            row = rows[(name, step)]
            lora = "q_proj" in name or "v_proj" in name
            untouched = not lora and "down_proj" not in name and "lm_head" not in name
            if untouched:
                assert want[0] == 0 and float(row["fro"]) == 0
                continue
            # q/v (r = 4 >= 3): the exact SVD from the factors; down_proj (r = 2 < 3): formed densely
            assert row["svd_method"] == ("factored" if lora else "exact"), (name, row["svd_method"])
            np.testing.assert_allclose(float(row["fro"]), np.linalg.norm(d), rtol=1e-5)
            Ud, Sd, Vdt = np.linalg.svd(d)
            k = int((want > 1e-6 * scale).sum())  # the rank-k part (defined: sigma_3 > sigma_4 here)
            recon = (U[i, :, :k] * S[i, :k]) @ V[i, :, :k].T
            np.testing.assert_allclose(recon.numpy(), (Ud[:, :k] * Sd[:k]) @ Vdt[:k], rtol=0, atol=1e-5 * scale)


def test_reconstruct_at_the_adapter_rank_gives_peft_merged_weights(world, tmp_path):
    root, merged = world
    base, ckpt = str(root / "base"), str(root / "run" / "checkpoint-20")
    r = run_main("reconstruct", base, ckpt, "--rank", "4", "--out", str(tmp_path / "rec"), "-q")
    assert r.returncode == 0, r.stderr
    ref = merged["run20"]
    with safe_open(str(tmp_path / "rec" / "model.safetensors"), "pt") as f:
        for name in f.keys():
            if "q_proj" in name or "down_proj" in name:  # rank 4 >= r: the whole update
                assert torch.allclose(f.get_tensor(name).float(), ref[name], rtol=0, atol=1e-5), name
    # from a factor store of the adapter run: the store knows the adapter by its content fingerprint
    r = run_main("decompose", base, "--run", str(root / "run"), "--out", str(tmp_path / "dec"), "--rank", "2", "-q")
    assert r.returncode == 0, r.stderr
    for tag, extra in (("dense", []), ("store", ["--factors", str(tmp_path / "dec")])):
        r = run_main("reconstruct", base, ckpt, "--rank", "2", *extra, "--out", str(tmp_path / tag), "-q")
        assert r.returncode == 0, r.stderr
    with safe_open(str(tmp_path / "dense" / "model.safetensors"), "pt") as fa:
        with safe_open(str(tmp_path / "store" / "model.safetensors"), "pt") as fb:
            for name in fa.keys():
                assert torch.allclose(fa.get_tensor(name), fb.get_tensor(name), rtol=0, atol=1e-5), name


@pytest.mark.parametrize(("m", "r", "n", "k"), [(40, 4, 24, 3), (3, 5, 30, 3), (50, 6, 20, 6)])
def test_factored_topk_equals_a_dense_float64_svd(m, r, n, k):
    from rank1tools.math.factored_svd import factored_topk

    g = torch.Generator().manual_seed(m + n)
    L, R = torch.randn(m, r, generator=g), torch.randn(r, n, generator=g)
    top, fro = factored_topk(L, R, k)
    M = (L.double() @ R.double()).numpy()
    U, S, Vt = np.linalg.svd(M)
    np.testing.assert_allclose(top.S.double().numpy(), S[:k], rtol=1e-6)
    np.testing.assert_allclose(fro, np.linalg.norm(M), rtol=1e-12)
    recon = (top.U.double() * top.S.double()) @ top.V.double().T
    np.testing.assert_allclose(recon.numpy(), (U[:, :k] * S[:k]) @ Vt[:k], rtol=0, atol=1e-5 * S[0])
    assert top.method == "factored"
    np.testing.assert_allclose((top.U.T.double() @ top.U.double()).numpy(), np.eye(k), atol=1e-6)


def test_mixed_adapter_and_full_checkpoints_in_one_run(world, tmp_path):
    """A run may hold adapters and full (merged) checkpoints side by side: each is read as it is."""
    root, merged = world
    run = tmp_path / "run"
    shutil.copytree(root / "run" / "checkpoint-10", run / "checkpoint-10")
    full = _llama()
    full.load_state_dict(merged["run20"])
    full.save_pretrained(run / "checkpoint-20")
    out = tmp_path / "dec"
    r = run_main("decompose", str(root / "base"), "--run", str(run), "--out", str(out), "--rank", "2", "-q")
    assert r.returncode == 0, r.stderr
    rows = _spectrum(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert rows[(name, 10)]["svd_method"] == "factored" and rows[(name, 20)]["svd_method"] == "exact"
    base = _state(_llama())
    want = np.linalg.svd(_delta_reference(merged["run20"], base, name), compute_uv=False)[:2]
    got = [float(rows[(name, 20)][f"sigma_{i}"]) for i in (1, 2)]
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _one_line_error(r, code: int, pattern: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


def _decompose(root: Path, adapter: Path, tmp_path: Path):
    return run_main("decompose", str(root / "base"), str(adapter), "--out", str(tmp_path / "out"), "--rank", "1", "-q")


def test_dora_and_other_peft_types_are_refused_in_one_line(world, tmp_path):
    root, _ = world
    _adapter(_llama, tmp_path / "dora", 4, r=2, target_modules=["q_proj"], use_dora=True)
    _one_line_error(_decompose(root, tmp_path / "dora", tmp_path), 3, r"adapter_config\.json: a DoRA adapter")
    base = _llama()
    peft.get_peft_model(base, peft.LoHaConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "loha")
    _one_line_error(_decompose(root, tmp_path / "loha", tmp_path), 3, r"peft_type 'LOHA' is not supported")
    assert not (tmp_path / "out").exists()


def test_an_adapter_of_another_shape_is_refused_naming_file_and_tensor(world, tmp_path):
    root, _ = world
    _adapter(lambda: _llama(hidden=48), tmp_path / "wide", 5, r=2, target_modules=["q_proj"])
    line = _one_line_error(_decompose(root, tmp_path / "wide", tmp_path), 3, r"do not fit base")
    assert "adapter_model.safetensors" in line and "lora_A.weight" in line and "q_proj.weight" in line


def test_missing_config_pickled_weights_and_adapter_as_base_are_refused(world, tmp_path):
    root, _ = world
    shutil.copytree(root / "plain", tmp_path / "noconfig")
    (tmp_path / "noconfig" / "adapter_config.json").unlink()
    _one_line_error(_decompose(root, tmp_path / "noconfig", tmp_path), 3, r"without adapter_config\.json")
    model = peft.get_peft_model(_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert (tmp_path / "pickled" / "adapter_model.bin").is_file()
    _one_line_error(_decompose(root, tmp_path / "pickled", tmp_path), 3, r"adapter_model\.bin is a pickle file")
    r = run_main("decompose", str(root / "plain"), str(root / "rslora"), "--out", str(tmp_path / "o"), "-q")
    _one_line_error(r, 3, r"BASE is a PEFT adapter")
    with pytest.raises(InputError, match="give its folder"):
        open_source(str(root / "plain" / "adapter_model.safetensors"))


def test_a_base_other_than_the_adapters_gives_a_note(world, tmp_path):
    root, _ = world
    shutil.copytree(root / "plain", tmp_path / "named")
    path = tmp_path / "named" / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "base_model_name_or_path": str(root / "gpt2")}))
    base = open_source(str(root / "base"))
    assert any(
        "is not the model the adapter was trained on" in n for n in open_source(str(path.parent), base=base).notes
    )
    path.write_text(json.dumps({**config, "base_model_name_or_path": str(root / "base")}))
    assert open_source(str(path.parent), base=base).notes == []


@pytest.fixture(scope="module")
def merged_run(world):
    """The adapter run's steps saved as full float32 checkpoints (peft's merged weights)."""
    root, merged = world
    for step in STEPS:
        model = _llama()
        model.load_state_dict(merged[f"run{step}"])
        model.save_pretrained(root / "merged-run" / f"checkpoint-{step}")
    return root / "merged-run"


def _csv_rows(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_linearity_and_extrapolate_read_an_adapter_run_as_its_merged_run(world, merged_run, tmp_path):
    root, _ = world
    base = str(root / "base")
    for run, tag in ((root / "run", "lora"), (merged_run, "full")):
        r = run_main("linearity", base, "--run", str(run), "--out", str(tmp_path / f"lin-{tag}"), "--no-plots", "-q")
        assert r.returncode == 0, r.stderr
        r = run_main(
            "extrapolate", "linear", base, "--run", str(run), "--target-step", "40", "--dtype", "float32",
            "--out", str(tmp_path / f"ext-{tag}"), "-q",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
    lora, full = _csv_rows(tmp_path / "lin-lora" / "linearity.csv"), _csv_rows(tmp_path / "lin-full" / "linearity.csv")
    assert [row["tensor"] for row in lora] == [row["tensor"] for row in full]
    for a, b in zip(lora, full):
        for key in ("explained_1", "coef_r2_1", "frac_r2_above_0.7"):
            if a[key] or b[key]:
                np.testing.assert_allclose(
                    float(a[key]), float(b[key]), rtol=1e-4, atol=1e-6, err_msg=(a["tensor"], key)
                )
    ext_lora = next((tmp_path / "ext-lora").rglob("model.safetensors"))
    ext_full = next((tmp_path / "ext-full").rglob("model.safetensors"))
    with safe_open(str(ext_lora), "pt") as fa, safe_open(str(ext_full), "pt") as fb:
        assert sorted(fa.keys()) == sorted(fb.keys())
        for name in fa.keys():
            assert torch.allclose(fa.get_tensor(name), fb.get_tensor(name), rtol=0, atol=1e-5), name


def test_a_hub_run_of_adapter_subfolders_equals_the_local_run(world, tmp_path, monkeypatch):
    """hf://: a repo of TRL checkpoint-N/ adapter folders (as TRL's push_to_hub uploads them), on
    the fake Hub of tests/hub_server.py; nothing leaves 127.0.0.1."""
    import socket

    from test_hub import _point_huggingface_hub

    from hub_server import FakeHub, folder_files

    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise OSError(f"test tried to reach {host!r}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    root, merged = world
    hub = FakeHub()
    files = {}
    for step in STEPS:
        files.update(folder_files(root / "run" / f"checkpoint-{step}", f"checkpoint-{step}/"))
    hub.create_repo("org/lora-run").commit("adapters", files)
    url = hub.start()
    try:
        _point_huggingface_hub(monkeypatch, url, tmp_path / "hf")
        base = str(root / "base")
        ck = open_source("hf://org/lora-run/checkpoint-20", base=open_source(base))
        name = "model.layers.1.self_attn.v_proj.weight"
        assert torch.allclose(ck.read(name), merged["run20"][name], rtol=0, atol=1e-6)
        for run, tag, extra in ((str(root / "run"), "local", []), ("hf://org/lora-run", "hub", ["--subfolders"])):
            out = tmp_path / tag
            r = run_main("decompose", base, "--run", run, *extra, "--out", str(out), "--rank", "2", "-q")
            assert r.returncode == 0, r.stderr
        assert (tmp_path / "local" / "spectrum.csv").read_bytes() == (tmp_path / "hub" / "spectrum.csv").read_bytes()
    finally:
        hub.stop()


def test_inspect_shows_an_adapter_folder_as_stored_with_its_config(world):
    root, _ = world
    r = run_main("inspect", str(root / "plain"), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    with safe_open(str(root / "plain" / "adapter_model.safetensors"), "pt") as f:
        assert data["tensors"] == len(list(f.keys()))
    assert data["adapter"]["peft_type"] == "LORA" and data["adapter"]["r"] == 4
    assert data["adapter"]["modules_to_save"] == ["lm_head"]
    assert "adapter" not in json.loads(run_main("inspect", str(root / "base"), "--json").stdout)


def test_a_model_loaded_from_an_adapter_gives_peft_merged_logits(world):
    """The engine that logprobs and generate run (engine/model_loading.CausalLM) on an adapter."""
    from rank1tools.engine.model_loading import CausalLM

    root, merged = world
    base = open_source(str(root / "base"))
    lm = CausalLM(base, tokenizer=object(), load_base=False)
    lm.load(open_source(str(root / "run" / "checkpoint-30"), base=base))
    reference = _llama()
    reference.load_state_dict(merged["run30"])
    ids = torch.tensor([[1, 5, 9, 2, 7, 3]])
    with torch.no_grad():
        got, want = lm.model(ids).logits, reference.eval()(ids).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4)


def test_export_lora_of_an_adapter_checkpoint_gives_its_update_back(world, tmp_path):
    """export-lora (and reconstruct --format peft) read an adapter CHECKPOINT on BASE, as the other
    commands do: at --rank >= the adapter's r the exported adapter merges to peft's own merge."""
    from rank1tools.io import open_source

    root, merged = world
    base, ckpt = root / "base", root / "run" / "checkpoint-20"
    for cmd, extra in (("export-lora", []), ("reconstruct", ["--format", "peft"])):
        out = tmp_path / cmd
        r = run_main(cmd, str(base), str(ckpt), "--rank", "4", *extra, "--out", str(out), "--device", "cpu", "-q")
        assert r.returncode == 0, r.stderr
        exported = open_source(str(out), base=open_source(str(base)))
        for name, ref in merged["run20"].items():
            if any(m in name for m in ("q_proj", "v_proj", "down_proj")):
                assert torch.allclose(exported.read(name), ref.float(), rtol=0, atol=1e-5), (cmd, name)
