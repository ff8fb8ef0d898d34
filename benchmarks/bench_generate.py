"""Benchmark: decoding throughput of `rank1 generate`'s loop (engine/logit_extrapolation.py), one model
(plain) and two (logit extrapolation), against transformers' own greedy `generate`, on the same small
random Llama, prompts and batches. Medians of REPS runs of each, taken in turn, in one process; writes results/generate.json.
`--quick` (or BENCH_QUICK=1): a smaller model, fewer tokens, one run, to check the script and its report.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import extra, machine, quick_mode, report, row, table, target, write_results  # noqa: E402

QUICK = quick_mode()
if QUICK:
    HIDDEN, LAYERS, VOCAB, PROMPTS, NEW, BATCH, REPS = 64, 2, 500, 8, 8, 4, 1
else:
    HIDDEN, LAYERS, VOCAB, PROMPTS, NEW, BATCH, REPS = 256, 4, 2000, 32, 32, 16, 3


class _Tokenizer:
    """What the decoder needs of a tokenizer when it is given token ids: no EOS (every sequence
    runs to max_new_tokens, so every case generates the same number of tokens)."""

    pad_token_id = 0
    eos_token_id = None

    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids, skip_special_tokens=True) -> str:
        return ""


def _model(seed: int):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=HIDDEN * 11 // 4,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        eos_token_id=None,
        bos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _interleaved(cases: dict, reps: int) -> tuple[dict, dict]:
    """Times of every case, run in turn REPS times (a load change on a shared machine hits every
    case alike instead of one), and each case's last tokens."""
    times: dict = {name: [] for name in cases}
    tokens: dict = {}
    for _ in range(reps):
        for name, fn in cases.items():
            start = time.perf_counter()
            tokens[name] = fn()
            times[name].append(time.perf_counter() - start)
            print(f"{name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return times, tokens


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    import torch

    from rank1tools.engine.extrapolated_model import extrapolated_model
    from rank1tools.engine.logit_extrapolation import LogitExtrapolation
    from rank1tools.engine.sampling import SamplingOptions

    info = machine()
    torch.manual_seed(0)
    a, b = _model(0), _model(1)
    g = torch.Generator().manual_seed(1)
    prompts = [
        torch.randint(1, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(16, 49, (PROMPTS,), generator=g)
    ]
    opts = SamplingOptions(max_new_tokens=NEW)
    tok = _Tokenizer()

    def ours(decoder):
        return lambda: [c.token_ids for c in decoder.generate_ids(prompts, opts, batch_size=BATCH)]

    def hf(model):
        def run():
            out = []
            for lo in range(0, len(prompts), BATCH):
                chunk = prompts[lo : lo + BATCH]
                width = max(map(len, chunk))
                ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
                with torch.inference_mode():
                    gen = model.generate(
                        input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0
                    )
                out += gen[:, width:].tolist()
            return out

        return run

    alpha = 2.0
    cases = {
        "plain": ours(LogitExtrapolation.single(b, tok, eos_ids=[])),
        "extrapolated": ours(LogitExtrapolation(a, b, tok, alpha=alpha, eos_ids=[])),
        "hf_plain": hf(b),
        "hf_extrapolated": hf(extrapolated_model(a, b, alpha)),
    }
    hf(b)()  # warm-up: first calls pay one-time setup
    res = {
        "machine_info": info,
        "hidden": HIDDEN,
        "layers": LAYERS,
        "vocab": VOCAB,
        "parameters": sum(p.numel() for p in b.parameters()),
        "prompts": PROMPTS,
        "new_tokens": NEW,
        "batch": BATCH,
        "reps": REPS,
        "threads": torch.get_num_threads(),
    }
    times, tokens = _interleaved(cases, REPS)
    for name, ts in times.items():
        seconds = statistics.median(ts)
        res[f"{name}_s"] = round(seconds, 4)
        res[f"all_{name}_s"] = [round(t, 4) for t in ts]
        print(f"{name}: {seconds:.3f} s, {PROMPTS * NEW / seconds:.0f} tokens/s", file=sys.stderr)
    res["same_as_hf_plain"] = sum(x == y for x, y in zip(tokens["plain"], tokens["hf_plain"])) / PROMPTS
    res["same_as_hf_extrapolated"] = (
        sum(x == y for x, y in zip(tokens["extrapolated"], tokens["hf_extrapolated"])) / PROMPTS
    )
    write_results("generate", res, summarise, QUICK)


MEASURED = """Greedy decoding of 32 prompts (random token ids, 16 to 48 tokens) × 32 new tokens each, in
left-padded batches of 16, with a random Llama (hidden 256, 4 layers, 8 heads sharing 4 key/value heads,
vocabulary 2000) in float32 on the CPU; no EOS, so every case generates the same 1024
tokens. `rank1 generate`'s loop (engine/logit_extrapolation.py) with one model (plain) and with two
(logits_A + 2 (logits_B − logits_A), each model with its own KV cache), against transformers' greedy
`generate` on model B and on the two-model wrapper (engine/extrapolated_model.py, whose caches are its
own). Models built once, outside the timings."""

PLAIN_HF = "transformers `generate`, one model"


def summarise(raw: dict) -> dict:
    n = raw["prompts"] * raw["new_tokens"]
    reps = raw.get("reps", 1)
    rows = [
        row("rank1 loop, one model (plain)", raw["plain_s"], reps, PLAIN_HF),
        row("rank1 loop, two models (extrapolated)", raw["extrapolated_s"], reps, "rank1 loop, one model (plain)"),
        row(PLAIN_HF, raw["hf_plain_s"], reps),
        row("transformers `generate` on the two-model wrapper", raw["hf_extrapolated_s"], reps, PLAIN_HF),
    ]
    rates = [
        ["rank1 loop, one model (plain)", round(n / raw["plain_s"], 1)],
        ["rank1 loop, two models (extrapolated)", round(n / raw["extrapolated_s"], 1)],
        [PLAIN_HF, round(n / raw["hf_plain_s"], 1)],
        ["transformers `generate` on the two-model wrapper", round(n / raw["hf_extrapolated_s"], 1)],
    ]
    ratio = raw["extrapolated_s"] / raw["plain_s"]
    targets = [
        target(
            "extrapolated_cost",
            "extrapolated decoding's time over plain decoding's (two forward passes per token, each "
            "over the new token only: about 2, not the quadratic cost of recomputing the prefix)",
            "<=",
            2.5,
            round(ratio, 3),
            met_limit="Each model runs over the new token with its own KV cache; the combination and "
            "the token choice are small next to two forward passes.",
            missed_limit="Something besides the two cached forward passes dominates: the per-row token "
            "choice on the CPU or the cache bookkeeping.",
        )
    ]
    return report(
        raw,
        name="generate",
        title="Decoding throughput: plain and extrapolated",
        issue="#21",
        measured=MEASURED,
        table=table(rows),
        tables=[
            extra("Tokens per second", ["case", "tokens/s"], rates),
            extra(
                "Same tokens as transformers' greedy generate (share of sequences)",
                ["comparison", "share"],
                [
                    ["plain: rank1 loop vs transformers `generate`", raw["same_as_hf_plain"]],
                    ["extrapolated: rank1 loop vs `generate` on the wrapper", raw["same_as_hf_extrapolated"]],
                ],
            ),
        ],
        targets=targets,
        notes=[
            f"The model has {raw['parameters'] / 1e6:.1f} M parameters per checkpoint (two for the extrapolated cases).",
            f"{raw.get('threads', '?')} torch threads on a machine other jobs shared (see the load average): "
            "the absolute rates move with the load, the ratios between cases of one run less.",
            "A step of the rank1 loop moves the batch's logits to the CPU and chooses each row's token "
            "there (per-sequence generators make sampling independent of the batch); on this model that "
            "costs little next to the forward passes.",
        ],
    )


if __name__ == "__main__":
    main()
