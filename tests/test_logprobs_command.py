"""`rank1 logprobs` end to end on a tiny run of a Llama built by transformers
(docs/commands/logprobs.md): stored log-probs against a direct from_pretrained forward per
checkpoint, figures against numpy from the stored matrix, resume byte for byte, store validation,
CLI exit codes and --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from rank1tools.commands.logprobs import LogprobsOptions, logprobs
from rank1tools.demo.tokenizer import VOCAB, encode
from rank1tools.engine.model_loading import ModelOptions
from rank1tools.errors import InputError, UsageError
from rank1tools.io.logprob_store import read_logprob_store

from _support import build_tiny_llama_line_run, run_main

pytestmark = pytest.mark.integration

STEPS = [10, 20, 30, 40]
ROLLOUTS = [
    {"id": "a", "prompt": "2+3=", "completion": "5"},
    {"id": 7, "prompt": "12+30=", "completion": "42"},
    {"prompt": "7+7=", "completion": "14+0"},
    {"prompt": "9999+1=", "completion": "10000"},
    {"prompt": "", "completion": "3"},
    {"prompt": "1+1+1+1=", "completion": "4444"},
]
CPU = ModelOptions(device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, transformers):
    """base/ and run/checkpoint-{10..40}/: a Llama whose weights move along a line plus noise."""
    root = build_tiny_llama_line_run(tmp_path_factory.mktemp("lp"), transformers, STEPS)
    data = root / "rollouts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROLLOUTS))
    return root


def _run(tiny_run, out, **kw):
    kw.setdefault("options", LogprobsOptions(model=CPU, plots=False))
    return logprobs(
        str(tiny_run / "base"), [], str(out), data=str(tiny_run / "rollouts.jsonl"), run=str(tiny_run / "run"), **kw
    )


def _reference(transformers, folder: Path) -> np.ndarray:
    """Per rollout, log p(completion token | everything before it) from one full forward of
    from_pretrained, log_softmax and gather; concatenated in rollout order."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for r in ROLLOUTS:
        ids, start = encode(r["prompt"] + r["completion"]), len(encode(r["prompt"]))
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        out += [float(lp[t - 1, ids[t]]) for t in range(start, len(ids))]
    return np.array(out)


@pytest.fixture(scope="module")
def one_shot(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "lp"
    return _run(tiny_run, out), out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_stored_logprobs_equal_a_direct_forward(tiny_run, one_shot, transformers):
    result, out = one_shot
    store = read_logprob_store(out)
    assert store.steps == [0, *STEPS] == result.steps
    assert [s.line for s in store.sequences] == list(range(1, len(ROLLOUTS) + 1))
    assert [s.id for s in store.sequences[:2]] == ["a", 7]
    assert [s.tokens for s in store.sequences] == [len(r["completion"]) for r in ROLLOUTS]
    for i, folder in enumerate([tiny_run / "base", *(tiny_run / "run" / f"checkpoint-{s}" for s in STEPS)]):
        np.testing.assert_allclose(store.logprobs[i].numpy(), _reference(transformers, folder), rtol=0, atol=1e-5)
    want_ids = [i for r in ROLLOUTS for i in encode(r["completion"], bos=False)]
    assert store.token_ids.tolist() == want_ids


def test_figures_equal_numpy_from_the_stored_matrix(one_shot):
    result, out = one_shot
    store = read_logprob_store(out / "logprobs")
    Y = store.logprobs.numpy().astype(np.float64)
    t = np.array(store.steps, dtype=np.float64)
    r2 = np.array([np.corrcoef(t, Y[:, j])[0, 1] ** 2 for j in range(Y.shape[1])])
    keep = (Y.max(0) - Y.min(0)) > 0
    s = json.loads((out / "summary.json").read_text())
    assert s == result.summary
    h = s["headline"]
    assert h["kept"] == int(keep.sum()) == Y.shape[1]
    assert h["frac_r2_above_0.7"] == pytest.approx(float((r2[keep] > 0.7).mean()))
    assert h["r2_mean"] == pytest.approx(float(r2[keep].mean()), rel=1e-9)
    assert h["r2_median"] == pytest.approx(float(np.median(r2[keep])), rel=1e-9)
    rows = [json.loads(line) for line in (out / "sequences.jsonl").read_text().splitlines()]
    offsets = np.cumsum([0] + [r["tokens"] for r in rows])
    for row, a, b in zip(rows, offsets[:-1], offsets[1:]):
        sums = Y[:, a:b].sum(axis=1)
        assert row["sum_r2"] == pytest.approx(np.corrcoef(t, sums)[0, 1] ** 2, rel=1e-9)
        assert row["sum_logprob_last"] == pytest.approx(sums[-1], rel=1e-12)
    traj = (out / "trajectories.csv").read_text().splitlines()
    assert traj[0] == "sequence,id,line,step_0,step_10,step_20,step_30,step_40"
    assert traj[1].startswith("0,a,1,") and traj[2].startswith("1,7,2,") and traj[3].startswith("2,,3,")
    steps_rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps_rows] == store.steps
    assert steps_rows[2]["mean_logprob_per_token"] == pytest.approx(Y[2].mean(), rel=1e-12)
    assert [json.loads(line)["bucket"] for line in (out / "buckets.jsonl").read_text().splitlines()] == [
        "early",
        "middle",
        "late",
    ]
    prov = json.loads((out / "rank1tools.json").read_text())
    assert prov["command"] == "logprobs" and prov["parameters"]["dtype"] == "float32"


def test_filters_report_their_counts(tiny_run, tmp_path, one_shot):
    _, out1 = one_shot
    Y = read_logprob_store(out1).logprobs.numpy().astype(np.float64)
    change = float(np.median(Y.max(0) - Y.min(0)))  # removes about half the tokens
    opts = LogprobsOptions(model=CPU, plots=False, min_change=change, min_distinct=5)
    s = _run(tiny_run, tmp_path / "f", options=opts).summary
    moved = (Y.max(0) - Y.min(0)) > change
    distinct = np.array([len(np.unique(Y[:, j].astype(np.float32))) for j in range(Y.shape[1])]) >= 5
    assert s["filter"]["removed_min_change"] == int((~moved).sum()) > 0
    assert s["filter"]["removed_min_distinct"] == int((moved & ~distinct).sum())
    assert s["filter"]["kept"] == s["headline"]["kept"] == int((moved & distinct).sum())


def test_resume_after_an_interruption_and_with_more_steps_equals_one_shot(tiny_run, tmp_path, one_shot):
    _, full = one_shot
    out = tmp_path / "lp"

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run(tiny_run, out, progress=stop_after_two)
    assert not out.exists() and (tmp_path / ".lp.partial").is_dir()
    r = _run(tiny_run, out)
    assert r.reused_steps == [0, 10] and r.scored_steps == [20, 30, 40]
    assert _files(out) == _files(full)

    out2 = tmp_path / "lp2"  # a window first, then the whole run into the same --out
    first = _run(tiny_run, out2, steps="10,20")
    assert first.steps == [0, 10, 20]
    r = _run(tiny_run, out2, force=True)
    assert r.reused_steps == [0, 10, 20] and r.scored_steps == [30, 40]
    assert _files(out2) == _files(full)


def test_a_sample_of_sequences_and_no_base(tiny_run, tmp_path):
    opts = LogprobsOptions(model=CPU, plots=False, sample=3, seed=5, with_base=False)
    r = _run(tiny_run, tmp_path / "s", options=opts)
    store = read_logprob_store(tmp_path / "s")
    assert r.steps == STEPS and len(store.sequences) == 3 == r.sequences
    lines = [s.line for s in store.sequences]
    assert lines == sorted(lines) and r.summary["sample"] == 3 and r.summary["seed"] == 5


def test_store_validation(one_shot, tmp_path):
    _, out = one_shot
    bad = tmp_path / "bad"
    shutil.copytree(out / "logprobs", bad)
    (bad / "step-20.safetensors").unlink()
    with pytest.raises(InputError, match=r"step-20.safetensors: missing \(the manifest lists step 20\)"):
        read_logprob_store(bad)
    shutil.copy(bad / "step-10.safetensors", bad / "step-20.safetensors")
    with pytest.raises(InputError, match="holds step 10 of another store, not step 20"):
        read_logprob_store(bad)
    shutil.rmtree(bad)
    shutil.copytree(out / "logprobs", bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["format"] = "something.else"
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="not a rank1tools log-prob store"):
        read_logprob_store(bad)
    m["format"], m["format_version"] = "rank1tools.logprobs", 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="format_version 99 is not supported"):
        read_logprob_store(bad)
    m["format_version"] = 1
    m["sequences"][1]["offset"] += 1
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="sequence 1 of the manifest is malformed"):
        read_logprob_store(bad)
    (bad / "manifest.json").write_text("{")
    with pytest.raises(InputError, match="manifest"):
        read_logprob_store(bad)
    with pytest.raises(InputError, match="not a log-prob store"):
        read_logprob_store(tmp_path)
    (bad / "step-10.safetensors").write_bytes(b"garbage")
    shutil.copy(out / "logprobs" / "manifest.json", bad / "manifest.json")
    with pytest.raises(InputError, match="step-10.safetensors: unreadable log-prob step file"):
        read_logprob_store(bad)


def test_errors(tiny_run, tmp_path):
    data = tmp_path / "r.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": ""}\n')
    with pytest.raises(InputError, match=r"r.jsonl: line 2: empty `completion`"):
        logprobs(str(tiny_run / "base"), [], str(tmp_path / "o"), data=str(data), run=str(tiny_run / "run"))
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": "1+1=", "completion": "' + "1" * 20 + '"}\n')
    with pytest.raises(
        InputError, match=r"r.jsonl: line 2: prompt \+ completion are 25 tokens, past the model's context of 16"
    ):
        logprobs(
            str(tiny_run / "base"),
            [],
            str(tmp_path / "o"),
            data=str(data),
            run=str(tiny_run / "run"),
            options=LogprobsOptions(model=CPU),
        )
    with pytest.raises(UsageError, match=r"2 steps \(\[0, 10\]\); a log-prob line fit needs at least 3"):
        _run(tiny_run, tmp_path / "o", steps="10")
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def _cli(tiny_run, out, *extra):
    return run_main(
        "logprobs",
        str(tiny_run / "base"),
        "--run",
        str(tiny_run / "run"),
        "--data",
        str(tiny_run / "rollouts.jsonl"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-plots",
        "-q",
        *extra,
    )


def _one_line(r, code, text):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: ") and text in lines[0], r.stderr


def test_cli_json_gate_and_errors(tiny_run, tmp_path, one_shot, transformers):
    result, _ = one_shot
    r = _cli(tiny_run, tmp_path / "c", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["steps"] == [0, *STEPS] and got["summary"] == result.summary and got["tokens"] == result.tokens
    r = _cli(tiny_run, tmp_path / "c", "--json", "--force", "--fail-below", "1")
    assert (
        r.returncode == 5
        and "gate: token frac_r2_above_0.7" in r.stderr
        and json.loads(r.stdout)["gate"]["passed"] is False
    )
    r = _cli(tiny_run, tmp_path / "c")
    _one_line(r, 4, "already exists; pass --force to replace it")
    r = _cli(tiny_run, tmp_path / "d", "--steps", "10")
    _one_line(r, 2, "a log-prob line fit needs at least 3")
    r = _cli(tiny_run, tmp_path / "d", "--min-distinct", "0")
    assert r.returncode == 2
    r = run_main(
        "logprobs",
        str(tiny_run / "base"),
        "--run",
        str(tiny_run / "run"),
        "--data",
        str(tmp_path / "nope.jsonl"),
        "--out",
        str(tmp_path / "d"),
    )
    _one_line(r, 3, "nope.jsonl")
    r = run_main("logprobs", str(tiny_run / "base"), "--run", str(tiny_run / "run"), "--out", str(tmp_path / "d"))
    assert r.returncode == 2 and "--data" in r.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    r = _cli(tiny_run, foreign, "--force")  # --force replaces only a folder rank1 wrote
    _one_line(r, 4, "was not written by rank1")
    assert (foreign / "notes.txt").read_text() == "mine"
    r = _cli(tiny_run, tiny_run / "run" / "out")  # inside an input
    _one_line(r, 4, "outputs must not be inside or contain an input")
    # a checkpoint that is not of the base's model
    odd = tmp_path / "odd"
    cfg = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(odd / "checkpoint-5")
    r = run_main(
        "logprobs",
        str(tiny_run / "base"),
        str(odd / "checkpoint-5"),
        str(tiny_run / "run" / "checkpoint-10"),
        "--data",
        str(tiny_run / "rollouts.jsonl"),
        "--out",
        str(tmp_path / "d"),
        "--device",
        "cpu",
        "-q",
    )
    _one_line(r, 3, "checkpoint-5 (step 5)")
    assert not (tmp_path / "d").exists()


def test_plots(tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    r = _run(tiny_run, tmp_path / "p", options=LogprobsOptions(model=CPU), steps="10,20")
    names = sorted(Path(p).name for p in r.plots)
    stems = ["logprob_by_step", "r2_by_bucket", "sequence_trajectories", "token_r2_histogram"]
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("png", "svg"))
    assert all(Path(p).stat().st_size > 0 for p in r.plots)
