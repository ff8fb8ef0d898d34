"""`rank1 backtest --data`: output-space figures (docs/commands/backtest.md#output-space-figures).
For every cut and later checkpoint, the model the cut predicts for that step against the real
checkpoint, on fixed rollouts (the `logprobs` format), teacher-forced as `rank1 logprobs` scores
them (engine/model_scoring): `logprob_mad`, the mean absolute difference of the completion tokens'
log-probs, and `kl`, the mean per-token KL(P_real ‖ P_predicted) of the next-token distributions
at those positions.

Two models are held (engine/model_loading.CausalLM): the real checkpoint's and the predicted
one, whose tensors the method's own per-tensor fit fills in place through `ModelSink` (one tensor
at a time, streamed; nothing is written to disk). The fit runs once per cut and later checkpoint.
"""

from __future__ import annotations

import torch

from ...engine.model_loading import CausalLM
from ...engine.model_scoring import forward_pairs, model_context, tokenize_pair
from ...errors import InputError
from ...math.token_logprobs import scored_log_softmax
from .figures import held_prediction


class ModelSink:
    """In place of extrapolate's TargetSink: keeps target `j`'s predicted chunk, θ₀ + Δ̂, in the
    predicted model's tensor (the model's dtype), and drops the other targets'."""

    def __init__(self, targets: list, j: int, tensors: dict):
        self.targets, self.j, self.tensors = targets, j, tensors

    def write(self, j: int, name: str, start: int, base: torch.Tensor, update: torch.Tensor) -> None:
        if j != self.j:
            return
        flat = self.tensors[name].data.view(-1)
        with torch.no_grad():
            flat[start : start + update.shape[0]] = (base.to(torch.float64) + update).to(flat.device, flat.dtype)


def output_figures(base, cuts: list, names: list[str], rollouts: list, data: str, model_options) -> dict:
    """{(cut, target step): {"logprob_mad", "kl", "tokens"}} on `rollouts` (io.rollouts, read from
    the file `data`, which errors name)."""
    predicted = CausalLM(base, model_options)
    real = CausalLM(base, model_options, tokenizer=predicted.tokenizer, load_base=False)  # loaded per target below
    tensors = predicted.model.state_dict(keep_vars=True)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise InputError(f"{base.label}: tensor {missing[0]!r} is not a tensor of the model its config builds")
    context = model_context(predicted.model)
    pairs = [
        tokenize_pair(predicted.tokenizer, r.prompt_input(), r.completion, f"{data}: line {r.line}", context)
        for r in rollouts
    ]
    # each real checkpoint is loaded once, for every cut that predicts it; a cut's pass still
    # predicts all its targets to fill one (its sink keeps the j-th): J^2 tensor fits per cut
    later = {step: ck for cp in cuts for step, ck in zip(cp.targets, cp.target_checkpoints)}
    out = {}
    for step in sorted(later):
        real.load(later[step])
        for cp in cuts:
            if step not in cp.targets:
                continue
            p, j = cp.history_pass, cp.targets.index(step)
            sink = ModelSink(cp.target_checkpoints, j, tensors)
            for name in names:
                source = p.plan.source.get(name)
                if source == "extrapolate":
                    p.tensor_fn(name, sink)
                elif source in ("last", "base"):
                    held_prediction(p.history, name, source, sink)
            out[(cp.cut, step)] = compare(real.model, predicted.model, pairs, model_options.batch_size)
    return out


def compare(real_model, predicted_model, pairs: list, batch_size: int) -> dict:
    """Mean |log p_real − log p_predicted| of the scored tokens and mean KL(P_real ‖ P_predicted)."""
    mad = kl = 0.0
    n = 0
    for lo in range(0, len(pairs), batch_size):
        batch = pairs[lo : lo + batch_size]
        logits_r, ids, scored = forward_pairs(real_model, batch)
        logits_p, _, _ = forward_pairs(predicted_model, batch)
        lr, tokens = scored_log_softmax(logits_r, ids, scored)
        lp, _ = scored_log_softmax(logits_p, ids, scored)
        tr, tp = lr.gather(-1, tokens[:, None]), lp.gather(-1, tokens[:, None])
        mad += float((tr.double() - tp.double()).abs().sum())
        kl += float((lr.double().exp() * (lr.double() - lp.double())).sum())
        n += int(tokens.numel())
    return {"logprob_mad": mad / n, "kl": kl / n, "tokens": n}
