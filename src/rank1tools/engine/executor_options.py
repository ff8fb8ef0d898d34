"""The executor options, checked before any heavy import: `--executor local|ray` and the Ray
options as one ExecutorOptions, the device a command's tasks compute on, Ray's import, and the
command line less these options. Where the work then runs (the Ray session, one task per unit):
engine/executors.py; user docs: docs/ray.md.

- Options: `--executor local|ray` (default local); `--ray-address` (default: Ray's own convention,
  i.e. `ray.init()` with no address: the RAY_ADDRESS variable, else a running local cluster, else a
  fresh local instance); `--ray-num-cpus` / `--ray-num-gpus` per task (fractions allowed, e.g. 0.25
  GPU so four tasks share one GPU); `--max-in-flight` (tasks submitted at once; default: as many
  as the cluster can run at the same time), which bounds the memory the tasks hold.
- Light (no torch, no ray at import) so the CLI can check options before heavy imports.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import UsageError

EXECUTORS = ("local", "ray")
INSTALL_HINT = "pip install 'rank1tools[ray]'"
# CLI options that choose where work runs and not what it computes: left out of the command line
# recorded in provenance files, so that outputs are byte-identical whatever the executor
EXECUTOR_FLAGS = {
    "kind": "--executor",
    "address": "--ray-address",
    "num_cpus": "--ray-num-cpus",
    "num_gpus": "--ray-num-gpus",
    "max_in_flight": "--max-in-flight",
    "connect_timeout": "--ray-timeout",
}
_VALUED_FLAGS = tuple(EXECUTOR_FLAGS.values())  # the CLI declares its options from EXECUTOR_FLAGS (cli/params.py)
CONNECT_TIMEOUT = 30.0  # seconds: --ray-timeout's default, the bound on connecting to a cluster
# what ray.init takes: auto, local, HOST:PORT (the GCS), ray://HOST:PORT (Ray Client); a host name,
# an IPv4 address or a bracketed IPv6 address
_HOST = r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9.-]{0,253}[A-Za-z0-9])?)"
_ADDRESS = re.compile(rf"(?:ray://)?({_HOST}):([0-9]{{1,5}})")


@dataclass(frozen=True)
class ExecutorOptions:
    kind: str = "local"
    address: str | None = None
    num_cpus: float | None = None  # None: the intra-op thread count a local run would use
    num_gpus: float = 0.0
    max_in_flight: int | None = None  # None: as many tasks as the cluster runs at once
    connect_timeout: float = CONNECT_TIMEOUT  # seconds to reach the cluster (--ray-timeout)

    @property
    def is_ray(self) -> bool:
        return self.kind == "ray"


def check_executor(
    kind: str,
    *,
    address: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
    max_in_flight: int | None = None,
    timeout: float | None = None,
) -> ExecutorOptions:
    """Validate the executor options (before any heavy import); for `ray`, that Ray is installed."""
    flag = EXECUTOR_FLAGS
    if kind not in EXECUTORS:
        raise UsageError(f"{flag['kind']} {kind!r}: choose one of {', '.join(EXECUTORS)}")
    ray_only = {
        "address": address,
        "num_cpus": num_cpus,
        "num_gpus": num_gpus,
        "max_in_flight": max_in_flight,
        "connect_timeout": timeout,
    }
    if kind == "local":
        given = [flag[name] for name, v in ray_only.items() if v is not None]
        if given:
            raise UsageError(f"{given[0]} applies to {flag['kind']} ray only")
        return ExecutorOptions()
    for name in ("num_cpus", "num_gpus"):
        if ray_only[name] is not None and not ray_only[name] >= 0:
            raise UsageError(f"{flag[name]} {ray_only[name]}: must be zero or more")
    if max_in_flight is not None and max_in_flight < 1:
        raise UsageError(f"{flag['max_in_flight']} {max_in_flight}: must be at least 1")
    if timeout is not None and not 0 < timeout <= 86400:
        raise UsageError(f"{flag['connect_timeout']} {timeout}: seconds, more than 0 (at most a day)")
    check_address(address, flag["address"])
    if address is None:
        check_address(os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS")
    import_ray()
    return ExecutorOptions(
        "ray", address, num_cpus, num_gpus or 0.0, max_in_flight, CONNECT_TIMEOUT if timeout is None else float(timeout)
    )


def check_address(address: str | None, what: str) -> None:
    """A Ray address ray.init accepts: auto, local, HOST:PORT or ray://HOST:PORT (exit 2 otherwise)."""
    if address is None or address in ("auto", "local"):
        return
    m = _ADDRESS.fullmatch(address)
    if m is None or not 0 < int(m[2]) < 65536:
        raise UsageError(
            f"{what} {address!r}: expected HOST:PORT (the head node's GCS, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT (Ray Client), auto or local"
        )


def host_port(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address; None for auto, local or none."""
    m = _ADDRESS.fullmatch(address or "")
    return None if m is None else (m[1].strip("[]"), int(m[2]))


def import_ray():
    """The `ray` module (the `ray` extra); exit 2 with the install hint when it is missing."""
    try:
        import ray  # noqa: PLC0415 (optional extra, only for --executor ray)
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def without_executor_args(argv: list[str]) -> list[str]:
    """`argv` less the executor options (they change where work runs, not the result)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUED_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in _VALUED_FLAGS)):
            out.append(arg)
    return out


def task_device(spec: str, options: ExecutorOptions):
    """The device a command computes on: `resolve_device` locally; with Ray, where the TASKS run:
    `auto` is cuda exactly when each task reserves a GPU (`--ray-num-gpus`), and cuda without a
    reserved GPU is refused (Ray hides the GPUs from such a task)."""
    from ..device import parse_device, resolve_device  # noqa: PLC0415

    if not options.is_ray:
        return resolve_device(spec)
    dev = parse_device(("cuda" if options.num_gpus > 0 else "cpu") if spec == "auto" else spec)
    if dev.type == "cuda" and not options.num_gpus > 0:
        raise UsageError(f"--device {spec} with --executor ray needs --ray-num-gpus (e.g. 1, or 0.25 to share a GPU)")
    return dev


__all__ = [
    "EXECUTORS",
    "ExecutorOptions",
    "check_executor",
    "import_ray",
    "task_device",
    "without_executor_args",
]
