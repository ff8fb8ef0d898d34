"""Shared by the Ray tests: a local Ray instance (2 CPUs, no dashboard) whose workers import
rank1tools from this source tree, and byte-for-byte comparison of output folders."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


@contextmanager
def local_ray(ray, env: dict[str, str] | None = None):
    """Ray started for a test module (or the one already running in this process, kept as is).
    The workers inherit this process's environment at start: PYTHONPATH points to this tree's src
    (an installed rank1tools elsewhere would fail the workers' code check), plus `env`."""
    started = not ray.is_initialized()
    saved = dict(os.environ)
    if started:
        path = os.environ.get("PYTHONPATH", "")
        os.environ["PYTHONPATH"] = SRC if not path else f"{SRC}{os.pathsep}{path}"
        os.environ.update(env or {})
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()
            os.environ.clear()
            os.environ.update(saved)


def tree_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_same_tree(actual: Path, expected: Path, min_files: int = 1) -> None:
    a, e = tree_bytes(actual), tree_bytes(expected)
    assert sorted(a) == sorted(e)
    assert len(e) >= min_files
    for name in e:
        assert a[name] == e[name], name
