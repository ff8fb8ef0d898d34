"""Inputs for the `rank1 report` tests (tests/test_report.py, tests/test_report_browser.py): the
planted synthetic demo and small command runs on it, a demo folder holding the GRPO demo's recorded
results (docs/commands/demo-run.json: the trained demo is too slow for these tests), and a
logprobs output of a tiny Llama built by transformers when the model extra is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from _support import run_main

DOCS = Path(__file__).resolve().parent.parent / "docs"
LOGPROB_STEPS = [10, 20, 30]
ROLLOUTS = [
    {"id": "a", "prompt": "2+3=", "completion": "5"},
    {"id": "b", "prompt": "12+30=", "completion": "42"},
    {"id": "c", "prompt": "7+7=", "completion": "14"},
]


def _ok(*args: str) -> None:
    r = run_main(*args, "-q")
    assert r.returncode == 0, (args, r.stderr)


def recorded_demo(folder: Path) -> Path:
    """A demo folder: the provenance and results.json of the recorded GRPO demo run."""
    folder.mkdir(parents=True)
    recorded = json.loads((DOCS / "commands" / "demo-run.json").read_text(encoding="utf-8"))
    (folder / "results.json").write_text(json.dumps(recorded["results"], indent=2, sort_keys=True) + "\n")
    provenance = {"argv": ["rank1", "demo", "--out", "demo-out"], "command": "demo", "inputs": [], "parameters": {}}
    provenance.update(tool="rank1tools", version="0.1.0")
    (folder / "rank1tools.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    return folder


def logprobs_output(root: Path) -> Path | None:
    """`rank1 logprobs` on a tiny Llama run (None without transformers)."""
    if importlib.util.find_spec("transformers") is None:
        return None
    import torch
    import transformers

    from rank1tools.demo.tokenizer import VOCAB, write_tokenizer

    config = transformers.LlamaConfig(
        vocab_size=len(VOCAB),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(root / "lpbase")
    write_tokenizer(root / "lpbase")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for s in LOGPROB_STEPS:
            for k, p in model.state_dict().items():
                p.copy_(base[k] * (1 + 0.01 * s) + 0.01 * torch.randn(p.shape, generator=g))
            model.save_pretrained(root / "lprun" / f"checkpoint-{s}")
    (root / "rollouts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROLLOUTS))
    out = root / "lp"
    _ok(
        "logprobs",
        str(root / "lpbase"),
        "--run",
        str(root / "lprun"),
        "--data",
        str(root / "rollouts.jsonl"),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-plots",
    )
    return out


def build_inputs(root: Path, *, with_logprobs: bool = True) -> dict[str, Path]:
    """name -> output folder: syn (the synthetic demo: decompose, rank-1), fits (fit-pls against
    the step), lin (linearity), relex (two targets), linear (one), bt (backtest relex) and demo."""
    syn = root / "syn"
    _ok("demo", "--synthetic", "--out", str(syn))
    base, run = str(syn / "base"), str(syn / "run")
    out = {"syn": syn, "fits": root / "fits", "lin": root / "lin", "relex": root / "relex", "linear": root / "linear"}
    out["bt"] = root / "bt"
    _ok("fit-pls", str(syn / "decompose"), "--out", str(out["fits"]), "--no-plots")
    _ok("linearity", base, "--run", run, "--steps", "10:40", "--out", str(out["lin"]), "--no-plots")
    _ok(
        "extrapolate",
        "relex",
        base,
        "--run",
        run,
        "--history-until",
        "40",
        "--target-step",
        "50,100",
        "--dtype",
        "float32",
        "--out",
        str(out["relex"]),
    )
    _ok(
        "extrapolate",
        "linear",
        base,
        "--run",
        run,
        "--history-until",
        "30",
        "--target-step",
        "50",
        "--dtype",
        "float32",
        "--out",
        str(out["linear"]),
    )
    _ok("backtest", base, "--run", run, "--method", "relex", "--cuts", "20,30", "--out", str(out["bt"]), "--no-plots")
    out["demo"] = recorded_demo(root / "demo")
    lp = logprobs_output(root) if with_logprobs else None
    if lp is not None:
        out["lp"] = lp
    return out
