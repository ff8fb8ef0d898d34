"""`rank1 logprobs`: how linearly the teacher-forced log-probabilities of a fixed set of rollouts
evolve over a run's checkpoints (docs/commands/logprobs.md), the output-space half of the
RLVR-linearity paper's measurement.

1. plan (plan.py): rollouts (io/rollouts.py), all or a seeded sample of them; the steps (base as
   step 0 unless --no-base; at least 3); every checkpoint checked against the base before any work;
2. scoring: one model (engine/model_loading.CausalLM) into which each checkpoint's weights are
   copied in turn; every selected sequence scored, `batch_size` at a time
   (engine/model_scoring, docs/concepts.md#teacher-forced-log-probabilities); each step's
   log-probs stored as soon as they are complete in the resumable store (io/logprob_store.py) of
   the work folder `.OUT.partial`, so an interrupted run, or a later run with more steps, scores
   only the steps it lacks (a previous output at --out, replaced with --force, lends its steps);
3. figures (figures.py) from the store read back (a resumed run equals a one-shot run byte for
   byte), tables (tables.py), summary, provenance, plots; the folder is published at --out.

Memory: one model and one batch while scoring; the figures hold the T × tokens matrix (float32,
and a float64 copy while fitting).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...engine.model_loading import CausalLM
from ...engine.model_scoring import model_context, score_batches, tokenize_pair
from ...errors import InputError
from ...io.compat import check_compatible
from ...io.logprob_store import (
    STORE_DIR,
    LogprobStoreWriter,
    SequenceEntry,
    build_manifest,
    ids_digest,
    read_logprob_store,
)
from ...io.output_lock import locked_output
from ...io.outputs import output_errors, publish
from ...io.rollouts import read_rollouts
from ...io.run_inputs import open_run_inputs
from ...io.work_folder import discard_unless_resumed, open_work_folder
from ...io.writer import provenance, write_provenance
from ...jsonutil import json_safe
from ...math.linefit import ElementFilter
from ...plot_common import draw_plots
from ...values import StepSelection
from ..gate import fail_below_gate
from .figures import FRAC_KEY, compute_figures
from .plan import (
    CONVENTION,
    MIN_STEPS,
    LogprobsOptions,
    check_options,
    file_sha256,
    scoring_key,
    select_sequences,
    trajectory_steps,
)
from .tables import summarize, write_tables

PLAN_FILE = "plan.json"  # in the work folder: a rerun finding another key starts over
__all__ = ["MIN_STEPS", "LogprobsOptions", "LogprobsResult", "check_options", "logprobs"]


@dataclass
class LogprobsResult:
    out: str
    steps: list[int]
    step_source: str
    sequences: int
    tokens: int
    summary: dict
    scored_steps: list[int]  # scored by this run
    reused_steps: list[int]  # found in the store (an interrupted run's, or a previous output's)
    notes: list[str] = field(default_factory=list)
    gate: dict | None = None
    plots: list[str] = field(default_factory=list)
    plot_hint: str | None = None

    def to_dict(self) -> dict:
        return json_safe(
            {
                "out": self.out,
                "steps": self.steps,
                "step_source": self.step_source,
                "sequences": self.sequences,
                "tokens": self.tokens,
                "summary": self.summary,
                "scored_steps": self.scored_steps,
                "reused_steps": self.reused_steps,
                "notes": self.notes,
                "gate": self.gate,
                "plots": self.plots,
            }
        )


def logprobs(
    base: str,
    checkpoints: list[str],
    out: str,
    *,
    data: str,
    run: str | None = None,
    steps: StepSelection | str | None = None,
    hub_run: dict | None = None,
    options: LogprobsOptions | None = None,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> LogprobsResult:
    """Score the rollouts of `data` under the base and every checkpoint; write the report to `out`."""
    options = options or LogprobsOptions()
    check_options(options)
    rollouts = read_rollouts(data)
    inputs = open_run_inputs(base, checkpoints, run, steps, hub_run)
    notes = list(inputs.notes)
    if inputs.step_source == "position":
        notes.append(
            "steps are the checkpoints' positions 1..T: no distinct trainer step could be read from their paths"
        )
    pairs = trajectory_steps(inputs.base, inputs.checkpoints, options.with_base, run or "CHECKPOINT arguments", notes)
    for s, ck in pairs:
        if ck is not inputs.base:
            check_compatible(inputs.base, ck, label=f"{ck.label} (step {s})")
    chosen = [rollouts[i] for i in select_sequences(len(rollouts), options.sample, options.seed)]
    with locked_output(out, force=force, inputs=[*inputs.local_paths(), Path(data)]) as target:
        return _run_locked(target, out, data, inputs, pairs, chosen, options, force, notes, progress)


def _run_locked(target, out, data, inputs, pairs, chosen, options, force, notes, progress) -> LogprobsResult:
    lm = CausalLM(inputs.base, options.model, load_base=False)  # weights read per step below
    context = model_context(lm.model)
    tokenized = [
        tokenize_pair(lm.tokenizer, r.prompt_input(), r.completion, f"{data}: line {r.line}", context) for r in chosen
    ]
    seqs, offset, flat = [], 0, []
    for r, p in zip(chosen, tokenized):
        scored = list(p.ids[p.start :])
        seqs.append(SequenceEntry(r.id, r.line, len(scored), offset, ids_digest(scored)))
        offset += len(scored)
        flat.extend(scored)
    scoring = {
        "convention": CONVENTION,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "device": lm.device.type,
        "batch_size": options.model.batch_size,
        "context": context,
    }
    rollouts_sha = file_sha256(data)
    key = scoring_key(
        rollouts_sha256=rollouts_sha, lines=[r.line for r in chosen], pairs=tokenized, base=inputs.base, scoring=scoring
    )
    import torch  # noqa: PLC0415

    work = open_work_folder(target, PLAN_FILE, (json.dumps({"command": "logprobs", "key": key}) + "\n").encode())
    store = LogprobStoreWriter(work / STORE_DIR, key, torch.tensor(flat, dtype=torch.int64))
    store.adopt(target / STORE_DIR, pairs)  # a previous output's steps (--force replaces it)
    reused = [s for s, ck in pairs if store.holds(s, ck)]
    todo = [(s, ck) for s, ck in pairs if s not in set(reused)]
    scored: list[int] = []
    if progress:
        progress(len(reused), len(pairs))
    try:
        current = None
        for s, ck in todo:
            if ck is not current:
                lm.load(ck)
                current = ck
            store.write(s, ck, _score(lm, tokenized, options.model.batch_size, ck, s))
            scored.append(s)
            if progress:
                progress(len(reused) + len(scored), len(pairs))
    except InputError:
        discard_unless_resumed(work, bool(reused or scored))
        raise
    manifest = build_manifest(
        key=key,
        rollouts={"source": str(data), "sha256": rollouts_sha, "selected_lines": [r.line for r in chosen]},
        scoring=scoring,
        base=inputs.base,
        sequences=seqs,
        steps=pairs,
    )
    store.finish(manifest, [s for s, _ in pairs])
    return _write_report(work, target, out, data, inputs, pairs, options, force, notes, scored, reused)


def _score(lm: CausalLM, tokenized, batch_size: int, ck, step: int):
    import torch  # noqa: PLC0415

    values = torch.cat(score_batches(lm.model, tokenized, batch_size))
    if not bool(torch.isfinite(values).all()):
        raise InputError(f"{ck.label} (step {step}): non-finite log-probabilities (NaN or Inf logits)")
    return values


def _write_report(work, target, out, data, inputs, pairs, options, force, notes, scored, reused) -> LogprobsResult:
    """Figures from the store read back, tables, summary, provenance, plots; publish."""
    store = read_logprob_store(work / STORE_DIR)
    lengths = [s.tokens for s in store.sequences]
    flt = ElementFilter(options.min_change, options.min_distinct)
    figs = compute_figures(store.steps, store.logprobs, lengths, flt)
    extra = {"with_base": options.with_base, "sample": options.sample, "seed": options.seed if options.sample else None}
    summary = summarize(
        figs,
        steps=store.steps,
        seqs=store.sequences,
        min_change=options.min_change,
        min_distinct=options.min_distinct,
        extra=extra,
    )
    gate = _gate(summary, options.fail_below)
    params = {
        "data": str(data),
        "steps": store.steps,
        "step_source": inputs.step_source,
        "with_base": options.with_base,
        "sample": options.sample,
        "seed": options.seed,
        "min_change": options.min_change,
        "min_distinct": options.min_distinct,
        "threshold": summary["threshold"],
        "fail_below": options.fail_below,
        **store.manifest["scoring"],
    }
    with output_errors(work):
        write_tables(work, store.sequences, store.steps, figs, summary)
        write_provenance(
            work,
            provenance("logprobs", [inputs.base, *(c for _, c in pairs if c is not inputs.base), str(data)], params),
        )
        plots, hint = ([], None)
        if options.plots:
            from ...plots_logprobs import logprobs_plots  # noqa: PLC0415

            plots, hint = draw_plots(lambda: logprobs_plots(figs, store.steps, store.sequences, work / "plots"))
        (work / PLAN_FILE).unlink()  # the work folder's, not the output's
    publish(work, target, force=force, label=out)
    return LogprobsResult(
        out=out,
        steps=store.steps,
        step_source=inputs.step_source,
        sequences=len(store.sequences),
        tokens=int(store.logprobs.shape[1]),
        summary=summary,
        scored_steps=scored,
        reused_steps=reused,
        notes=notes,
        gate=gate,
        plots=[str(Path(out) / Path(p).relative_to(work)) for p in plots],
        plot_hint=hint,
    )


def _gate(summary: dict, threshold: float | None) -> dict | None:
    return fail_below_gate(f"token {FRAC_KEY}", summary["headline"][FRAC_KEY], threshold)
