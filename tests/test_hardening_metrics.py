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
from rank1tools.io.metrics import DEFAULT_MAX_BYTES, ENV_MAX_BYTES, read_metrics


def refuse(path: Path, pattern: str, **kw) -> str:
    with pytest.raises(InputError) as info:
        read_metrics(path, **kw)
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "\n" not in msg and msg.startswith(str(path) + ": "), msg
    assert re.search(pattern, msg), msg
    return msg


# ---- duplicated keys: json would keep the last value silently ----

@pytest.mark.parametrize("name, text, line, key", [
    ("m.json", '{"10": 0.5,\n "20": 0.6,\n "10": 0.7}\n', 3, "10"),
    ("m.json", '[{"step": 10, "acc": 0.5},\n {"step": 20, "acc": 0.6},\n {"step": 30, "acc": 0.6,\n  "acc": 0.9}]', 4,
     "acc"),
    ("m.jsonl", '{"step": 10, "acc": 0.5}\n{"step": 20, "acc": 0.6, "acc": 0.1}\n', 2, "acc"),
    ("m.jsonl", '{"step": 10, "acc": 0.5}\n\n{"step": 20, "step": 30, "acc": 0.1}\n', 3, "step"),
    ("trainer_state.json", json.dumps({"log_history": [{"step": 1, "eval_acc": 0.1}]}, indent=1)[:-1]
     + ',\n"log_history": []}', 9, "log_history"),
    ("m.json", '{"10": {"a": 1, "a": 2}}', 1, "a"),
])
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
    real_read = metrics_mod.os.fdopen

    def counting_fdopen(*a, **kw):  # every byte read goes through this file object
        f = real_read(*a, **kw)
        orig = f.read
        f.read = lambda n=-1: reads.append(n) or orig(n)
        return f

    monkeypatch.setattr(metrics_mod.os, "fdopen", counting_fdopen)
    monkeypatch.setenv(ENV_MAX_BYTES, str(2 << 30))  # under a raised limit: refused after the first block
    refuse(p, r"metrics file is binary \(NUL byte at byte 0\), not CSV or JSON text$")
    assert reads == [metrics_mod.SNIFF_BYTES]


def test_nul_byte_after_the_first_block_is_refused(tmp_path):
    p = tmp_path / "m.csv"
    body = ("step,acc\n" + "".join(f"{s},0.5\n" for s in range(20000))).encode()
    at = len(body) - 7
    p.write_bytes(body[:at] + b"\x00" + body[at:])
    assert at > metrics_mod.SNIFF_BYTES
    refuse(p, rf"metrics file is binary \(NUL byte at byte {at}\)")


# ---- linear-time parsing ----

def test_wide_csv_reads_and_names_a_late_duplicate_column(tmp_path):
    n = 80_000
    cols = ["step", *(f"c{i}" for i in range(n))]
    p = tmp_path / "wide.csv"
    p.write_text(",".join(cols) + "\n" + "10," + ",".join(str(i / n) for i in range(n)) + "\n")
    m = read_metrics(p, metric=f"c{n - 1}")
    assert m.values == {10: (n - 1) / n} and len(m.available) == n
    msg = refuse(p, r"several metrics \(c0, c1, .*, c29, \.\.\. \(80000 in all\)\); choose one with --metric$")
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
