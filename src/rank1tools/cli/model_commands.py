"""`rank1 inspect`, `decompose`, `reconstruct` and `demo`: commands that read models and runs."""

from __future__ import annotations

import sys

import typer

from ..errors import InputError, UsageError
from ..jsonutil import json_safe as _json_safe
from . import render, render_demo
from .app import (
    RESUME_HINT,
    Rank1Command,
    app,
    check_common_early,
    check_output_early,
    interrupt_hint,
    print_json,
    print_result_notes,
    set_hub_cache_policy,
    stderr_progress,
)
from .params import (
    BASE_ARG,
    CHECKPOINTS_ARG,
    DEVICE_OPT,
    DTYPE_OPT,
    EXCLUDE_OPT,
    FORCE_OPT,
    HUB_CACHE_OPT,
    JSON_OPT,
    QUIET_OPT,
    SHARD_OPT,
    TAIL_REL_TOL,
    TAIL_TOL_OPT,
    ExecutorFlags,
    RunSpec,
    choice_option,
    include_option,
    number,
    out_option,
    with_executor,
    with_run,
)


@app.command(cls=Rank1Command)
@with_run(run=False, steps_help="For a run: steps to list, '50,100' or '10:100:10' (inclusive).")
def inspect(
    source: str = typer.Argument(
        ...,
        metavar="SOURCE",
        help="Model folder, .safetensors file, run directory of step folders, or a Hub "
        "source hf://ORG/NAME, optionally @REVISION and /SUBFOLDER.",
    ),
    run_spec: RunSpec = RunSpec(),
    as_json: bool = JSON_OPT,
) -> None:
    """What a model or training run holds: tensors, dtypes, shards, matrix modules, checkpoints.

    Reads safetensors headers only (no torch). For a run, exits 3 if any checkpoint is unusable (listed).
    """
    from ..commands.inspect import inspect_source

    set_hub_cache_policy(run_spec.hub_cache_policy)
    report = inspect_source(source, run_spec.steps, **run_spec.hub_run)
    if as_json:
        print_json(report.to_dict())
    elif report.kind == "model":
        render.model(report)
    else:
        render.run(report)
    print_result_notes(report)
    if report.kind == "run" and report.problems:
        first = report.problems[0]
        raise InputError(
            f"{source}: {len(report.problems)} of {len(report.checkpoints)} checkpoints unusable "
            f"({'step ' + str(first.step) if first.step is not None else first.path}: {first.problem})"
        )


@app.command(cls=Rank1Command)
@with_run()
@with_executor
def decompose(
    base: str = BASE_ARG,
    checkpoints: list[str] | None = typer.Argument(
        None, metavar=CHECKPOINTS_ARG, help="Checkpoints θ_t (or use --run)."
    ),
    out: str = out_option("Output folder: spectrum tables and factor store."),
    run_spec: RunSpec = RunSpec(),
    rank: str = typer.Option("8", "--rank", "-k", metavar="K", help="Singular triplets kept per module and step."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD (torch.linalg.svd) instead of randomized."),
    cold_start: bool = typer.Option(
        False,
        "--cold-start",
        help="Every matrix from a fresh random sketch with 4 power "
        "iterations, instead of warm-starting from the module's previous checkpoint and "
        "stopping once the accuracy certificates pass.",
    ),
    tail_tol: float | None = TAIL_TOL_OPT,
    include: list[str] | None = include_option(
        "Glob of tensor names (repeatable); replaces the default matrix-module set."
    ),
    exclude: list[str] | None = EXCLUDE_OPT,
    all_2d: bool = typer.Option(False, "--all-2d", help="Also embeddings, lm_head and other 2-D tensors."),
    device: str = DEVICE_OPT,
    plots: bool = typer.Option(
        False, "--plots", help="Also draw energy_1/norm_frac_1 over steps and a layer x type heatmap (OUT/plots)."
    ),
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Spectra of ΔW = θ_t − θ₀ for every matrix module and checkpoint (matrix rank-1, AlphaRL).

    Writes spectrum.csv / spectrum.jsonl, summary.json and a factor store (top-k σ, u, v per
    module and step). Rerunning an interrupted command resumes it.
    """
    from ..options import parse_positive_int

    rank_k = parse_positive_int(rank, "--rank")
    if cold_start and exact:
        raise UsageError("--cold-start selects the randomized SVD's start; it cannot be combined with --exact")
    if tail_tol is not None and (cold_start or exact):
        raise UsageError(
            f"--tail-tol is the warm start's tolerance of σ₂..σ_k; it cannot be combined with "
            f"{'--exact' if exact else '--cold-start'}"
        )
    check_common_early(device)
    check_output_early(out, force, [base, *(checkpoints or []), run_spec.run])
    exec_opts = executor.check()

    from ..commands.decompose import DecomposeOptions
    from ..commands.decompose import decompose as run_decompose

    set_hub_cache_policy(run_spec.hub_cache_policy)
    opts = DecomposeOptions(
        rank=rank_k,
        exact=exact,
        include=include or [],
        exclude=exclude or [],
        all_2d=all_2d,
        device=device,
        plots=plots,
        warm_start=not cold_start,
        tail_tol=TAIL_REL_TOL if tail_tol is None else tail_tol,
    )
    bar, update = stderr_progress(not quiet, "decompose")
    with interrupt_hint("finished modules are kept; rerun the same command to resume", out), bar:
        result = run_decompose(
            base,
            checkpoints or [],
            out,
            run=run_spec.run,
            steps=run_spec.steps,
            hub_run=run_spec.hub_run,
            options=opts,
            force=force,
            progress=update,
            executor=exec_opts,
        )
    if result.resumed_modules:
        sys.stderr.write(f"rank1: resumed: {result.resumed_modules} modules were already done\n")
    print_result_notes(result)
    for module, step in result.fallbacks:
        sys.stderr.write(f"rank1: note: {module} at step {step}: randomized SVD missed the accuracy bar, used exact\n")
    if as_json:
        print_json(_json_safe(result.to_dict()))
    else:
        render.decompose(result)


@app.command(cls=Rank1Command)
@with_executor
def reconstruct(
    base: str = BASE_ARG,
    checkpoint: str = typer.Argument(
        ..., metavar="CHECKPOINT", help="Checkpoint θ_t whose update is reduced to rank k."
    ),
    out: str = out_option("Output folder (one rank) or parent of rank-K folders (several)."),
    rank: str = typer.Option(
        ..., "--rank", "-k", metavar="K", help="Rank: 8, a fraction of min(m, n) like 1%, or a list 1,2,4,8."
    ),
    alpha: float = typer.Option(
        1.0, "--alpha", metavar="ALPHA", parser=number("--alpha"), help="Scale of the (norm-matched) rank-k update."
    ),
    no_norm_match: bool = typer.Option(False, "--no-norm-match", help="Add α·ΔW_k as is, without rescaling to ‖ΔW‖."),
    rest: str = choice_option(
        "base", "--rest", ("base", "checkpoint"), "Tensors not selected: 'base' (reference code) or 'checkpoint'."
    ),
    dtype: str = DTYPE_OPT,
    include: list[str] | None = include_option(
        "Glob of tensor names (repeatable); replaces the default matrix-module set."
    ),
    exclude: list[str] | None = EXCLUDE_OPT,
    all_2d: bool = typer.Option(False, "--all-2d", help="Also embeddings, lm_head and other 2-D tensors."),
    exact: bool = typer.Option(False, "--exact", help="Full SVD (torch.linalg.svd) instead of randomized."),
    factors: str | None = typer.Option(
        None, "--factors", metavar="FACTORS_DIR", help="A decompose --out folder: take σ, u, v and ‖ΔW‖ from it."
    ),
    max_shard_size: str = SHARD_OPT,
    output_format: str = choice_option(
        "checkpoint",
        "--format",
        ("checkpoint", "peft"),
        "'checkpoint': merged full checkpoints; 'peft': the rank-k update as a PEFT LoRA adapter (as export-lora).",
    ),
    device: str = DEVICE_OPT,
    hub_cache_policy: str | None = HUB_CACHE_OPT,
    force: bool = FORCE_OPT,
    executor: ExecutorFlags = ExecutorFlags(),
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Write checkpoints that keep only the top-k part of each module's update (AlphaRL's rank-k ablation).

    W = θ₀ + α·(‖ΔW‖/‖ΔW_k‖)·ΔW_k per selected module; other tensors from --rest. Reports how
    much of the update the output dtype rounds away.
    """
    from ..options import parse_ranks
    from ..values import shard_size

    ranks, shard_bytes = parse_ranks(rank), shard_size(max_shard_size)  # --alpha: finite, by its parser
    check_common_early(device)
    check_output_early(out, force, [base, checkpoint, factors])
    exec_opts = executor.check()

    from ..commands.reconstruct import reconstruct as run_reconstruct
    from ..commands.reconstruct.plan import ReconstructOptions

    set_hub_cache_policy(hub_cache_policy)
    opts = ReconstructOptions(
        rank=ranks,
        alpha=alpha,
        norm_match=not no_norm_match,
        rest=rest,
        dtype=dtype,
        include=include or [],
        exclude=exclude or [],
        all_2d=all_2d,
        exact=exact,
        device=device,
        factors=factors,
        max_shard_size=shard_bytes,
    )
    if output_format == "peft":
        if exec_opts.is_ray:
            raise UsageError("--format peft runs locally: leave out --executor ray")
        from ..commands.export_lora.plan import from_reconstruct
        from .export_lora_commands import run_and_render

        run_and_render(base, checkpoint, out, from_reconstruct(opts), force, quiet, as_json, "reconstruct")
        return
    bar, update = stderr_progress(not quiet, "reconstruct")
    with interrupt_hint(RESUME_HINT if exec_opts.is_ray else "nothing was written", out), bar:
        result = run_reconstruct(base, checkpoint, out, options=opts, force=force, progress=update, executor=exec_opts)
    print_result_notes(result)
    for o in result.outputs:
        if o.warning:
            sys.stderr.write(f"rank1: warning: rank {o.rank}: {o.warning}\n")
    if as_json:
        print_json(_json_safe(result.to_dict()))
    else:
        render.reconstruct(result)


@app.command(cls=Rank1Command)
def demo(
    out: str = out_option("Folder for the trained model, run and results.", default="demo-out", short=False),
    seed: int = typer.Option(
        0,
        "--seed",
        metavar="SEED",
        parser=number("--seed", at_least=0, integer=True),
        help="Seed of the model, the task's data and the sampling.",
    ),
    quick: bool = typer.Option(False, "--quick", help="A smaller, shorter run (under a minute): what the tests run."),
    synthetic: bool = typer.Option(
        False,
        "--synthetic",
        help="The planted synthetic run instead of training "
        "(inspect, decompose and a rank-1 reconstruct; its answer is known).",
    ),
    reground: str = typer.Option(
        "auto",
        "--reground",
        metavar="SCHEDULE",
        help="The re-grounded GRPO arm, from the same base and seed: every M optimizer steps, jump the "
        "weights N steps ahead (two-point, norms copied); its speed-up is reported. 'auto': M:N from the "
        "demo's backtest; 'M:N' (e.g. 8:8); 'none': no arm.",
    ),
    device: str = DEVICE_OPT,
    force: bool = FORCE_OPT,
    quiet: bool = QUIET_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train a tiny Llama policy with GRPO on integer addition (a verifiable reward), then run
    decompose, fit-pls, linearity, reconstruct --rank 1 and extrapolate (relex, linear, alpharl) on
    the run and score every written checkpoint on held-out problems (OUT/results.json)."""
    check_output_early(out, force, [])
    check_common_early(device)
    from ..commands.demo_reground import parse_reground

    segments = parse_reground(reground)
    if synthetic:
        if seed != 0 or quick or reground != "auto":
            raise UsageError("--seed, --quick and --reground apply to the trained demo, not to --synthetic")
        from ..commands.demo import run_synthetic_demo

        result = run_synthetic_demo(out, force=force)
        if as_json:
            print_json(
                _json_safe(
                    {
                        "out": result.out,
                        "base": result.base.to_dict(),
                        "run": result.run.to_dict(),
                        "decompose": result.decompose.to_dict(),
                        "reconstruct": result.reconstruct.to_dict(),
                    }
                )
            )
            return
        render.model(result.base)
        render.run(result.run)
        render.decompose(result.decompose)
        render.reconstruct(result.reconstruct)
        return
    from ..commands.demo_rl import run_rl_demo

    def say(line: str) -> None:
        if not quiet:
            sys.stderr.write(f"rank1 demo: {line}\n")

    with interrupt_hint(f"{out} may hold a partial demo; rerun with --force"):
        result = run_rl_demo(out, seed=seed, quick=quick, force=force, device=device, reground=segments, say=say)
    print_result_notes(result)
    if as_json:
        print_json(result.to_dict())
    else:
        render_demo.demo(result)
