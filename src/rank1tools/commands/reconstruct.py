"""`rank1 reconstruct`: rank-k checkpoints, W = theta_0 + alpha * (||dW|| / ||dW_k||) * dW_k (SPEC section 2).

One pass over the base's tensors in file order; each input tensor is read once, whatever the
number of ranks asked for (`--rank 1,2,4,8` writes DIR/rank-1, DIR/rank-2, ...). Selected matrix
modules get their rank-k update; every other tensor gets the base value (default, as the AlphaRL
reference code) or the checkpoint's (`--rest checkpoint`). With `--factors` (a `decompose`
output covering the rank), the checkpoint's selected modules are not read at all: the factors
and ||dW|| come from the store. After writing, a rounding report says how much of the intended
update the output dtype kept (SPEC section 7).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import resolve_device
from ..errors import InputError, UsageError
from ..io.compat import check_compatible
from ..io.factor_store import FactorStore
from ..io.sources import is_hub_source, open_source
from ..io.writer import ShardedWriter, TensorSpec, prepare_output, provenance
from ..math.reconstruct import RoundingStats, apply_rank_k, rounding_stats
from ..math.signs import canonicalize_signs
from ..math.spectrum import delta, frobenius
from ..math.svd import topk_svd
from ..modules import select_tensors
from ..options import RankSpec, parse_ranks, parse_size  # noqa: F401 (RankSpec: importable from here)

ROUNDING_FILE = "rank1tools-rounding.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOST_WARNING = 0.5  # warn when more than half of the updated elements were rounded away


@dataclass
class ReconstructOptions:
    rank: str = "1"
    alpha: float = 1.0
    norm_match: bool = True
    rest: str = "base"  # base | checkpoint
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    all_2d: bool = False
    exact: bool = False
    device: str = "auto"
    factors: str | None = None
    max_shard_size: str | int = "5GB"  # text like 5GB, or bytes


@dataclass
class RankOutput:
    rank: str
    path: str
    lost_fraction: float
    rel_error: float
    updated_elements: int
    warning: str | None
    tensors: list[dict]


@dataclass
class ReconstructResult:
    out: str
    modules: int
    used_factors: bool
    outputs: list[RankOutput]

    def to_dict(self) -> dict:
        return {"out": self.out, "modules": self.modules, "used_factors": self.used_factors,
                "outputs": [{"rank": o.rank, "path": o.path, "lost_fraction": o.lost_fraction,
                             "rel_error": o.rel_error, "updated_elements": o.updated_elements,
                             "warning": o.warning} for o in self.outputs]}


def _output_dtype(option: str, stored: torch.dtype) -> torch.dtype:
    if option == "auto" or not stored.is_floating_point:
        return stored
    return DTYPES[option]


def reconstruct(base: str, checkpoint: str, out: str, *, options: ReconstructOptions = ReconstructOptions(),
                force: bool = False, progress: Callable[[int, int], None] | None = None) -> ReconstructResult:
    ranks = parse_ranks(options.rank)
    shard_bytes = (parse_size(options.max_shard_size) if isinstance(options.max_shard_size, str)
                   else options.max_shard_size)
    if options.rest not in ("base", "checkpoint"):
        raise UsageError(f"--rest {options.rest!r}: expected base or checkpoint")
    if options.dtype != "auto" and options.dtype not in DTYPES:
        raise UsageError(f"--dtype {options.dtype!r}: expected auto, float32, bfloat16 or float16")
    if not math.isfinite(options.alpha):
        raise UsageError(f"--alpha {options.alpha}: must be a finite number")
    base_ck, ck = open_source(base), open_source(checkpoint)
    shapes = {n: e.shape for n, e in base_ck.entries.items()}
    modules = select_tensors(shapes, include=options.include, exclude=options.exclude, all_2d=options.all_2d)
    if not modules:
        raise UsageError("no tensors selected (check --include/--exclude)")
    kmax = {}
    for name in modules:
        ks = [r.resolve(shapes[name]) for r in ranks]
        if max(ks) > min(shapes[name]):
            bad = ranks[ks.index(max(ks))].text
            raise UsageError(f"--rank {bad} exceeds min(m, n) = {min(shapes[name])} of {name} {list(shapes[name])}")
        kmax[name] = max(ks)

    store, step_index = None, -1
    if options.factors:
        store = FactorStore(options.factors)
        if not store.same_base(base_ck.label, base_ck.revision):
            raise InputError(f"{options.factors}: factor store was made from base "
                             f"{store.manifest['base']['source']}, not {base}")
        step_index = store.find_checkpoint(ck.label, ck.revision)
        if step_index < 0:
            raise InputError(f"{options.factors}: factor store holds no decomposition of {checkpoint}")
        missing = [n for n in modules if n not in store.modules]
        if missing:
            raise InputError(f"{options.factors}: factor store has no module {missing[0]!r}")
        short = [n for n in modules if kmax[n] > store.rank]
        if short:
            raise UsageError(f"--rank needs {kmax[short[0]]} triplets of {short[0]} but {options.factors} "
                             f"holds {store.rank}; rerun decompose with a larger --rank or drop --factors")
    if options.rest == "checkpoint" or store is None:
        check_compatible(base_ck, ck, modules if options.rest == "base" else None)

    if options.rest == "base":
        ck.expect([] if store is not None else modules)  # the rest comes from the base
    local = [Path(c.label) for c in (base_ck, ck) if not is_hub_source(c.label)]
    if options.factors:
        local.append(Path(options.factors))
    target = prepare_output(out, force=force, inputs=local)
    device = resolve_device(options.device)

    specs = [TensorSpec(n, e.shape, _output_dtype(options.dtype, e.torch_dtype)) for n, e in base_ck.entries.items()]
    multi = len(ranks) > 1
    staging = None
    if multi:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    writers = []
    try:
        for r in ranks:
            dest = staging / r.folder if multi else target
            writers.append(ShardedWriter(dest, specs, max_shard_size=shard_bytes, force=force and not multi))
        stats = [dict() for _ in ranks]  # tensor name -> RoundingStats, per rank
        names, selected = list(base_ck.entries), set(modules)
        for i, name in enumerate(names):
            if name in selected:
                _write_module(name, base_ck, ck, store, step_index, ranks, kmax[name], options, device, writers, stats)
            else:
                _write_rest(name, base_ck, ck, options, device, writers, stats)
            if progress:
                progress(i + 1, len(names))
        params = {"rank": [r.text for r in ranks], "alpha": options.alpha, "norm_match": options.norm_match,
                  "rest": options.rest, "dtype": options.dtype, "include": options.include,
                  "exclude": options.exclude, "all_2d": options.all_2d,
                  "svd": "factor-store" if store else ("exact" if options.exact else "randomized"),
                  "factors": options.factors, "device": device.type}
        outputs = []
        for r, w, st in zip(ranks, writers, stats):
            report = _report(st)
            prov = provenance("reconstruct", [base_ck, ck], {**params, "rank": r.text})
            w.commit(copy_from=base_ck, output_dtype=None if options.dtype == "auto" else DTYPES[options.dtype],
                     provenance=prov, extra_json={ROUNDING_FILE: report})
            outputs.append(RankOutput(rank=r.text, path=str(Path(out) / r.folder) if multi else out, **{
                k: report[k] for k in ("lost_fraction", "rel_error", "updated_elements", "warning")},
                tensors=report["tensors"]))
        if multi:
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
    except BaseException:
        for w in writers:
            w.abort()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return ReconstructResult(out=out, modules=len(modules), used_factors=store is not None, outputs=outputs)


def _nonfinite(label: str, name: str) -> InputError:
    return InputError(f"{label}: tensor {name!r} has non-finite values (NaN or Inf)")


def _write_module(name, base_ck, ck, store, step_index, ranks, kmax, options, device, writers, stats) -> None:
    w0 = base_ck.read(name, device=device)
    if store is not None:
        f = store.load(name)
        U, S, V = (f[k][step_index].to(device) for k in ("U", "S", "V"))
        fro = float(f["fro"][step_index])
    else:
        d = delta(ck.read(name, device=device), w0)
        fro = frobenius(d)
        if not math.isfinite(fro):  # NaN/Inf in the base or the checkpoint: say which
            bad = base_ck if not math.isfinite(frobenius(w0)) else ck
            raise _nonfinite(bad.label, name)
        res = topk_svd(d, kmax, exact=options.exact)
        del d
        U, V = canonicalize_signs(res.U, res.V)
        S = res.S
    for r, w, st in zip(ranks, writers, stats):
        stored, stat = apply_rank_k(w0, U, S, V, r.resolve(w0.shape), fro, w.specs[name].dtype,
                                    alpha=options.alpha, norm_match=options.norm_match)
        if not math.isfinite(stat.err_sq):  # NaN/Inf in the base (the factor path reads no checkpoint)
            raise _nonfinite(base_ck.label, name)
        w.write(name, stored)
        st[name] = stat


def _write_rest(name, base_ck, ck, options, device, writers, stats) -> None:
    if options.rest == "base":
        raw = base_ck.read_raw(name)  # bit-exact copy when the dtype is kept
        for w in writers:
            w.write(name, raw)
        return
    theirs = ck.read_raw(name)
    b = base_ck.read(name) if theirs.is_floating_point() else None
    intended = delta(theirs, b) if b is not None else None  # the same for every rank
    for w, st in zip(writers, stats):
        stored = theirs.to(w.specs[name].dtype)
        w.write(name, stored)
        if b is not None:
            st[name] = rounding_stats(b, intended, stored)


def _report(per_tensor: dict[str, RoundingStats]) -> dict:
    total = RoundingStats()
    rows = []
    for name, s in per_tensor.items():
        total.add(s)
        rows.append({"tensor": name, "updated_elements": s.updated, "lost_fraction": s.lost_fraction,
                     "rel_error": s.rel_error})
    warning = None
    if total.lost_fraction > LOST_WARNING:
        warning = (f"{total.lost_fraction:.0%} of the updated elements were rounded away by the output dtype "
                   "(the update is below its resolution); write with --dtype float32")
    return {"updated_elements": total.updated, "lost_fraction": total.lost_fraction,
            "rel_error": total.rel_error, "warning": warning, "tensors": rows}
