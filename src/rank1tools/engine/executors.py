"""Where the per-unit work of a streaming command runs: in this process (`--executor local`) or as
Ray tasks (`--executor ray`, the `ray` extra). Design (issue #13; user docs in docs/ray.md):

- Options (`--executor`, `--ray-address`, `--ray-num-cpus` / `--ray-num-gpus`, `--max-in-flight`,
  `--ray-timeout`): engine/executor_options.py, checked before any heavy import.
- Unit of work: a module for `decompose` (one task walks all checkpoints of one matrix module in
  step order, because the warm start carries each checkpoint's factors to the next); a tensor, or
  consecutive small tensors grouped by bytes, for reconstruct / linearity / extrapolate
  (engine/tensor_units.py: the driver's side, with the resumable ledger).
- Each task opens the sources itself (a local Checkpoint is pickled as its parsed headers, a few
  KB; a Hub checkpoint as its listing pinned to the resolved commit; the tensors are read by the
  task from the shared path or the Hub), does exactly what the local path does for its unit, and
  writes its result files into the output's work folder, which therefore must be on storage every
  worker shares. Nothing heavy passes through the driver or the object store: a task returns at
  most small per-tensor figures. The driver plans, shows progress, assembles tables and manifests,
  and renames the output into place only when every task succeeded.
- Same bytes as local: a task sets torch's intra-op thread count to the one the local run would
  use (SVD results depend on it in the last bits); by default a task also reserves that many CPUs.
  Identical bytes across machines further need the same CPU/BLAS (or GPU model).
- Failures: Ray retries a task whose worker died, or that raised anything but one of rank1's own
  errors (`RetryableError`: an I/O hiccup of the shared filesystem), up to RETRIES times; rank1's
  errors (a data error stays one) are not retried; a task that still fails fails the command with
  the unit's name; finished
  units stay in the work folder, so rerunning resumes. A worker whose rank1tools differs from the
  driver's (version + source hash, `code_fingerprint`) refuses to run.
- `ray` is imported only for `--executor ray` (executor_options.import_ray); this module itself is
  light (no torch at import).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import Rank1Error, UsageError
from .executor_options import ExecutorOptions, host_port, import_ray

RETRIES = 3  # Ray's retries of a task whose worker died (node lost, OOM-killed) or that raised RetryableError


@contextlib.contextmanager
def ray_session(options: ExecutorOptions):
    """Ray, connected: an existing connection in this process is used as it is (tests, notebooks);
    else `ray.init` (address as given, or Ray's own default) and a shutdown at the end. Connecting
    takes at most `options.connect_timeout` seconds (plus one of Ray's own attempts, at worst),
    and leaves SIGTERM and Ctrl-C to rank1 (cleanup, the state line, exit 143/130)."""
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    _connect(ray, options)
    try:
        yield ray
    finally:
        ray.shutdown()


def _connect(ray, options: ExecutorOptions) -> None:
    address = options.address or os.environ.get("RAY_ADDRESS") or None
    what = f"--ray-address {options.address}" if options.address else (f"RAY_ADDRESS {address}" if address else "Ray")
    seconds = options.connect_timeout
    where = host_port(address)
    if where is not None:  # nothing listening, or no route: answered here, within the timeout
        try:
            socket.create_connection(where, timeout=seconds).close()
        except OSError as err:
            reason = "no answer" if isinstance(err, socket.timeout) else (err.strerror or str(err))
            raise UsageError(
                f"{what}: cannot connect to Ray within {seconds:g} s ({reason}); "
                "check the address, or raise --ray-timeout"
            ) from None
    kwargs = {"address": options.address} if options.address else {}
    try:
        with _connect_deadline(seconds), _signals_left_to_rank1():
            # Ray's INFO lines ('Started a local Ray instance') would break `--quiet`; its errors still show
            ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR, **kwargs)
    except _ConnectTimeout:
        ray.shutdown()
        raise UsageError(
            f"{what}: Ray did not answer within {seconds:g} s (is it a Ray head node?); "
            "check the address, or raise --ray-timeout"
        ) from None
    except ConnectionError as err:
        ray.shutdown()
        raise UsageError(f"{what}: cannot connect to Ray ({' '.join(str(err).split())})") from None
    except BaseException:
        ray.shutdown()  # whatever ray.init started (a local instance) stops with us
        raise


class _ConnectTimeout(BaseException):
    """Not an Exception: Ray's retry loops catch those and try again."""


@contextlib.contextmanager
def _connect_deadline(seconds: float):
    """Raise _ConnectTimeout in the main thread after `seconds` (Ray retries a silent address for
    ten minutes). Python runs the alarm's handler between Ray's attempts."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise _ConnectTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _signals_left_to_rank1():
    """ray.init installs its own SIGTERM handlers (they exit 1 or 15 without rank1's cleanup): keep
    rank1's, so SIGTERM during a Ray run cleans up and exits 143 with the state line."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    install = signal.signal
    ours = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

    def keep_ours(signum, handler):
        return ours[signum] if signum in ours else install(signum, handler)

    signal.signal = keep_ours
    try:
        yield
    finally:
        signal.signal = install
        for s, handler in ours.items():
            if handler is not None and signal.getsignal(s) is not handler:
                install(s, handler)


class TaskFailed(Rank1Error):
    """A unit's task raised something that is not one of rank1's own errors."""


class RetryableError(Exception):
    """What a task raises for an exception that is not one of rank1's own errors (an I/O hiccup of
    the shared filesystem, a worker's own trouble): Ray retries the task. rank1's errors (bad
    input data, an output refused) would fail again the same way: they are not retried."""

    def __init__(self, kind: str, text: str):
        super().__init__(f"{kind}: {text}")
        self.kind, self.text = kind, text

    def __reduce__(self):
        return RetryableError, (self.kind, self.text)


def _unit_error(ray, unit: str, err: BaseException) -> Rank1Error:
    """The command's error for a failed task: the cause's own type (exit code) when it is one of
    rank1's errors, its message prefixed with the unit's name."""
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) and err.cause is not None else err
    text = " ".join(str(cause).split()) or type(cause).__name__
    if isinstance(cause, Rank1Error):
        return type(cause)(f"{unit}: {text}") if unit not in text else type(cause)(text)
    if isinstance(err, ray.exceptions.RayError) and not isinstance(err, ray.exceptions.RayTaskError):
        return TaskFailed(f"{unit}: Ray could not run the task ({type(err).__name__}: {text})")
    if isinstance(cause, RetryableError):  # its text is "Kind: message"
        return TaskFailed(f"{unit}: task failed {RETRIES + 1} times: {text}")
    return TaskFailed(f"{unit}: task failed: {type(cause).__name__}: {text}")


def _slots(ray, options: ExecutorOptions, num_cpus: float) -> int:
    """Tasks the cluster can run at once with these per-task resources (at least 1)."""
    if options.max_in_flight:
        return options.max_in_flight
    res = ray.cluster_resources()
    fits = [res.get("CPU", 1.0) / num_cpus] if num_cpus > 0 else []
    if options.num_gpus > 0:
        fits.append(res.get("GPU", 0.0) / options.num_gpus)
    return max(1, int(min(fits))) if fits else 1


def code_fingerprint() -> str:
    """rank1tools' version and a hash of its source files: what a Ray worker must share with the driver
    (a node with another install would compute other bytes, or fail in confusing ways)."""
    global _FINGERPRINT
    if _FINGERPRINT is None:
        from .. import __version__

        root = Path(__file__).resolve().parents[1]  # the rank1tools package, not only engine/
        h = hashlib.sha256()
        for path in sorted(root.rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        _FINGERPRINT = f"{__version__}+{h.hexdigest()[:12]}"
    return _FINGERPRINT


_FINGERPRINT: str | None = None


def run_units(
    units: list,
    task: Callable,
    args: tuple,
    options: ExecutorOptions,
    threads: int,
    label: Callable[[object], str] = str,
) -> Iterator[tuple[object, object]]:
    """Run `task(unit, *args)` as one Ray task per unit, at most `--max-in-flight` at a time;
    yield (unit, what the task returned) as tasks finish (completion order). A failed task
    cancels the rest (and waits for them to stop, so nothing writes into the staging folder
    afterwards) and raises the error of the unit `label(unit)`. `threads`: torch's intra-op
    thread count in every task (the local run's: results depend on it in the last bits)."""
    if not units:
        return
    with ray_session(options) as ray:
        num_cpus = task_cpus(options, threads)
        remote = ray.remote(_in_task).options(
            num_cpus=num_cpus, num_gpus=options.num_gpus, max_retries=RETRIES, retry_exceptions=[RetryableError]
        )
        slots = _slots(ray, options, num_cpus)
        todo = iter(units)
        pending: dict = {}
        expected = code_fingerprint()
        # the task and its arguments (the inputs' parsed headers: ~30 KB per checkpoint) go into Ray's
        # object store once, not pickled again for every unit; in a list, so that Ray hands the task
        # the reference and each worker process unpickles them once (_shared)
        shared = [ray.put((task, args))]

        def submit() -> None:
            unit = next(todo, None)
            if unit is not None:
                pending[remote.remote(shared, threads, expected, unit)] = unit

        for _ in range(slots):
            submit()
        try:
            while pending:
                [ref], _ = ray.wait(list(pending), num_returns=1)
                unit = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayError, Rank1Error, OSError) as err:
                    raise _unit_error(ray, label(unit), err) from None
                submit()
                yield unit, result
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=60)


def task_cpus(options: ExecutorOptions, threads: int) -> float:
    """The CPUs each task reserves: `--ray-num-cpus`, else the intra-op threads it runs (`threads`)."""
    return options.num_cpus if options.num_cpus is not None else float(threads)


_SHARED: dict[str, tuple] = {}  # in a worker process: the last (task, args) it unpickled, by object id


def _shared(box: list) -> tuple:
    ray = import_ray()
    key = box[0].hex()
    if key not in _SHARED:
        _SHARED.clear()  # another command's: at most one set of arguments held per worker
        _SHARED[key] = ray.get(box[0])
    return _SHARED[key]


def check_worker_code(expected: str) -> None:
    """Refuse to work in a process whose rank1tools differs from the driver's (`expected`)."""
    ours = code_fingerprint()
    if ours != expected:
        raise TaskFailed(
            f"the Ray worker on {platform.node()} runs rank1tools {ours} "
            f"({Path(__file__).resolve().parents[1]}), the driver {expected}: install the same rank1tools "
            "on every node (or put it on shared storage and PYTHONPATH)"
        )


def _in_task(box: list, threads: int, expected: str, unit):
    """Runs in the Ray worker: the same rank1tools as the driver, the local thread count, then the unit's work."""
    import torch  # noqa: PLC0415

    check_worker_code(expected)
    torch.set_num_threads(threads)
    task, args = _shared(box)
    try:
        return task(unit, *args)
    except Rank1Error:
        raise
    except Exception as err:  # noqa: BLE001 (anything else is worth another try: see RetryableError)
        raise RetryableError(type(err).__name__, str(err) or type(err).__name__) from None


__all__ = [
    "TaskFailed",
    "check_worker_code",
    "code_fingerprint",
    "run_units",
    "ray_session",
    "task_cpus",
]
