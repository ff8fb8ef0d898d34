"""`rank1 generate`: completions from a checkpoint, or from two checkpoints' extrapolated logits."""

from __future__ import annotations

import sys

import typer

from ..errors import UsageError
from .app import Rank1Command, app, check_common_early, interrupt_hint, print_json, print_result_notes, stderr_progress
from .params import BATCH_SIZE_OPT, DEVICE_OPT, FORCE_OPT, JSON_OPT, MODEL_DTYPE_OPT, QUIET_OPT, number, out_option


@app.command(cls=Rank1Command)
def generate(
    model: str = typer.Argument(
        ...,
        metavar="MODEL",
        help="Checkpoint to decode from (the later one, B, with --extrapolate-from): folder or hf:// repo.",
    ),
    prompts: str = typer.Option(
        ..., "--prompts", metavar="FILE", help="Prompts JSONL: `prompt` or `messages` per line, optional `id`."
    ),
    out: str = out_option("Completions JSONL to write (rollouts format)."),
    extrapolate_from: str | None = typer.Option(
        None,
        "--extrapolate-from",
        metavar="A",
        help="Earlier checkpoint A: decode from logits_A + α(logits_B − logits_A).",
    ),
    target_step: float | None = typer.Option(
        None,
        "--target-step",
        metavar="S",
        parser=number("--target-step"),
        help="With --extrapolate-from: α = (S − A)/(B − A), steps from the paths.",
    ),
    alpha: float | None = typer.Option(
        None, "--alpha", metavar="X", parser=number("--alpha"), help="With --extrapolate-from: α itself."
    ),
    step_a: int | None = typer.Option(
        None,
        "--step-a",
        metavar="N",
        parser=number("--step-a", at_least=0, integer=True),
        help="A's step, when its path has none.",
    ),
    step_b: int | None = typer.Option(
        None,
        "--step-b",
        metavar="N",
        parser=number("--step-b", at_least=0, integer=True),
        help="MODEL's step, when its path has none.",
    ),
    n: int = typer.Option(
        1, "--n", metavar="K", parser=number("--n", at_least=1, integer=True), help="Completions per prompt."
    ),
    temperature: float = typer.Option(
        0.0, "--temperature", metavar="T", parser=number("--temperature", at_least=0), help="0 = greedy (default)."
    ),
    top_p: float = typer.Option(
        1.0,
        "--top-p",
        metavar="P",
        parser=number("--top-p", above=0, at_most=1),
        help="Nucleus sampling mass (1 = all).",
    ),
    max_new_tokens: int = typer.Option(
        256,
        "--max-new-tokens",
        metavar="N",
        parser=number("--max-new-tokens", at_least=1, integer=True),
        help="Most tokens per completion.",
    ),
    seed: int = typer.Option(
        0, "--seed", metavar="SEED", parser=number("--seed", at_least=0, integer=True), help="Sampling seed."
    ),
    base: str | None = typer.Option(
        None, "--base", metavar="BASE", help="Config and tokenizer from BASE (when MODEL has weights only)."
    ),
    tokenizer: str | None = typer.Option(None, "--tokenizer", metavar="PATH", help="Tokenizer folder or hf:// repo."),
    answer_field: str | None = typer.Option(
        None,
        "--answer-field",
        metavar="NAME",
        help="Score each completion: its last \\boxed answer or number against the prompt line's NAME field.",
    ),
    device: str = DEVICE_OPT,
    dtype: str = MODEL_DTYPE_OPT,
    batch_size: int = BATCH_SIZE_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Completions of a prompts file, written as rollouts JSONL (the input of `rank1 logprobs`).

    With --extrapolate-from A, every token comes from logits_A + α(logits_B − logits_A) of the two
    checkpoints (logit extrapolation; docs/commands/generate.md). Greedy unless --temperature.
    """
    from ..engine.model_loading import ModelOptions
    from ..engine.sampling import SamplingOptions

    if extrapolate_from is None:
        given = [
            o
            for o, v in (("--target-step", target_step), ("--alpha", alpha), ("--step-a", step_a), ("--step-b", step_b))
            if v is not None
        ]
        if given:
            raise UsageError(f"{given[0]} applies with --extrapolate-from A")
    sampling = SamplingOptions(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    model_opts = ModelOptions(device=device, dtype=dtype, batch_size=batch_size)
    check_common_early(device)
    from ..commands.generate import Extrapolation, GenerateOptions, resolve_alpha
    from ..io.output_file import check_output_file
    from ..io.sources import is_hub_source

    extrapolation = None
    if extrapolate_from is not None:
        extrapolation = Extrapolation(extrapolate_from, alpha, target_step, step_a, step_b)
        resolve_alpha(model, extrapolation)  # option errors before any heavy import
    inputs = [p for p in (model, prompts, extrapolate_from, base, tokenizer) if p and not is_hub_source(p)]
    check_output_file(out, force=force, inputs=inputs)

    from ..commands.generate import generate as run_generate

    options = GenerateOptions(
        n=n, sampling=sampling, model=model_opts, base=base, tokenizer=tokenizer, answer_field=answer_field
    )
    bar, update = stderr_progress(not quiet, "generate")
    with interrupt_hint("nothing was written", out), bar:
        result = run_generate(
            model, prompts, out, extrapolation=extrapolation, options=options, force=force, progress=update
        )
    print_result_notes(result)
    if as_json:
        print_json(result.to_dict())
        return
    g = result.generation
    lines = [f"wrote {result.completions} completions of {result.prompts} prompts to {result.out}"]
    if g["alpha"] is None:
        lines.append(f"model: {g['model']}" + (f" (step {g['step']})" if g["step"] is not None else ""))
    else:
        target = f", target step {g['target_step']:g}" if g["target_step"] is not None else ""
        lines.append(f"model: {g['model']} extrapolated from {g['extrapolate_from']}: α = {g['alpha']:g}{target}")
    lines.append(
        f"tokens: {result.tokens} in {result.seconds:.1f} s ({result.tokens_per_second:.1f} tokens/s, {g['device']}, {g['dtype']})"
    )
    lines.append("finish: " + ", ".join(f"{k} {v}" for k, v in result.finish_reasons.items()))
    if result.accuracy is not None:
        lines.append(f"accuracy: {result.accuracy:.4f} (--answer-field {answer_field})")
    sys.stdout.write("\n".join(lines) + "\n")
