"""The extrapolation methods by name (docs/commands/extrapolate.md). Adding a method: its module
(an options class deriving from base.CommonOptions, with FLAGS, and `run`) and one line here.

Torch-free: each method imports its heavy code when it runs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

from ...engine.executor_options import ExecutorOptions
from ...errors import UsageError
from . import alpharl, linear, relex
from .base import CommonOptions, ExtrapolateResult, MethodRun, own_flags


@dataclass(frozen=True)
class Method:
    name: str
    options: type[CommonOptions]
    run: MethodRun
    summary: str


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("alpharl", alpharl.AlpharlOptions, alpharl.run, "AlphaRL: from a fit-pls output, for a target metric."),
        Method("relex", relex.RelexOptions, relex.run, "RELEX: trajectory rank-r lines through a history."),
        Method("linear", linear.LinearOptions, linear.run, "Straight lines through a history's weights."),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"--method {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def flag_owners() -> dict[str, list[str]]:
    """Every method-specific flag -> the methods that take it (in registry order)."""
    owners: dict[str, list[str]] = {}
    for m in METHODS.values():
        for flags in own_flags(m.options).values():
            for flag in flags:
                owners.setdefault(flag, []).append(m.name)
    return owners


def foreign_flag_error(flag: str, method_name: str) -> UsageError | None:
    """The one-line refusal of `flag` given to `method_name`, or None when the method takes it
    (or no method does: then it is an ordinary unknown option)."""
    owners = flag_owners().get(flag)
    if not owners or method_name in owners:
        return None
    what = "CHECKPOINT arguments" if flag == "CHECKPOINT" else flag
    verb = "apply" if flag == "CHECKPOINT" else "applies"
    return UsageError(f"{what} {verb} to --method {' and '.join(owners)}, not {method_name}")


def field_flags() -> dict[str, tuple[str, ...]]:
    """Every method-specific field -> its flags."""
    out: dict[str, tuple[str, ...]] = {}
    for m in METHODS.values():
        out.update(own_flags(m.options))
    return out


def make_options(method_name: str, **values) -> CommonOptions:
    """The options of `method_name` from field values, as the former flat `ExtrapolateOptions(method=...)`
    took them: a field of another method is refused as the CLI refuses its flag."""
    m = method(method_name)
    known = {f.name for f in fields(m.options)}
    flags = field_flags()
    for name in values:
        if name not in known:
            error = foreign_flag_error(flags[name][0], m.name) if name in flags else None
            raise error or TypeError(f"{m.options.__name__} has no field {name!r}")
    return m.options(**values)


def ExtrapolateOptions(method: str = "relex", **values) -> CommonOptions:  # noqa: N802 (the former class's name)
    """Compatibility: `ExtrapolateOptions(method="relex", run=..., target_steps=[...])` builds the
    method's own options class (registry.make_options)."""
    return make_options(method, **values)


def extrapolate(
    base: str,
    out: str,
    *,
    options: CommonOptions,
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> ExtrapolateResult:
    """Write the checkpoint(s) the method of `options` predicts for every target. `executor`:
    where relex / linear compute and write the tensors (rank1tools.engine.executors)."""
    return method(options.method).run(base, out, options=options, force=force, progress=progress, executor=executor)
