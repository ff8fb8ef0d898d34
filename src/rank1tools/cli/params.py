"""The options several commands share, declared once (docs/cli.md).

Single options are typer parameter objects (`DEVICE_OPT`, `FORCE_OPT`, `out_option(help)` ...).
Groups of options that travel together are expanded by a decorator into the command's
parameters at the place of one placeholder parameter, and handed to the command as one typed
value: `with_executor` (--executor and the five Ray options -> `ExecutorFlags`, checked into
executors.ExecutorOptions when the command is ready to) and `with_run` (--run, --steps, the Hub
run options and --hub-cache-policy -> `RunSpec`). Torch-free.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import typer

from ..engine.executor_options import EXECUTOR_FLAGS, EXECUTORS
from ..options import DTYPE_CHOICES
from ..values import StepSelection


def number(option: str, **bounds):
    """The `parser` of a numeric option: options.parse_number with the option's name and bounds, run
    while click parses the command line (before any heavy import): no `1_0`, `inf` or out-of-range value."""

    def parse(value):
        from ..options import parse_number

        return parse_number(value, option, **bounds)

    return parse


def choice(option: str, choices: tuple[str, ...], message: str = "expected one of"):
    """The `parser` of an option with fixed choices (listed as its metavar `a|b|c` in --help): a
    value outside them is refused while click parses, one line, exit 2."""

    def parse(value):
        from ..options import check_choice

        return check_choice(value, option, choices, message)

    return parse


def choice_option(default, option: str, choices: tuple[str, ...], help: str, message: str = "expected one of"):
    return typer.Option(default, option, metavar="|".join(choices), parser=choice(option, choices, message), help=help)


BASE_ARG = typer.Argument(..., metavar="BASE", help="Base model (θ₀): folder, .safetensors file or hf:// repo.")
CHECKPOINTS_ARG = "[CHECKPOINT]..."  # metavar of the checkpoints arguments
DEVICE_OPT = typer.Option("auto", "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No progress on stderr.")
JSON_OPT = typer.Option(False, "--json", help="Print the result as JSON on stdout (for pipelines).")
FORCE_OPT = typer.Option(False, "--force", help="Replace --out if it exists and rank1 wrote it.")
STEPS_HELP = "'50,100' or '10:100:10' (inclusive)"
DTYPE_OPT = choice_option("auto", "--dtype", DTYPE_CHOICES, "auto (base dtype), float32, bfloat16 or float16.")
MODEL_DTYPE_OPT = choice_option(
    "auto",
    "--dtype",
    DTYPE_CHOICES,
    "Compute dtype: auto (float32 on CPU, the config's on GPU), float32, bfloat16, float16.",
)
BATCH_SIZE_OPT = typer.Option(
    8,
    "--batch-size",
    metavar="N",
    parser=number("--batch-size", at_least=1, integer=True),
    help="Sequences per forward pass.",
)
SHARD_OPT = typer.Option("5GB", "--max-shard-size", metavar="SIZE", help="Largest shard file, e.g. 5GB, 500MB.")
EXCLUDE_OPT = typer.Option(None, "--exclude", metavar="GLOB", help="Glob of tensor names to leave out (repeatable).")
# decompose's tolerances, relative to sigma_1 (math/svd.py's SIGMA_REL_TOL and TAIL_REL_TOL; written
# out here so that --help and option errors stay torch-free; tests/test_tail_tolerance.py checks them)
HEAD_REL_TOL, TAIL_REL_TOL = 1e-4, 1e-2
TAIL_TOL_OPT = typer.Option(
    None,
    "--tail-tol",
    metavar="TOL",
    parser=number("--tail-tol", at_least=HEAD_REL_TOL, at_most=1),
    help=f"Certify σ₂..σ_k to TOL·σ₁ (default {TAIL_REL_TOL:g}; σ₁, u₁, v₁ always to {HEAD_REL_TOL:g}): "
    f"{HEAD_REL_TOL:g} gives the warm schedule before issue #25. Not with --cold-start or --exact.",
)
HUB_CACHE_POLICIES = ("keep", "evict")
HUB_CACHE_OPT = choice_option(
    None, "--hub-cache-policy", HUB_CACHE_POLICIES, "Hub shards: 'keep' in the cache (default) or 'evict' once read."
)
REVISIONS_OPT = typer.Option(
    None,
    "--revisions",
    metavar="GLOB",
    help="Hub run: branches matching this glob, e.g. 'step_*' (step = trailing number).",
)
SUBFOLDERS_OPT = typer.Option(False, "--subfolders", help="Hub run: step folders (checkpoint-N/ ...) at one revision.")
COMMITS_OPT = typer.Option(False, "--commits", help="Hub run: commits whose message says 'step N'.")


def out_option(help: str, default=..., short: bool = True):
    return typer.Option(default, "--out", *(("-o",) if short else ()), metavar="PATH", help=help)


def include_option(help: str = "Glob of tensor names (repeatable)."):
    return typer.Option(None, "--include", metavar="GLOB", help=help)


def steps_option(help: str = f"With --run: {STEPS_HELP}."):
    return typer.Option(None, "--steps", metavar="STEPS", help=help)


def option_group(placeholder: str, params: list[tuple[str, object, object]], build: Callable[..., object]):
    """A decorator putting `params` ((name, annotation, typer parameter) each) in the command's
    signature where its parameter `placeholder` is, and calling the command with
    `placeholder=build(**their values)`: a group of options declared once for every command."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        names = [n for n, _, _ in params]
        expanded = []
        for p in sig.parameters.values():
            if p.name == placeholder:
                expanded += [
                    inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
                    for n, a, d in params
                ]
            else:
                expanded.append(p)

        @functools.wraps(fn)
        def command(**kwargs):
            values = {n: kwargs.pop(n) for n in names}
            return fn(**kwargs, **{placeholder: build(**values)})

        command.__signature__ = sig.replace(parameters=expanded)
        command.__annotations__ = {p.name: p.annotation for p in expanded}
        del command.__wrapped__  # typer reads the expanded signature, not fn's
        return command

    return decorate


# ---- executor: --executor and the Ray options -> ExecutorFlags -> executors.ExecutorOptions ----


@dataclass(frozen=True)
class ExecutorFlags:
    """The executor options as given; `check()` validates them (and Ray's presence, for `ray`)
    into an executors.ExecutorOptions, at the point of the command's checks the command chooses."""

    kind: str = "local"
    address: str | None = None
    num_cpus: float | None = None
    num_gpus: float | None = None
    max_in_flight: int | None = None
    timeout: float | None = None

    def check(self):
        from ..engine.executor_options import check_executor

        return check_executor(
            self.kind,
            address=self.address,
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_in_flight=self.max_in_flight,
            timeout=self.timeout,
        )


_F = EXECUTOR_FLAGS  # field -> flag, spelled once in executors.py
EXECUTOR_PARAMS = [
    (
        "kind",
        str,
        choice_option(
            "local",
            _F["kind"],
            EXECUTORS,
            "Where the work runs: 'local' (this process) or 'ray' "
            "(tasks on a Ray cluster; needs the ray extra and an output on storage every worker "
            "shares).",
            message="choose one of",
        ),
    ),
    (
        "address",
        Optional[str],
        typer.Option(
            None,
            _F["address"],
            metavar="ADDRESS",
            help="Ray cluster to use (default: "
            "RAY_ADDRESS, else a running local cluster, else a new local Ray instance).",
        ),
    ),
    (
        "num_cpus",
        Optional[float],
        typer.Option(
            None,
            _F["num_cpus"],
            metavar="CPUS",
            parser=number(_F["num_cpus"], at_least=0),
            help="CPUs per Ray task (default: the threads a local run uses).",
        ),
    ),
    (
        "num_gpus",
        Optional[float],
        typer.Option(
            None,
            _F["num_gpus"],
            metavar="GPUS",
            parser=number(_F["num_gpus"], at_least=0),
            help="GPUs per Ray task, e.g. 0.25 for four tasks per GPU.",
        ),
    ),
    (
        "max_in_flight",
        Optional[int],
        typer.Option(
            None,
            _F["max_in_flight"],
            metavar="N",
            parser=number(_F["max_in_flight"], at_least=1, integer=True),
            help="Ray tasks submitted at once (bounds memory; default: as many as the cluster runs at the same time).",
        ),
    ),
    (
        "timeout",
        Optional[float],
        typer.Option(
            None,
            _F["connect_timeout"],
            metavar="SECONDS",
            parser=number(_F["connect_timeout"], above=0),
            help="Seconds to connect to the Ray cluster before giving up (default 30).",
        ),
    ),
]
EXECUTOR_PARAMS = [(f"executor_{n}", a, o) for n, a, o in EXECUTOR_PARAMS]  # unique among a command's parameters
with_executor = option_group(
    "executor", EXECUTOR_PARAMS, lambda **v: ExecutorFlags(**{k.removeprefix("executor_"): x for k, x in v.items()})
)


# ---- run: --run, --steps, the Hub run options and --hub-cache-policy -> RunSpec ----


@dataclass(frozen=True)
class RunSpec:
    """Where the checkpoints come from besides CHECKPOINT arguments: a run directory or Hub run
    (--run with --revisions/--subfolders/--commits), the step selection (--steps, parsed once when
    built: the commands receive the StepSelection) and the Hub cache policy."""

    run: str | None = None
    steps: StepSelection | str | None = None  # text is parsed when built: held as a StepSelection
    revisions: str | None = None
    subfolders: bool = False
    commits: bool = False
    hub_cache_policy: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", StepSelection.of(self.steps))  # frozen: set once, here

    @property
    def hub_run(self) -> dict:
        return {"revisions": self.revisions, "subfolders": self.subfolders, "commits": self.commits}


def _run_params(run: bool, steps_help: str) -> list:
    params = (
        [
            (
                "run",
                Optional[str],
                typer.Option(
                    None, "--run", metavar="RUN_DIR", help="Run directory of step folders instead of CHECKPOINT args."
                ),
            )
        ]
        if run
        else []
    )
    return [
        *params,
        ("steps", Optional[str], steps_option(steps_help)),
        ("revisions", Optional[str], REVISIONS_OPT),
        ("subfolders", bool, SUBFOLDERS_OPT),
        ("commits", bool, COMMITS_OPT),
        ("hub_cache_policy", Optional[str], HUB_CACHE_OPT),
    ]


def with_run(*, run: bool = True, steps_help: str = f"With --run: {STEPS_HELP}."):
    """The run options as one `run_spec: RunSpec` parameter (inspect has no --run: its SOURCE is the run)."""
    return option_group("run_spec", _run_params(run, steps_help), lambda **v: RunSpec(**v))


def parse_seed(text: str) -> int:
    """--seed: a non-negative integer (ASCII digits)."""
    from ..errors import UsageError
    from ..options import ascii_int

    value = ascii_int(str(text).strip())
    if value is None:
        raise UsageError(f"--seed {text!r}: expected a non-negative integer")
    return value
