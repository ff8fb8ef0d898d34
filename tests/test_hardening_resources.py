"""Hardening: resources checked up front by the streaming commands (linearity, extrapolate relex /
linear) and by every checkpoint writer: a header declaring a huge tensor in a sparse file is
refused from the headers alone (memory of the streamed chunks; disk for the outputs), exit code,
one line, nothing written."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from _support import run_main


def _assert_refused(r, code: int, pattern: str, out: Path) -> None:
    """Exit code, exactly one `rank1: error:` line matching `pattern`, and nothing written."""
    assert r.returncode == code, r.stderr
    assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("rank1: error: "), r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# ---- streaming commands: the same up-front checks (#20) ----


def _sparse_run(tmp_path: Path, steps=(10, 20, 30)) -> tuple[Path, list[Path]]:
    """A base and checkpoints whose one tensor is a consistent 4 GiB F32 in a sparse file."""
    name = "model.layers.0.mlp.up_proj.weight"
    header = json.dumps({name: {"dtype": "F32", "shape": [32768, 32768], "data_offsets": [0, 4 * 32768**2]}})
    header += " " * (-len(header) % 8)
    folders = [tmp_path / "base", *(tmp_path / "run" / f"checkpoint-{s}" for s in steps)]
    for d in folders:
        d.mkdir(parents=True)
        with open(d / "model.safetensors", "wb") as f:
            f.write(len(header).to_bytes(8, "little") + header.encode())
            f.truncate(8 + len(header) + 4 * 32768**2)
    return folders[0], folders[1:]


def test_linearity_checks_its_streaming_memory_up_front(tmp_path, monkeypatch):
    base, cks = _sparse_run(tmp_path)
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", str(10**8))
    out = tmp_path / "o"
    r = run_main("linearity", str(base), *map(str, cks), "--out", str(out), "--device", "cpu", "--quiet")
    _assert_refused(
        r,
        3,
        r"tensor 'model.layers.0.mlp.up_proj.weight' \[32768, 32768\]: needs about 0\.\d+ GB of "
        r"memory but 0\.1 GB are available$",
        out,
    )
    # the estimate is of the streamed chunks, not of the tensor: far below its 4.3 GB
    from rank1tools.io.run_inputs import chunk_elements
    from rank1tools.resources import streaming_peak_bytes

    assert streaming_peak_bytes(3, chunk_elements(3), 4) < 10**9


@pytest.mark.parametrize("method", ["relex", "linear"])
def test_extrapolation_whose_outputs_cannot_fit_on_disk_is_refused_up_front(tmp_path, monkeypatch, method):
    import shutil as _shutil

    base, cks = _sparse_run(tmp_path)
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", str(8 * 10**9))
    real = _shutil.disk_usage
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: real(p)._replace(free=10**9))
    out = tmp_path / "o"
    r = run_main(
        "extrapolate",
        str(base),
        "--run",
        str(tmp_path / "run"),
        "--method",
        method,
        "--target-step",
        "40,50",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(
        r,
        4,
        rf"{re.escape(str(out))}: 2 checkpoints: needs about 8\.59 GB of disk but 1 GB are free "
        rf"at {re.escape(str(tmp_path))}$",
        out,
    )
    monkeypatch.setenv("RANK1_AVAILABLE_MEMORY", str(10**7))  # and the streaming memory, checked first
    r = run_main(
        "extrapolate",
        str(base),
        "--run",
        str(tmp_path / "run"),
        "--method",
        method,
        "--target-step",
        "40",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--quiet",
    )
    _assert_refused(r, 3, r"needs about 0\.\d+ GB of memory but 0\.01 GB are available$", out)
