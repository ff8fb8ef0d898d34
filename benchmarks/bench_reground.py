"""Benchmark: the cost of one re-grounding jump against one optimizer step, on the demo's policy and
on a 135M-shaped Llama (random weights). A jump is timed as the demo trainer runs it
(demo/reground.py: math/linear_step.extrapolate_state on the parameters, written back, and the
next segment's start copied) and as ReGroundCallback runs it in place (driven through its
on_step_end); an optimizer step is the demo's own GRPO step on the demo policy, and forward/backward
of a small batch + an Adam step on the 135M model. Medians of REPS runs taken in turn, in one
process; the extra anonymous memory during each is sampled every millisecond. Writes results/reground.json.
`--quick` (or BENCH_QUICK=1): a small model instead of the 135M one, one run, to check the script.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _mem import anon  # noqa: E402
from _report import extra, machine, quick_mode, report, row, table, target, write_results  # noqa: E402

QUICK = quick_mode()
M, N = 8, 8
if QUICK:
    LLAMA = dict(hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=1000)
    BATCH, TOKENS, REPS = 2, 32, 1
else:  # SmolLM2-135M's shape
    LLAMA = dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
    BATCH, TOKENS, REPS = 8, 128, 3


class _Peak:
    """Peak RssAnon above its value at the start, sampled every millisecond in a thread."""

    def __enter__(self):
        self.start = anon()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, anon())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, anon())

    @property
    def extra(self) -> int:
        return self.peak - self.start


def _timed(cases: dict, reps: int) -> dict:
    """Every case run in turn REPS times: median seconds, all seconds, largest extra memory."""
    out = {name: {"all": [], "extra": 0} for name in cases}
    for fn in cases.values():  # warm-up: first calls pay one-time setup
        fn()
    for _ in range(reps):
        for name, fn in cases.items():
            with _Peak() as peak:
                t = time.perf_counter()
                fn()
                out[name]["all"].append(round(time.perf_counter() - t, 4))
            out[name]["extra"] = max(out[name]["extra"], peak.extra)
            print(f"{name}: {out[name]['all'][-1]:.3f} s, +{peak.extra / 2**20:.0f} MiB", file=sys.stderr, flush=True)
    return {
        name: {"seconds": statistics.median(v["all"]), "all_seconds": v["all"], "extra_bytes": v["extra"]}
        for name, v in out.items()
    }


def _jumps(model) -> dict:
    """The two jump cases on `model`: the demo trainer's hook and the callback, each at step M of a segment."""
    from rank1tools.demo.reground import DemoReGround
    from rank1tools.integrations.trl import ReGroundCallback

    def demo_jump():
        hook(M, model)

    hook = DemoReGround(model, M, N, evaluate=lambda: 0.0)
    callback = ReGroundCallback(M, N)
    state = SimpleNamespace(global_step=0, log_history=[])

    def callback_jump():
        state.global_step = callback._segment_start + M
        callback.on_step_end(None, state, None, model=model)
        assert callback.jumps[-1]["jumped"], callback.jumps[-1]

    callback.on_step_end(None, state, None, model=model)  # starts the first segment
    return {"jump (demo trainer)": demo_jump, "jump (ReGroundCallback)": callback_jump}


def _demo_cases() -> tuple[dict, int]:
    import torch

    from rank1tools.demo import DemoTraining
    from rank1tools.demo.train import _GRPO, _generator, grpo_step, make_task, new_model

    config = DemoTraining()
    model, task = new_model(config), make_task(config)
    opt = torch.optim.Adam(model.parameters(), lr=config.grpo_lr, betas=(0.9, 0.99))
    gen = _generator(config.seed, _GRPO)
    grpo_step(model, opt, task, config, gen)  # Adam's moments exist from here on, as in training
    return {"optimizer step (a demo GRPO step)": lambda: grpo_step(model, opt, task, config, gen), **_jumps(model)}, (
        sum(p.numel() for p in model.parameters())
    )


def _llama_cases() -> tuple[dict, int]:
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=LLAMA["vocab"],
        hidden_size=LLAMA["hidden"],
        intermediate_size=LLAMA["intermediate"],
        num_hidden_layers=LLAMA["layers"],
        num_attention_heads=LLAMA["heads"],
        num_key_value_heads=LLAMA["kv_heads"],
        tie_word_embeddings=True,
        max_position_embeddings=max(512, TOKENS),
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    ids = torch.randint(0, LLAMA["vocab"], (BATCH, TOKENS), generator=torch.Generator().manual_seed(1))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # Adam's moments exist from here on
    return {"optimizer step (forward/backward + Adam)": step, **_jumps(model)}, sum(
        p.numel() for p in model.parameters()
    )


def main() -> None:
    sys.path.insert(0, str(HERE.parent / "src"))
    import torch

    info = machine()
    res = {"machine_info": info, "M": M, "N": N, "reps": REPS, "threads": torch.get_num_threads(), "models": {}}
    for key, build in (("demo", _demo_cases), ("llama", _llama_cases)):
        cases, params = build()
        res["models"][key] = {"parameters": params, "cases": _timed(cases, REPS)}
    res["llama_shape"], res["batch"], res["tokens"] = LLAMA, BATCH, TOKENS
    write_results("reground", res, summarise, QUICK)


MEASURED = """One re-grounding jump (M = N = 8: two-point, norms copied, every floating parameter) against one
optimizer step, in one process on the CPU, float32. Models: the demo's policy (0.57 M parameters,
`rank1 demo`'s TinyLlama) and a Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9 heads sharing
3 key/value heads, vocabulary 49152, tied embedding; random weights). A jump is timed as the demo
trainer runs it (demo/reground.py: math/linear_step.extrapolate_state, written back into the
parameters, the next segment's start copied) and as ReGroundCallback runs it in place (its
on_step_end at the segment's end); the optimizer step is the demo's own GRPO step (64 × 8 sampled
completions, two Adam passes) on the demo policy, and forward/backward of 8 random sequences of 128
tokens + an Adam step on the 135M model, with Adam's moments already allocated. Extra memory: the peak
of the process's anonymous resident memory during the operation above its value before, sampled
every millisecond."""

LABELS = {"demo": "demo policy", "llama": "135M-shaped Llama"}


def summarise(raw: dict) -> dict:
    rows, ratios = [], []
    for key, model in raw["models"].items():
        cases = model["cases"]
        step_name = next(c for c in cases if c.startswith("optimizer step"))
        base = f"{LABELS[key]}: {step_name}"
        for case, figures in cases.items():
            rows.append(
                row(
                    f"{LABELS[key]}: {case}",
                    figures["seconds"],
                    raw.get("reps", 1),
                    None if case == step_name else base,
                    figures["extra_bytes"],
                )
            )
        for case in cases:
            if case != step_name:
                ratios.append(
                    [
                        LABELS[key],
                        case,
                        model["parameters"],
                        round(cases[case]["seconds"] / cases[step_name]["seconds"], 4),
                        round(cases[case]["extra_bytes"] / (4 * model["parameters"]), 3),
                    ]
                )
    big = raw["models"]["llama"]["cases"]
    big_step = next(c for c in big if c.startswith("optimizer step"))
    worst = max(big[c]["seconds"] for c in big if c != big_step) / big[big_step]["seconds"]
    return report(
        raw,
        name="reground",
        title="Re-grounding: one jump against one optimizer step",
        issue="#22",
        measured=MEASURED,
        table=table(rows, memory="extra memory (sampled)"),
        tables=[
            extra(
                "A jump in optimizer steps, and its extra memory in float32 copies of the weights",
                ["model", "jump", "parameters", "jump / optimizer step (time)", "extra memory / weights"],
                ratios,
            )
        ],
        targets=[
            target(
                "jump_cost_135m",
                "a jump on the 135M-shaped model, in time, over one optimizer step (a jump is a few "
                "passes over the weights; a step is a forward and backward pass over a batch)",
                "<=",
                1.0,
                round(worst, 4),
                met_limit="A jump costs less than the step it saves; N saved steps cost one jump.",
                missed_limit="A jump costs more than an optimizer step here: re-grounding saves time only "
                "when N steps cost more than one jump.",
            )
        ],
        notes=[
            f"{raw.get('threads', '?')} torch threads on a machine other jobs shared (see the load average): "
            "absolute times move with the load, the ratios within a model less.",
            "The held state between jumps is one float32 copy of the parameters (the segment's start); "
            "a jump works through each tensor in chunks of 2M elements in float64.",
            "The demo trainer's jump builds a new state dict (a copy of the weights) and copies the next "
            "segment's start anew; the callback writes in place, chunk by chunk, into a start copy it "
            "reuses. Memory is sampled: a peak below a copy's size is memory the allocator reused, "
            "and figures under a few MB are noise.",
            "The demo's GRPO step samples its completions token by token; the 135M step has no sampling, "
            "so a real RL step (generation included) costs more than this one.",
        ],
    )


if __name__ == "__main__":
    main()
