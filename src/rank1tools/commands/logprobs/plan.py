"""What `rank1 logprobs` will do, decided before any model runs: its options and their checks, the
sequences (all, or a seeded sample), the steps (the base as step 0 unless --no-base) and the store's
scoring key (docs/formats.md#log-prob-store)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...engine.model_loading import ModelOptions
from ...errors import InputError, UsageError
from ...io.checkpoint import Checkpoint
from ...io.fingerprint import fingerprint
from ...io.logprob_store import STORE_FORMAT_VERSION, digest

MIN_STEPS = 3  # a line through 2 points always fits
CONVENTION = (
    "joint-prompt-completion.v1"  # engine/model_scoring.py's (docs/concepts.md#teacher-forced-log-probabilities)
)


@dataclass
class LogprobsOptions:
    sample: int | None = None  # sequences scored: a seeded uniform sample of this many (None: all)
    seed: int = 0
    with_base: bool = True  # the base is step 0 of the trajectory (--no-base: False)
    min_change: float = 0.0  # --min-change: a token counts when its log-prob's range exceeds this
    min_distinct: int = 2  # --min-distinct: ... and it takes at least this many distinct values
    fail_below: float | None = None  # gate on the share of kept tokens with R² > 0.7
    plots: bool = True
    model: ModelOptions = field(default_factory=ModelOptions)


def check_options(options: LogprobsOptions) -> None:
    """Option checks that need no input (the CLI runs them before importing torch)."""
    if options.sample is not None and options.sample < 1:
        raise UsageError(f"--sample {options.sample}: must be at least 1")
    if options.seed < 0:
        raise UsageError(f"--seed {options.seed}: must be at least 0")
    if not (math.isfinite(options.min_change) and options.min_change >= 0):
        raise UsageError(f"--min-change {options.min_change}: must be a finite number >= 0")
    if options.min_distinct < 1:
        raise UsageError(f"--min-distinct {options.min_distinct}: must be at least 1")
    if options.fail_below is not None and not math.isfinite(options.fail_below):
        raise UsageError(f"--fail-below {options.fail_below}: must be a finite number")
    options.model.check()


def select_sequences(count: int, sample: int | None, seed: int) -> list[int]:
    """Indices of the sequences scored, sorted: all, or `sample` of them drawn uniformly without
    replacement with numpy's generator seeded with `seed` (same seed, same sequences)."""
    if sample is None or sample >= count:
        return list(range(count))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(count, size=sample, replace=False))


def trajectory_steps(
    base: Checkpoint, checkpoints: list[tuple[int, Checkpoint]], with_base: bool, where: str, notes: list[str]
) -> list[tuple[int, Checkpoint]]:
    """(step, checkpoint) of the trajectory: the base as step 0 (a run's own step-0 checkpoint is
    then left out, with a note) and the checkpoints; at least MIN_STEPS (UsageError, exit 2)."""
    pairs = list(checkpoints)
    if with_base:
        if any(s == 0 for s, _ in pairs):
            notes.append("the run's checkpoint at step 0 is left out: the base is step 0 (--no-base keeps it)")
            pairs = [(s, c) for s, c in pairs if s != 0]
        pairs = [(0, base), *pairs]
    if len(pairs) < MIN_STEPS:
        raise UsageError(
            f"{where}: {len(pairs)} steps ({[s for s, _ in pairs]}); a log-prob line fit needs at least "
            f"{MIN_STEPS} (a line through 2 points always fits): select more checkpoints"
            + ("" if with_base else " or drop --no-base")
        )
    return pairs


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def scoring_key(*, rollouts_sha256: str, lines: list[int], pairs, base: Checkpoint, scoring: dict) -> str:
    """The store's key: a hash of what the log-probs depend on besides the checkpoint (the rollouts'
    content, the selected lines, every sequence's joint token ids and first scored position, the
    base, the scoring settings: dtype, device type, batch size, convention)."""
    return digest(
        {
            "format_version": STORE_FORMAT_VERSION,
            "rollouts_sha256": rollouts_sha256,
            "lines": lines,
            "tokens": digest([[list(p.ids), p.start] for p in pairs]),
            "base": {"fingerprint": fingerprint(base), "revision": base.revision},
            "scoring": scoring,
        }
    )
