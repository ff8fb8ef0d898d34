"""The per-module work of `rank1 decompose` and how modules are spread over worker threads.

One module at a time per worker: its base tensor, then each checkpoint in step order (the update,
its norm, the top-k SVD warm-started from the module's previous checkpoint, canonical signs).
A module's result depends only on its own tensors, never on another module or on which worker
ran it, so outputs are identical whatever the number of workers and after a resume.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice

import torch

from ...errors import InputError
from ...io.checkpoint import Checkpoint
from ...io.reused_reads import ReusedReads
from ...io.run_inputs import prefetched
from ...math.factored_svd import factored_topk
from ...math.finite import all_finite, dtype_max, max_abs, nonfinite_update_cause
from ...math.signs import canonicalize_signs
from ...math.spectrum import frobenius
from ...math.svd import SIGMA_REL_TOL, TopK, topk_svd

SVD_SEED = 0
PARALLEL_MIN_NUMEL = 1 << 18  # two workers only when the largest matrix has this many elements


class Cancelled(Exception):
    """A worker stopped early because the run is ending (an error elsewhere, or Ctrl-C)."""


def nonfinite(label: str, name: str, where: str) -> InputError:
    return InputError(f"{label}: tensor {name!r} {where} has non-finite values (NaN or Inf)")


def bad_update(ck: Checkpoint, name: str, step: int, base_t: torch.Tensor) -> InputError:
    """Why dW of `name` at `step` is not finite: the checkpoint's own values, or (both inputs finite)
    theta_t - theta_0 overflowing float32. Error path only: the checkpoint tensor is read again."""
    theirs = ck.read_raw(name)
    if nonfinite_update_cause(base_t, theirs) == "checkpoint":  # the base was checked when read
        return nonfinite(ck.label, name, f"at step {step}")
    return InputError(
        f"{ck.label}: the update of tensor {name!r} at step {step} overflows float32 "
        f"(|values| up to {max(max_abs(theirs), max_abs(base_t)):.3g} in base and checkpoint)"
    )


@dataclass
class FactoredUpdate:
    """dW of a PEFT adapter's LoRA target, given by its factors: its exact top-k (method
    "factored", math/factored_svd.py) and norm, computed where the update is read."""

    top: TopK
    fro: float

    def topk(self, k: int, **_) -> TopK:
        """The top-k computed from the factors (k is decompose's --rank; the options of the
        dense SVD do not apply)."""
        return self.top


def lora_update(ck: Checkpoint, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(L, R) with dW = L @ R when `ck` is a PEFT adapter and `name` one of its LoRA targets
    (io/peft_adapter.py), else None."""
    factors = getattr(ck, "lora_factors", None)
    return None if factors is None else factors(name, device)


def module_factors(
    name: str,
    base_ckpt: Checkpoint,
    pairs: list[tuple[int, Checkpoint]],
    options,
    device: torch.device,
    *,
    read_ahead: bool,
    on_step: Callable[[], None],
    stop: threading.Event,
    reads: ReusedReads | None = None,
) -> tuple[dict, float]:
    """(the factor lists of one module over all checkpoints, ||theta_0||_F). Raises InputError for
    non-finite data, Cancelled when `stop` is set. `reads`: the calling worker's buffers, reused
    from module to module (3 slots; default: new ones for this module).

    With `read_ahead` the next tensor is read, upcast and subtracted in a background thread while
    the current one is decomposed (the float64-accumulated norm doubles as the NaN/Inf check: no
    extra pass over the tensor). Warm start: each checkpoint's SVD starts from the canonical
    factors of this module's previous checkpoint (cold for its first) and stops at the first
    passing certificates; the Gaussian columns are seeded by the checkpoint's position. Where the
    previous checkpoint's values 2..k took the cold schedule's steps (a noise bulk), this one does
    not try to certify them earlier (`topk_svd(early=False)`: the same values up to rounding, without
    the checks) when they must reach sigma_1's tolerance; under a looser `tail_tol` a bulk's
    certificate passes once it lies low enough under sigma_1, so every checkpoint tries."""
    held: dict = {}
    # One reader at a time (this thread, or the read-ahead thread one checkpoint ahead of it): the
    # update being decomposed and the next one are in different slots.
    reads = reads or ReusedReads(slots=3)

    def load(i: int):
        ck = base_ckpt if i < 0 else pairs[i][1]
        factors = lora_update(ck, name, device) if i >= 0 else None
        if factors is not None:  # a PEFT adapter: dW from its factors, never W_t - W_0
            L, R = factors
            if not (all_finite(L) and all_finite(R)):
                return L @ R, float("nan")  # reported by bad_update, as a checkpoint's NaN/Inf
            if options.rank <= L.shape[1]:
                return FactoredUpdate(*factored_topk(L, R, options.rank))
            t = L @ R
            return t, frobenius(t)
        if device.type == "cpu":  # the base keeps slot 0; the updates take slots 1 and 2 in turn
            t = reads.float32(ck, name, 0 if i < 0 else 1 + i % 2)  # its own buffer: subtract in place
        else:  # torch's caching allocator reuses device memory already
            t = reads.raw(ck, name).to(device).to(torch.float32)
        if i < 0:
            held["base"] = t
        else:
            t.sub_(held["base"])
        return t, frobenius(t)

    warm = options.warm_start and not options.exact
    acc: dict[str, list] = {
        "U": [],
        "S": [],
        "V": [],
        "S_bound": [],
        "fro": [],
        "method": [],
        "residual": [],
        "iterations": [],
    }
    base_t = prev = None
    early = True
    base_fro = 0.0
    for i, loaded in prefetched(list(range(-1, len(pairs))), load, read_ahead):
        d, fro = (loaded, loaded.fro) if isinstance(loaded, FactoredUpdate) else loaded
        if stop.is_set():
            raise Cancelled
        if i < 0:
            if not math.isfinite(fro):
                raise nonfinite(base_ckpt.label, name, "in base")
            base_t, base_fro = d, fro
            continue
        step, ck = pairs[i]
        if not math.isfinite(fro):  # the checkpoint's own NaN/Inf, or a float32 overflow of the difference
            raise bad_update(ck, name, step, base_t)
        svd = FactoredUpdate.topk if isinstance(d, FactoredUpdate) else topk_svd
        res = svd(
            d,
            options.rank,
            exact=options.exact,
            oversample=options.oversample,
            niter=options.niter,
            max_niter=options.max_niter,
            seed=SVD_SEED + i if warm else SVD_SEED,
            fro=fro,
            start=prev if warm else None,
            adaptive=warm,
            early=early,
            tail_tol=options.tail_tol,
        )
        early = res.iterations < 2 + 2 * options.niter or options.tail_tol > SIGMA_REL_TOL
        del d
        if not all_finite(res.S):
            raise InputError(
                f"{ck.label}: the update of tensor {name!r} at step {step} has singular values beyond "
                f"float32 (||dW||_F = {fro:.3g}, float32 max {dtype_max(torch.float32):.3g})"
            )
        prev = U, V = canonicalize_signs(res.U, res.V)  # the stored factors are the next warm start
        for key, value in (
            ("U", U.cpu()),
            ("V", V.cpu()),
            ("S", res.S.cpu()),
            ("S_bound", torch.tensor(res.bounds, dtype=torch.float64)),
            ("fro", fro),
            ("method", res.method),
            ("residual", res.residual),
            ("iterations", res.iterations),
        ):
            acc[key].append(value)
        on_step()
    return acc, base_fro


def as_finished(names: list[str], work: Callable[[str, threading.Event], object], workers: int) -> Iterator:
    """(name, work(name, stop)) for every name, as each finishes, computed by `workers` threads with
    `workers` modules in flight. A worker never waits for an earlier module to be taken: with the
    modules taken in order, a worker done with a small module (k_proj) sat idle until its neighbour
    finished a large one (gate_proj): about an eighth of the decomposition on two cores. The order cannot
    change a result: a module's factors depend only on its own tensors, and decompose reads the
    finished factor files back in the modules' order. With one worker, the order of `names`. When
    the consumer stops early or a worker fails, `stop` is set so the other workers give up at their
    next checkpoint instead of finishing their module (a failure is raised as it is met: of two
    modules with bad data, the one found first is named).

    Each worker thread first takes the calling thread's intra-op thread count: MKL's is per thread
    (a new thread would use every core), and SVD results depend on it in the last bits."""
    stop = threading.Event()
    if workers <= 1:
        for name in names:
            yield name, work(name, stop)
        return
    position = {name: i for i, name in enumerate(names)}
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        running: dict = {}
        todo = iter(names)
        try:
            for name in islice(todo, workers):
                running[pool.submit(work, name, stop)] = name
            while running:
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in sorted(finished, key=lambda f: position[running[f]]):
                    name = running.pop(fut)
                    result = fut.result()
                    nxt = next(todo, None)
                    if nxt is not None:
                        running[pool.submit(work, nxt, stop)] = nxt
                    yield name, result
        finally:
            stop.set()
            for fut in running:
                fut.cancel()


def worker_count(device: torch.device, options, largest_numel: int, fits_two: bool) -> int:
    """Two workers for the randomized SVD on a CPU with at least 2 intra-op threads, for matrices
    large enough to keep a thread busy, when the memory check allows two modules at once; else one
    (the exact SVD keeps the whole machine's threads, as `reconstruct --exact` does, so that the two
    commands give the same triplets)."""
    if (
        device.type != "cpu"
        or options.exact
        or not options.prefetch
        or torch.get_num_threads() < 2
        or largest_numel < PARALLEL_MIN_NUMEL
        or not fits_two
    ):
        return 1
    return 2


@contextmanager
def cpu_threads(device: torch.device, options):
    """On the CPU, a background thread works beside each randomized SVD (a second worker, or the
    thread that forms the next update): torch's intra-op threads get half the cores during the call,
    else the threads compete for every core (on 2 cores that cost 15 % on a warm-started run). Half
    in both cases, so that the bytes written do not depend on the number of workers (SVD results
    depend on the thread count in the last bits). The exact SVD keeps every thread (see
    `worker_count`)."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or options.exact or not options.prefetch or threads < 2:
        yield
        return
    torch.set_num_threads(max(1, threads // 2))
    try:
        yield
    finally:
        torch.set_num_threads(threads)
