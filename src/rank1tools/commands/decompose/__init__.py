"""`rank1 decompose`: streaming spectra of dW_t = theta_t - theta_0 per matrix module and checkpoint.

Module-major: the base tensor is read once, then the same tensor from every checkpoint, so
memory is a few tensors and each file is read once. The per-module work (modules.py) runs
in two worker threads on a multi-core CPU, else in one whose next tensor is read and subtracted in
a background thread while the current one is decomposed; each finished module's factor file is
written and read back by factor_files.py.

Outputs (docs/formats.md, "Factor store"): spectrum.csv / spectrum.jsonl (one row per module and
step), summary.json, and the factor store (factors/<module>.safetensors + manifest.json) that
later commands read instead of the checkpoints. Work happens in `.OUT.partial/` beside the target;
each finished module is saved there atomically, so rerunning the same command after an
interruption continues where it stopped, and the result is byte-identical to an uninterrupted run.
Only the complete folder is renamed to OUT.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import __version__
from ...engine.executor_options import ExecutorOptions, task_device
from ...engine.executors import run_units, task_cpus
from ...engine.spectrum_tables import module_labels, spectrum_rows, summarize, write_spectrum_tables
from ...errors import InputError, UsageError
from ...io.checkpoint import Checkpoint
from ...io.compat import check_compatible, tensor_shapes
from ...io.factor_store import FACTOR_FORMAT, FACTOR_FORMAT_VERSION, factor_file
from ...io.fingerprint import source_record
from ...io.output_lock import locked_output
from ...io.outputs import output_errors, publish
from ...io.reused_reads import ReusedReads
from ...io.run_inputs import open_run_inputs
from ...io.work_folder import discard_unless_resumed, make_folder, open_work_folder
from ...io.writer import provenance, write_provenance
from ...jsonutil import json_safe as _json_safe
from ...math.svd import MIN_SKETCH, SIGMA_REL_TOL, TAIL_REL_TOL
from ...modules import expert_slices, select_tensors
from ...plot_common import draw_plots
from ...plots import decompose_plots
from ...plots_experts import expert_plots
from ...resources import available_memory_bytes, check_memory, decompose_peak_bytes, svd_bytes
from ...values import StepSelection
from .factor_files import save_module, stored_figures, stored_module
from .modules import SVD_SEED, as_finished, cpu_threads, module_factors, worker_count


@dataclass
class DecomposeOptions:
    rank: int = 8
    exact: bool = False
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    all_2d: bool = False
    device: str = "auto"
    oversample: int = 10
    niter: int = 4  # the cold start's fixed power iterations (doubled up to max_niter on a miss)
    max_niter: int = 16
    # warm: each checkpoint's sketch starts from the previous checkpoint's factors of the same module and
    # iterates until the certificate passes; cold: a fresh Gaussian sketch, `niter` iterations
    warm_start: bool = True
    # the warm start's tolerance of sigma_2..k, relative to sigma_1 (sigma_1, u_1, v_1: SIGMA_REL_TOL)
    tail_tol: float = TAIL_REL_TOL
    prefetch: bool = True  # background threads: a second worker on a multi-core CPU, else read-ahead
    workers: int | None = None  # None: modules.worker_count; 1 or 2 to force
    plots: bool = False  # energy over steps by type and a layer x type heatmap (the `plot` extra)


@dataclass
class DecomposeResult:
    out: str
    steps: list[int]
    modules: list[str]
    rows: list[dict]
    summary: dict
    resumed_modules: int
    fallbacks: list[tuple[str, int]]
    plots: list[str] = field(default_factory=list)
    plot_hint: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "out": self.out,
            "steps": self.steps,
            "modules": len(self.modules),
            "resumed_modules": self.resumed_modules,
            "exact_fallbacks": [{"module": m, "step": s} for m, s in self.fallbacks],
            "summary": self.summary,
            "plots": self.plots,
            "notes": self.notes,
        }


@dataclass(frozen=True)
class DecomposePlan:
    """One decompose run, decided before any output exists: inputs, modules, SVD options and where
    it runs. Picklable: the local path and every Ray task receive this same object."""

    base: Checkpoint
    pairs: tuple[tuple[int, Checkpoint], ...]  # (step, checkpoint) in step order
    step_source: str  # "trainer" (steps from the folder names) or "position"
    modules: tuple[str, ...]  # the selected matrix modules, in the base's order
    shapes: dict[str, tuple[int, ...]]
    options: DecomposeOptions
    device: str
    workers: int  # SVD worker threads of the local path (modules.worker_count)
    executor: ExecutorOptions
    out: str  # the output as the user named it
    force: bool


def check_tail_tol(tail_tol: float) -> None:
    """--tail-tol lies between sigma_1's tolerance (today's schedule) and 1."""
    if not SIGMA_REL_TOL <= tail_tol <= 1:
        raise UsageError(
            f"--tail-tol {tail_tol:g}: must lie between {SIGMA_REL_TOL:g} (the tolerance of sigma_1) and 1"
        )


def _check_selection(base: Checkpoint, pairs: list[tuple[int, Checkpoint]], modules: list[str], rank: int) -> None:
    for name in modules:
        shape = base.entry(name).shape
        if rank > min(shape):
            raise UsageError(f"--rank {rank} exceeds min(m, n) = {min(shape)} of {name} {list(shape)}")
    for step, ck in pairs:
        check_compatible(base, ck, modules, label=f"{ck.label} (step {step})")


def _check_memory(
    base: Checkpoint, others: list[Checkpoint], modules: list[str], options: DecomposeOptions, device: torch.device
) -> int:
    """The number of workers (modules.worker_count); refuse before any work when even one
    worker's working set for the largest module exceeds the available memory."""

    def need(name: str, workers: int) -> int:
        e = base.entry(name)
        raw = max(c.entry(name).nbytes for c in (base, *others))
        sketch = max(options.rank + options.oversample, MIN_SKETCH)
        exact = options.exact or min(e.shape) <= 2 * sketch
        return decompose_peak_bytes(
            e.numel, raw, svd_bytes(e.shape, exact, sketch), on_cpu=device.type == "cpu", workers=workers
        )

    name = max(modules, key=lambda n: need(n, 1))
    avail = available_memory_bytes()
    two = need(max(modules, key=lambda n: need(n, 2)), 2)
    workers = options.workers or worker_count(
        device, options, max(base.entry(n).numel for n in modules), avail is None or two <= avail
    )
    check_memory(need(name, 1) if workers == 1 else two, f"tensor {name!r} {list(base.entry(name).shape)}")
    return workers


def decompose(
    base: str,
    checkpoints: list[str],
    out: str,
    *,
    run: str | None = None,
    steps: StepSelection | str | None = None,
    hub_run: dict | None = None,
    options: DecomposeOptions = DecomposeOptions(),
    force: bool = False,
    progress: Callable[[int, int], None] | None = None,
    on_module_done: Callable[[str], None] | None = None,
    executor: ExecutorOptions = ExecutorOptions(),
) -> DecomposeResult:
    """Decompose every selected module's update at every checkpoint; write the spectrum and factor store.

    `progress(done, total)` is called after each (module, checkpoint); `on_module_done(name)` after
    each module is saved (tests use it to simulate an interruption). `executor`: where modules
    are decomposed (rank1tools.engine.executors); with Ray, one task per module writes its factor file.
    """
    if options.rank < 1:
        raise UsageError(f"--rank {options.rank}: must be at least 1")
    check_tail_tol(options.tail_tol)
    inputs = open_run_inputs(base, checkpoints, run, steps, hub_run)
    base_ckpt, pairs, step_source = inputs.base, inputs.checkpoints, inputs.step_source
    shapes = tensor_shapes(base_ckpt, [c for _, c in pairs])  # with an lm_head the checkpoints untied
    shapes = expert_slices(shapes)  # a fused [experts, out, in] tensor is one matrix module per expert
    modules = select_tensors(shapes, include=options.include, exclude=options.exclude, all_2d=options.all_2d)
    if not modules:
        raise UsageError("no tensors selected (check --include/--exclude)")
    _check_selection(base_ckpt, pairs, modules, options.rank)
    for ck in (base_ckpt, *(c for _, c in pairs)):
        ck.expect(modules)
    device = task_device(options.device, executor)
    workers = _check_memory(base_ckpt, [c for _, c in pairs], modules, options, device)
    plan = DecomposePlan(
        base=base_ckpt,
        pairs=tuple(pairs),
        step_source=step_source,
        modules=tuple(modules),
        shapes=shapes,
        options=options,
        device=str(device),
        workers=workers,
        executor=executor,
        out=out,
        force=force,
    )
    with locked_output(out, force=force, inputs=inputs.local_paths()) as target, cpu_threads(device, options):
        result = _decompose_locked(plan, target, progress, on_module_done)
    result.notes = list(inputs.notes)
    return result


def _decompose_locked(
    plan: DecomposePlan,
    target: Path,
    progress: Callable[[int, int], None] | None,
    on_module_done: Callable[[str], None] | None,
) -> DecomposeResult:
    """Decompose into the resumable work folder `.OUT.partial`, then publish it at `target`."""
    base_ckpt, pairs, modules, shapes, options = plan.base, plan.pairs, list(plan.modules), plan.shapes, plan.options
    device, workers, executor, out = torch.device(plan.device), plan.workers, plan.executor, plan.out
    manifest = {
        "format": FACTOR_FORMAT,
        "format_version": FACTOR_FORMAT_VERSION,
        "tool_version": __version__,
        "base": source_record(base_ckpt),  # source, revision, content fingerprint (io/fingerprint.py)
        "checkpoints": [{"step": s, **source_record(c)} for s, c in pairs],
        "step_source": plan.step_source,
        "parameters": {
            "rank": options.rank,
            "svd": "exact" if options.exact else "randomized",
            "oversample": options.oversample,
            **_svd_parameters(options),
            "seed": SVD_SEED,
            "include": options.include,
            "exclude": options.exclude,
            "all_2d": options.all_2d,
            "device": device.type,
            "delta_dtype": "float32",
        },
        "modules": [
            {
                "name": n,
                "shape": list(shapes[n]),
                "layer": module_labels(n, shapes[n])[0],
                "type": module_labels(n, shapes[n])[1],
                "file": f"factors/{factor_file(n)}",
            }
            for n in modules
        ],
    }
    manifest_bytes = (json.dumps(manifest, indent=2) + "\n").encode()

    work = open_work_folder(target, "manifest.json", manifest_bytes)
    make_folder(work / "factors")

    done = [n for n in modules if stored_module(work / "factors" / factor_file(n)) == n]
    done_set = set(done)
    todo = [n for n in modules if n not in done_set]
    total = len(modules) * len(pairs)
    count = len(done) * len(pairs)
    if progress:
        progress(count, total)

    lock = threading.Lock()

    def step_done() -> None:
        nonlocal count
        with lock:
            count += 1
            if progress:
                progress(count, total)

    buffers = threading.local()  # each worker thread's read buffers, reused from module to module

    def compute(name: str, stop: threading.Event):
        if not hasattr(buffers, "reads"):
            buffers.reads = ReusedReads(slots=3)
        return module_factors(
            name,
            base_ckpt,
            pairs,
            options,
            device,
            read_ahead=options.prefetch and workers == 1,
            on_step=step_done,
            stop=stop,
            reads=buffers.reads,
        )

    steps = [s for s, _ in pairs]
    try:
        if executor.is_ray:  # each task saves its module's factor file into the staging folder
            # a read-ahead thread only where the task has a core for it, as locally (one worker)
            read_ahead = options.prefetch and task_cpus(executor, torch.get_num_threads()) >= 2
            args = (plan, str(work / "factors"), read_ahead)
            for name, _ in run_units(todo, module_task, args, executor, torch.get_num_threads()):
                for _ in pairs:
                    step_done()
                if on_module_done:
                    on_module_done(name)
        else:
            with closing(as_finished(todo, compute, workers)) as results:
                for name, (acc, base_fro) in results:
                    save_module(work / "factors" / factor_file(name), name, steps, acc, base_fro)
                    if on_module_done:
                        on_module_done(name)
    except InputError:
        discard_unless_resumed(work, bool(done))
        raise
    except Exception:  # e.g. Ray unreachable: keep the work folder only when it holds a finished module
        discard_unless_resumed(work, any(stored_module(work / "factors" / factor_file(n)) == n for n in modules))
        raise

    # Assemble the tables from the stored factors, so a resumed run equals an uninterrupted one.
    rows: list[dict] = []
    fallbacks: list[tuple[str, int]] = []
    for name in modules:
        data, meta = stored_figures(work / "factors" / factor_file(name))
        rows.extend(spectrum_rows(name, shapes[name], data, meta["methods"], meta.get("iterations")))
        fallbacks.extend((name, s) for s, m in zip(data["steps"].tolist(), meta["methods"]) if m == "exact-fallback")
    summary = summarize(rows)
    with output_errors(work):
        write_spectrum_tables(work, rows, options.rank)
        (work / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
        write_provenance(work, provenance("decompose", [base_ckpt, *(c for _, c in pairs)], manifest["parameters"]))
        plots, hint = draw_plots(lambda: decompose_plots(rows, work / "plots")) if options.plots else ([], None)
        if options.plots and hint is None:  # a mixture-of-experts model: layer x expert too
            plots += [str(p) for p in expert_plots(rows, work / "plots")]
    publish(work, target, force=plan.force, label=out)
    return DecomposeResult(
        out=out,
        steps=[s for s, _ in pairs],
        modules=modules,
        rows=rows,
        summary=summary,
        resumed_modules=len(done),
        fallbacks=fallbacks,
        plots=[str(Path(out) / Path(p).relative_to(work)) for p in plots],
        plot_hint=hint,
    )


def module_task(name: str, plan: DecomposePlan, factors: str, read_ahead: bool) -> None:
    """One module as a Ray task (rank1tools.engine.executors.run_units): what the local path does for it,
    its factor file saved into the shared staging folder; nothing returned through Ray."""
    acc, base_fro = module_factors(
        name,
        plan.base,
        plan.pairs,
        plan.options,
        torch.device(plan.device),
        read_ahead=read_ahead,
        on_step=lambda: None,
        stop=threading.Event(),
    )
    save_module(Path(factors) / factor_file(name), name, [s for s, _ in plan.pairs], acc, base_fro)


def _svd_parameters(options: DecomposeOptions) -> dict:
    """The manifest's description of the SVD schedule (a .partial folder of another one is not reused)."""
    if options.warm_start and not options.exact:
        return {"start": "warm", "niter": "adaptive", "max_niter": options.max_niter, "tail_tol": options.tail_tol}
    return {"start": "cold", "niter": options.niter, "max_niter": options.max_niter}
