"""Hardening: hostile metrics files for fit-pls (rank1tools.io.metrics) and the metric's numerical
range. Duplicated JSON keys, FIFOs and devices, oversized and binary files, very wide or sparse
files (linear-time parsing, checked by counting the work, not by timing), metrics near the ends
of float64. Refusals are one-line InputErrors naming the file (exit 3)."""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from rank1tools.errors import InputError, UsageError
from rank1tools.io import metrics as metrics_mod
from rank1tools.io import text_files
from rank1tools.io.metrics import DEFAULT_MAX_BYTES, ENV_MAX_BYTES, read_metrics


def refuse(path: Path, pattern: str, code: int = 3, **kw) -> str:
    with pytest.raises((InputError, UsageError)) as info:
        read_metrics(path, **kw)
    msg = str(info.value)
    assert info.value.exit_code == code
    assert "\n" not in msg and msg.startswith(str(path) + ": "), msg
    assert re.search(pattern, msg), msg
    return msg


# ---- duplicated keys: json would keep the last value silently ----


@pytest.mark.parametrize(
    "name, text, line, key",
    [
        ("m.json", '{"10": 0.5,\n "20": 0.6,\n "10": 0.7}\n', 3, "10"),
        (
            "m.json",
            '[{"step": 10, "acc": 0.5},\n {"step": 20, "acc": 0.6},\n {"step": 30, "acc": 0.6,\n  "acc": 0.9}]',
            4,
            "acc",
        ),
        ("m.jsonl", '{"step": 10, "acc": 0.5}\n{"step": 20, "acc": 0.6, "acc": 0.1}\n', 2, "acc"),
        ("m.jsonl", '{"step": 10, "acc": 0.5}\n\n{"step": 20, "step": 30, "acc": 0.1}\n', 3, "step"),
        (
            "trainer_state.json",
            json.dumps({"log_history": [{"step": 1, "eval_acc": 0.1}]}, indent=1)[:-1] + ',\n"log_history": []}',
            9,
            "log_history",
        ),
        ("m.json", '{"10": {"a": 1, "a": 2}}', 1, "a"),
    ],
)
def test_duplicated_json_key_is_refused_with_its_line(tmp_path, name, text, line, key):
    p = tmp_path / name
    p.write_text(text)
    refuse(p, rf"^{re.escape(str(p))}: line {line}: key {re.escape(repr(key))} appears twice in one JSON object")


def test_same_step_twice_with_equal_values_still_accepted(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 10, "acc": 0.5}\n{"step": 10, "acc": 0.5}\n{"step": 20, "acc": 0.75}\n')
    assert read_metrics(p).values == {10: 0.5, 20: 0.75}


# ---- files that are not regular, too large, or binary ----


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "metrics.csv"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def read():
        try:
            read_metrics(fifo)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=read, daemon=True)  # the old reader blocked forever in open()
    t.start()
    t.join(60)
    assert not t.is_alive(), "read_metrics blocked on a FIFO"
    assert isinstance(errors[0], InputError) and errors[0].exit_code == 3
    assert str(errors[0]) == f"{fifo}: metrics file is a FIFO, not a regular file"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom"])
def test_devices_are_refused(device):
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    refuse(Path(device), r"metrics file is a character device, not a regular file$")


def test_size_limit_and_its_variable(tmp_path, monkeypatch):
    p = tmp_path / "m.csv"
    p.write_text("step,acc\n" + "".join(f"{s},0.5\n" for s in range(20)))
    size = p.stat().st_size
    assert read_metrics(p).values[19] == 0.5  # default limit 256 MiB
    assert DEFAULT_MAX_BYTES == 256 * 2**20
    monkeypatch.setenv(ENV_MAX_BYTES, str(size - 1))
    refuse(p, rf"metrics file is {size} bytes, above the limit of {size - 1} \(set {ENV_MAX_BYTES}=BYTES")
    monkeypatch.setenv(ENV_MAX_BYTES, str(size))
    assert len(read_metrics(p).values) == 20
    for bad in ("abc", "0", "-5", "1e9"):
        monkeypatch.setenv(ENV_MAX_BYTES, bad)
        with pytest.raises(UsageError, match=ENV_MAX_BYTES):
            read_metrics(p)


def test_large_sparse_file_of_nuls_is_refused_by_size_before_reading(tmp_path, monkeypatch):
    p = tmp_path / "zeros.csv"
    with open(p, "wb") as f:
        f.truncate(1 << 30)  # 1 GiB of NULs, sparse: nothing is read (the old reader read it all)
    refuse(p, rf"metrics file is {1 << 30} bytes, above the limit of {DEFAULT_MAX_BYTES}")
    reads = []
    real_read = text_files.os.fdopen

    def counting_fdopen(*a, **kw):  # every byte read goes through this file object
        f = real_read(*a, **kw)
        orig = f.read
        f.read = lambda n=-1: reads.append(n) or orig(n)
        return f

    monkeypatch.setattr(text_files.os, "fdopen", counting_fdopen)
    monkeypatch.setenv(ENV_MAX_BYTES, str(2 << 30))  # under a raised limit: refused after the first block
    refuse(p, r"metrics file is binary \(NUL byte at byte 0\), not CSV or JSON text$")
    assert reads == [text_files.SNIFF_BYTES]


def test_nul_byte_after_the_first_block_is_refused(tmp_path):
    p = tmp_path / "m.csv"
    body = ("step,acc\n" + "".join(f"{s},0.5\n" for s in range(20000))).encode()
    at = len(body) - 7
    p.write_bytes(body[:at] + b"\x00" + body[at:])
    assert at > text_files.SNIFF_BYTES
    refuse(p, rf"metrics file is binary \(NUL byte at byte {at}\)")


# ---- linear-time parsing ----


def test_wide_csv_reads_and_names_a_late_duplicate_column(tmp_path):
    n = 80_000
    cols = ["step", *(f"c{i}" for i in range(n))]
    p = tmp_path / "wide.csv"
    p.write_text(",".join(cols) + "\n" + "10," + ",".join(str(i / n) for i in range(n)) + "\n")
    m = read_metrics(p, metric=f"c{n - 1}")
    assert m.values == {10: (n - 1) / n} and len(m.available) == n
    msg = refuse(p, r"several metrics \(c0, c1, .*, c29, \.\.\. \(80000 in all\)\); choose one with --metric$", code=2)
    assert len(msg) < 400  # one readable line, not 80000 names
    p.write_text(",".join([*cols, "c79998"]) + "\n" + "10," + ",".join("1" for _ in range(n + 1)) + "\n")
    refuse(p, r"line 1: column 'c79998' appears twice in the header$")


def test_sparse_json_rows_are_scanned_once(tmp_path, monkeypatch):
    """Each row logs its own key: deciding which columns hold numbers looks at each cell once
    (the old column-by-row scan looked at rows² / 2 cells)."""
    rows = 400
    p = tmp_path / "m.jsonl"
    p.write_text("".join(json.dumps({"step": s, f"k{s}": 0.5, "acc": s / rows}) + "\n" for s in range(rows)))
    calls = []
    real = metrics_mod._is_number
    monkeypatch.setattr(metrics_mod, "_is_number", lambda raw, text: calls.append(1) or real(raw, text))
    m = read_metrics(p, metric="acc")
    assert m.values[rows - 1] == (rows - 1) / rows and len(m.available) == rows + 1
    assert len(calls) <= 3 * rows  # at most once per cell


# ---- the metric's numerical range (fit-pls) ----

STEPS = [10, 20, 30, 40, 50]
ACC = np.array([0.20, 0.31, 0.33, 0.41, 0.52])


def _factor_store(folder: Path) -> Path:
    from rank1tools.synthetic import write_factor_store

    rng = np.random.default_rng(0)
    modules = {}
    for _i, t in enumerate(("q", "k")):
        X = (
            rng.standard_normal(12)[None, :]
            + ACC[:, None] * rng.standard_normal(12)[None, :]
            + 0.05 * rng.standard_normal((len(STEPS), 12))
        )
        S = np.linalg.norm(X, axis=1)
        V = rng.standard_normal((len(STEPS), 8))
        modules[f"model.layers.0.self_attn.{t}_proj.weight"] = {
            "U": X / S[:, None],
            "S": S,
            "V": V / np.linalg.norm(V, axis=1, keepdims=True),
            "layer": 0,
            "type": t,
        }
    return write_factor_store(folder, STEPS, modules)


def _fit(tmp_path: Path, name: str, values, *extra: str):
    from _support import run_main

    csv = tmp_path / f"{name}.csv"
    csv.write_text("step,acc\n" + "".join(f"{s},{float(v)!r}\n" for s, v in zip(STEPS, values)))
    out = tmp_path / name
    return run_main(
        "fit-pls",
        str(tmp_path / "store"),
        "--metrics",
        str(csv),
        "--out",
        str(out),
        "--no-plots",
        "--json",
        "-q",
        *extra,
    ), out


def _fit_rows(out: Path) -> dict[str, dict]:
    return {r["module"]: r for r in map(json.loads, (out / "fits.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("exp", [1023, -1020])  # metric up to 4e307 (squares overflow), or 5e-308 (squares underflow)
def test_metric_near_the_ends_of_float64_fits_as_its_scaled_copy(tmp_path, exp):
    """A metric scaled by 2^exp fits exactly as the O(1) metric: same R²s (bit for bit), score line
    scaled by 2^exp; no numpy warning, no NaN."""
    _factor_store(tmp_path / "store")
    ref, ref_out = _fit(tmp_path, "ref", ACC)
    assert ref.returncode == 0, ref.stderr
    far = np.ldexp(ACC, exp)  # exact: every value stays a normal float64
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # a numpy warning would be an error
        r, out = _fit(tmp_path, "far", far)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr
    for name, want in _fit_rows(ref_out).items():
        got = _fit_rows(out)[name]
        for key in ("r2", "loo_r2", "r2_step"):
            assert math.isfinite(got[key]) and got[key] == want[key], (name, key)
        assert got["score_b"] == math.ldexp(want["score_b"], exp) and got["score_a"] == math.ldexp(want["score_a"], exp)


def test_relative_metric_that_overflows_is_refused(tmp_path):
    _factor_store(tmp_path / "store")
    r, out = _fit(tmp_path, "rel", [0.2, 0.3, 0.35, 0.4, 1e-320], "--relative")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: ") and "Traceback" not in r.stderr
    assert "--relative divides by the metric at step 50, 1e-320" in lines[0] and "overflows float64" in lines[0]
    assert str(tmp_path / "rel.csv") in lines[0]
    assert not out.exists()
    # a tiny last value under tiny values is fine: the relative metric is of order 1
    r, out = _fit(tmp_path, "tiny", np.ldexp(ACC, -1020), "--relative")
    assert r.returncode == 0, r.stderr
    assert all(math.isfinite(row["r2"]) for row in _fit_rows(out).values())
