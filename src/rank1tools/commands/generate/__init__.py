"""`rank1 generate`: completions of a prompts file from one checkpoint, or from two checkpoints'
extrapolated logits, written as a rollouts file (docs/commands/generate.md).

MODEL is the checkpoint decoded from (B, the later one with --extrapolate-from). The model is
built from the config and tokenizer beside MODEL's weights, or beside `--base` when MODEL has none
(a trainer checkpoint saving weights only); `--tokenizer` takes the tokenizer from another folder.
With `--extrapolate-from A` a second model of the same config holds A's weights, and every step
combines logits_A + α (logits_B − logits_A) (engine/logit_extrapolation.py); α is given
(`--alpha`) or comes from a target step (`--target-step S`: α = (S − a) / (b − a), the steps read
from the checkpoints' paths, or given with --step-a / --step-b).

Order of checks: options (exit 2), the prompts file (exit 3), the output (exit 4), then the models
are loaded (the CLI checks the output before anything is read, as every command does, so there an
existing --out is reported first); nothing is written before every completion is generated (io/output_file.py).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ... import __version__
from ...errors import InputError, UsageError
from ...io.rollouts import PromptLine, read_prompts
from .lines import completion_line, line_ids, prompt_ids


@dataclass(frozen=True)
class GenerateOptions:
    """What to decode and how: `n` completions per prompt, `sampling` (engine/sampling.SamplingOptions),
    `model` (engine/model_loading.ModelOptions), and where config/tokenizer come from."""

    n: int = 1
    sampling: object = None  # SamplingOptions (default: greedy, 256 new tokens)
    model: object = None  # ModelOptions (default: auto device and dtype, batch 8)
    base: str | None = None
    tokenizer: str | None = None
    answer_field: str | None = None


@dataclass(frozen=True)
class Extrapolation:
    """--extrapolate-from A with --target-step S or --alpha X, and the steps when known."""

    earlier: str
    alpha: float | None = None
    target_step: float | None = None
    step_a: int | None = None
    step_b: int | None = None


@dataclass
class GenerateResult:
    out: str
    model: str
    prompts: int
    completions: int
    tokens: int
    seconds: float
    finish_reasons: dict
    empty_completions: int
    generation: dict
    accuracy: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "model": self.model,
            "prompts": self.prompts,
            "completions": self.completions,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "finish_reasons": self.finish_reasons,
            "empty_completions": self.empty_completions,
            "accuracy": self.accuracy,
            "generation": self.generation,
            "notes": self.notes,
        }


def resolve_alpha(model: str, extra: Extrapolation) -> tuple[float, int | None, int | None, str | None]:
    """(α, step of A, step of B, note) for an extrapolation request; torch-free. A ≥ B is a
    UsageError, as is a step that can neither be read from the path nor was given."""
    from ...engine.logit_extrapolation import extrapolation_alpha
    from ...io.runs import infer_step

    if (extra.alpha is None) == (extra.target_step is None):
        raise UsageError("--extrapolate-from needs exactly one of --target-step S and --alpha X")
    step_a = extra.step_a if extra.step_a is not None else infer_step(extra.earlier)
    step_b = extra.step_b if extra.step_b is not None else infer_step(model)
    if extra.target_step is None:
        if step_a is not None and step_b is not None and step_a >= step_b:
            extrapolation_alpha(step_a, step_b, step_b)  # the same refusal
        return float(extra.alpha), step_a, step_b, None
    for step, path, option in ((step_a, extra.earlier, "--step-a"), (step_b, model, "--step-b")):
        if step is None:
            raise UsageError(f"{path}: no training step in the path (e.g. checkpoint-40); give it with {option} N")
    alpha, note = extrapolation_alpha(step_a, step_b, extra.target_step)
    return alpha, step_a, step_b, note


def check_answers(prompts: list[PromptLine], answer_field: str, where: str) -> None:
    for p in prompts:
        value = p.extra.get(answer_field)
        if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
            found = "no such field" if answer_field not in p.extra else f"a {type(value).__name__}"
            raise InputError(
                f"{where}: line {p.line}: --answer-field {answer_field!r}: expected a string or a number, found {found}"
            )


def _load_tokenizer(spec: str):
    """A tokenizer from a local folder (AutoTokenizer) or beside an hf:// model's config."""
    from ...engine.model_loading import load_tokenizer
    from ...engine.model_scoring import import_transformers
    from ...io.sources import is_hub_source, open_source

    if is_hub_source(spec):
        return load_tokenizer(open_source(spec), where=f"--tokenizer {spec}")
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(spec)
    except Exception as exc:  # noqa: BLE001 (transformers raises many kinds; the user needs one line)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"--tokenizer {spec}: cannot load a tokenizer: {first}") from None


def _has_tokenizer(checkpoint) -> bool:
    root = checkpoint.root
    return root is not None and any((root / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))


def _vocab_rows(checkpoint, name: str) -> int | None:
    return checkpoint.entry(name).shape[0] if name in checkpoint else None


def _check_same_vocabulary(lm, ckpt_a, ckpt_b, tokenizer) -> None:
    """Refuse A when its embedding rows or its own tokenizer differ from B's (before loading it)."""
    from ...engine.logit_extrapolation import vocabulary_difference
    from ...engine.model_loading import load_tokenizer

    embed = lm.model.get_input_embeddings().weight
    names = [n for n, p in lm.model.named_parameters() if p is embed][:1] + ["lm_head.weight"]
    for name in names:
        rows_a, rows_b = _vocab_rows(ckpt_a, name), _vocab_rows(ckpt_b, name)
        if rows_a is not None and rows_b is not None and rows_a != rows_b:
            raise InputError(
                f"the two checkpoints have different vocabularies: {name} has {rows_a} rows in "
                f"{ckpt_a.label} (A) and {rows_b} in {ckpt_b.label} (B)"
            )
    if _has_tokenizer(ckpt_a):
        diff = vocabulary_difference(lm.model, lm.model, load_tokenizer(ckpt_a), tokenizer)
        if diff is not None:
            raise InputError(f"the two checkpoints have different vocabularies: {diff}")


def generate(
    model: str,
    prompts_file: str,
    out: str,
    *,
    extrapolation: Extrapolation | None = None,
    options: GenerateOptions = GenerateOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> GenerateResult:
    """Generate `options.n` completions of every prompt of `prompts_file` and write them to `out`
    (module docstring)."""
    from ...engine.model_loading import ModelOptions
    from ...engine.sampling import SamplingOptions
    from ...io.output_file import check_output_file, staged_file
    from ...io.sources import is_hub_source

    sampling = options.sampling or SamplingOptions()
    model_opts = options.model or ModelOptions()
    sampling.check()
    model_opts.check()
    if options.n < 1:
        raise UsageError(f"--n {options.n}: expected a whole number >= 1")
    notes: list[str] = []
    alpha = step_a = step_b = None
    if extrapolation is not None:
        alpha, step_a, step_b, note = resolve_alpha(model, extrapolation)
        notes += [note] if note else []
    else:
        from ...io.runs import infer_step

        step_b = infer_step(model)
    prompts = read_prompts(prompts_file)
    if options.answer_field is not None:
        check_answers(prompts, options.answer_field, prompts_file)
    ids = line_ids(prompts, options.n, prompts_file)
    local = [p for p in (model, prompts_file, options.base, options.tokenizer) if p and not is_hub_source(p)]
    if extrapolation is not None and not is_hub_source(extrapolation.earlier):
        local.append(extrapolation.earlier)
    check_output_file(out, force=force, inputs=local)

    decoder, device, dtype = _decoder(model, extrapolation, alpha, options, model_opts)
    generation = {
        "tool": f"rank1tools {__version__}",
        "model": model,
        "step": step_b,
        "extrapolate_from": extrapolation.earlier if extrapolation else None,
        "step_a": step_a,
        "target_step": extrapolation.target_step if extrapolation else None,
        "alpha": alpha,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "seed": sampling.seed,
        "device": device,
        "dtype": dtype,
    }
    inputs = [p.prompt_input() for p in prompts]
    labels = [f"{prompts_file}: line {p.line}" for p in prompts]
    started = time.perf_counter()
    completions = decoder.generate(
        inputs, sampling, n=options.n, batch_size=model_opts.batch_size, labels=labels, progress=progress
    )
    seconds = time.perf_counter() - started

    from ...io.outputs import output_errors

    pids = prompt_ids(prompts)
    correct: list[bool] = []
    with (
        staged_file(out, force=force, inputs=local) as staging,
        output_errors(out),
        open(staging, "w", encoding="utf-8", newline="\n") as f,
    ):
        for c in completions:
            prompt = prompts[c.prompt_index]
            ok = None
            if options.answer_field is not None:
                from .answers import is_correct

                ok = is_correct(c.text, prompt.extra[options.answer_field])
                correct.append(ok)
            f.write(
                completion_line(
                    prompt,
                    line_id=ids[c.prompt_index][c.sample],
                    prompt_id=pids[c.prompt_index],
                    sample=c.sample,
                    completion=c.text,
                    finish_reason=c.finish_reason,
                    tokens=len(c.token_ids),
                    generation=generation,
                    correct=ok,
                )
            )
    empty = sum(1 for c in completions if not c.text)
    if empty:
        notes.append(
            f"{empty} completion(s) are empty (the model ended at once); `rank1 logprobs` refuses empty "
            "completions: drop those lines or raise --temperature"
        )
    return GenerateResult(
        out=out,
        model=model,
        prompts=len(prompts),
        completions=len(completions),
        tokens=sum(len(c.token_ids) for c in completions),
        seconds=seconds,
        finish_reasons=dict(sorted(Counter(c.finish_reason for c in completions).items())),
        empty_completions=empty,
        generation=generation,
        accuracy=(sum(correct) / len(correct)) if correct else None,
        notes=notes,
    )


def _open_model(spec: str, base):
    """A checkpoint to run; a PEFT adapter is read on --base (io/peft_adapter.py), which it needs."""
    from ...io.sources import open_source

    ckpt = open_source(spec, base=base)
    if ckpt.adapter_config is not None:
        raise InputError(f"{spec}: a PEFT adapter; give the model it was trained on with --base")
    return ckpt


def _decoder(model: str, extrapolation: Extrapolation | None, alpha, options: GenerateOptions, model_opts):
    """The decoder over MODEL (and A), the device and the dtype it runs in."""
    from ...engine.logit_extrapolation import LogitExtrapolation
    from ...engine.model_loading import CausalLM
    from ...io.sources import open_source

    base = open_source(options.base) if options.base else None
    ckpt_b = _open_model(model, base)
    config_source = base or ckpt_b
    tokenizer = _load_tokenizer(options.tokenizer) if options.tokenizer else None
    lm_b = CausalLM(config_source, model_opts, tokenizer=tokenizer, load_base=False)  # --base: its weights unread
    lm_b.load(ckpt_b)
    if extrapolation is None:
        decoder = LogitExtrapolation.single(lm_b.model, lm_b.tokenizer)
    else:
        ckpt_a = _open_model(extrapolation.earlier, base)
        _check_same_vocabulary(lm_b, ckpt_a, ckpt_b, lm_b.tokenizer)
        lm_a = copy.copy(lm_b)  # a second model of the same config, without reading its weights again
        lm_a.model = copy.deepcopy(lm_b.model)
        lm_a.load(ckpt_a)
        decoder = LogitExtrapolation(lm_a.model, lm_b.model, lm_b.tokenizer, alpha=alpha)
    return decoder, str(lm_b.device), str(lm_b.dtype).removeprefix("torch.")
