"""Writing one or several checkpoints in one pass: what `reconstruct` (one per rank) and
`extrapolate` (one per target) share.

With one output the checkpoint is OUT itself; with several, OUT is a parent folder holding one
checkpoint folder each (rank-8/, step-500/, metric-0.7/), made in a staging folder and renamed
into place only when all are complete. Each checkpoint carries its provenance and a rounding
report: how much of the intended update the output dtype kept (docs/formats.md#rounding-report).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import InputError
from ..io.checkpoint import Checkpoint
from ..io.outputs import make_staging, output_errors, publish
from ..io.work_folder import make_folder
from ..io.writer import ShardedWriter, TensorSpec, write_provenance
from ..jsonutil import json_safe
from ..math.finite import all_finite, dtype_max, dtype_name, introduces_nonfinite, max_abs
from ..math.reconstruct import RoundingStats
from ..resources import check_disk

ROUNDING_FILE = "rank1tools-rounding.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
LOST_WARNING = 0.5  # warn when more than half of the updated elements were rounded away


def output_dtype(option: str, stored: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: the base's (`auto`), or the one asked for (floats only)."""
    if option == "auto" or not stored.is_floating_point:
        return stored
    return DTYPES[option]


def tensor_specs(base: Checkpoint, names: list[str], dtype_option: str) -> list[TensorSpec]:
    """What the writer will receive: each name with the base's shape and the output dtype."""
    return [TensorSpec(n, base.entry(n).shape, output_dtype(dtype_option, base.entry(n).torch_dtype)) for n in names]


def nonfinite_error(label: str, name: str) -> InputError:
    """An input tensor holds NaN or Inf (where the output would be refused for it, docs/cli.md)."""
    return InputError(f"{label}: tensor {name!r} has non-finite values (NaN or Inf)")


def overflow_error(
    name: str, dtype: torch.dtype, what: str, *, hint: str | None = None, then: str | None = None
) -> InputError:
    """Values that are finite before the cast to the output dtype but not after (docs/cli.md: no written
    value is NaN/Inf where the base is finite): `what` overflows, with `hint` in the parentheses
    beside the dtype's largest finite value and `then` after them."""
    return InputError(
        f"tensor {name!r}: {what} overflow {dtype_name(dtype)} ({hint + '; ' if hint else ''}largest "
        f"finite {dtype_name(dtype)} is {dtype_max(dtype):.5g})" + (f"; {then}" if then else "")
    )


def write_copied(
    name: str, source: Checkpoint, writers: list, *, described: str, base: Checkpoint | None = None
) -> None:
    """Copy tensor `name` of `source` into every writer: cast once to the output dtype (bit-exact
    when the dtype is kept). Refused: a cast that overflows the dtype (`described` names the values
    in the message), and, when `source` is another checkpoint than `base`, a NaN/Inf where the base
    is finite (the base's own non-finite values are kept)."""
    raw = source.read_raw(name)
    stored = raw.to(writers[0].specs[name].dtype)
    if base is not None and source is not base and raw.is_floating_point() and not all_finite(raw):
        if introduces_nonfinite(raw, base.read_raw(name)):
            raise nonfinite_error(source.label, name)
    if stored.dtype != raw.dtype and introduces_nonfinite(stored, raw):  # e.g. values above 65504 cast to float16
        raise overflow_error(
            name,
            stored.dtype,
            f"{described} (|values| up to {max_abs(raw):.3g})",
            hint="use --dtype float32 or bfloat16",
        )
    for w in writers:
        w.write(name, stored)


def rounding_report(per_tensor: dict[str, RoundingStats]) -> dict:
    """Totals and per-tensor figures of what the output dtype rounded away, with a warning when
    most of the update was lost."""
    total = RoundingStats()
    rows = []
    for name, s in per_tensor.items():
        total.add(s)
        rows.append(
            {"tensor": name, "updated_elements": s.updated, "lost_fraction": s.lost_fraction, "rel_error": s.rel_error}
        )
    warning = None
    if total.lost_fraction > LOST_WARNING:
        warning = (
            f"{total.lost_fraction:.0%} of the updated elements were rounded away by the output dtype "
            "(the update is below its resolution); write with --dtype float32"
        )
    return {
        "updated_elements": total.updated,
        "lost_fraction": total.lost_fraction,
        "rel_error": total.rel_error,
        "warning": warning,
        "tensors": rows,
    }


class CheckpointOutputs:
    """Writers for `folders` (one: the target itself; several: target/<folder> each).

    Usage::

        with CheckpointOutputs(target, folders, specs, max_shard_size=..., force=...) as outs:
            for w in outs.writers: w.write(...)
            outs.commit(copy_from=base, output_dtype=..., provenances=[...], reports=[...],
                        parent_provenance={...}, label=out)

    Leaving the block without `commit` removes everything staged: no partial output.
    """

    def __init__(
        self,
        target: Path,
        folders: list[str],
        specs: list[TensorSpec],
        *,
        max_shard_size: int | str,
        force: bool,
        work: Path | None = None,
    ):
        self.target = target
        self.folders = folders
        self.multi = len(folders) > 1
        self.force = force
        # `work`: a resumable work folder (io.work_folder): the checkpoints are made in work/out and
        # kept there when the block fails, so that a rerun keeps the tensors already written
        self.work = work
        self._check_disk(specs)  # before anything is created
        self.staging = None
        if self.multi:
            self.staging = make_staging(target) if work is None else make_folder(work / "out")
        self.writers: list[ShardedWriter] = []
        self.committed = False
        try:
            for f in folders:
                if not self.multi:
                    dest, keep = target, (None if work is None else work / "out")
                else:
                    dest, keep = self.staging / f, (None if work is None else self.staging / f".{f}.partial")
                    if work is not None and os.path.lexists(dest):  # published by a run stopped while committing
                        with output_errors(dest):
                            shutil.rmtree(dest)
                self.writers.append(
                    ShardedWriter(
                        dest, specs, max_shard_size=max_shard_size, force=force and not self.multi, staging=keep
                    )
                )
        except BaseException:
            self.abort()
            raise

    def _check_disk(self, specs: list[TensorSpec]) -> None:
        """Refuse (exit 4) before any work when the checkpoints cannot fit on the output's disk:
        every tensor once per checkpoint, less what a resumable work folder already holds."""
        per = sum(s.numel * torch.empty((), dtype=s.dtype).element_size() for s in specs)
        held = 0
        if self.work is not None:
            for root, _, files in os.walk(self.work):
                held += sum(os.lstat(os.path.join(root, f)).st_size for f in files)
        check_disk(
            per * len(self.folders) - held,
            self.target.parent,
            f"{self.target}: {len(self.folders)} checkpoint{'s' if len(self.folders) > 1 else ''}",
        )

    @property
    def resumed(self) -> bool:
        """Every checkpoint's planned shards were found intact in the work folder (what a rerun
        may keep); False without a work folder."""
        return self.work is not None and all(w.resumed for w in self.writers)

    def paths(self, out: str) -> list[str]:
        """Where each checkpoint will be, as the user named the output."""
        return [str(Path(out) / f) if self.multi else out for f in self.folders]

    def commit(
        self,
        *,
        copy_from: Checkpoint,
        output_dtype: torch.dtype | None,
        provenances: list[dict],
        reports: list[dict[str, object]],
        parent_provenance: dict,
        label: str,
        untie_word_embeddings: bool = False,
    ) -> None:
        """Finish every checkpoint (`reports[i]`: file name -> JSON data written beside it), then
        move the parent folder into place when there are several."""
        for w, prov, extra in zip(self.writers, provenances, reports):
            w.commit(
                copy_from=copy_from,
                output_dtype=output_dtype,
                provenance=prov,
                extra_json={k: json_safe(v) for k, v in extra.items()},
                untie_word_embeddings=untie_word_embeddings,
            )
        if self.multi:  # the parent is a rank1 output too: --force may replace it later
            with output_errors(self.staging):
                write_provenance(self.staging, {**parent_provenance, "outputs": list(self.folders)})
            publish(self.staging, self.target, force=self.force, label=label)
        self.committed = True

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        if self.staging is not None and self.work is None:
            shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> CheckpointOutputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self.abort()
