"""The exit-code table of docs/cli.md, one real command line per row (and per side of the rule
between 2, fix the command line, and 3, fix the input files), through rank1tools.cli.main."""

from __future__ import annotations

import re
import signal
from pathlib import Path

import pytest

from _support import run_main, tree_snapshot

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A 1-layer base, a run of 3 checkpoints, its factor store (rank 8) and two metrics files."""
    import torch

    from rank1tools.synthetic import LlamaShape, make_base, make_run

    root = tmp_path_factory.mktemp("codes")
    shape = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=1, heads=4, kv_heads=2, tie=True)
    make_base(root / "base", shape, dtype=torch.float32)
    make_run(root / "run", [10, 20, 30], shape, base_dtype=torch.float32, dtype=torch.float32)
    r = run_main("decompose", str(root / "base"), "--run", str(root / "run"), "--out", str(root / "store"), "-q")
    assert r.returncode == 0, r.stderr
    (root / "rising.csv").write_text("step,accuracy,loss\n10,0.2,1\n20,0.3,0.9\n30,0.5,0.7\n")
    (root / "flat.csv").write_text("step,accuracy\n10,0.4\n20,0.4\n30,0.4\n")
    return root


def _raiser(exc):
    """A stand-in for inspect_source that fails: raises `exc`, or sends itself the signal `exc` names."""
    import os
    import signal
    import time

    def boom(*args, **kwargs):
        if isinstance(exc, signal.Signals):
            os.kill(os.getpid(), exc)
            time.sleep(5)  # the handler raises here
        raise exc

    return boom


# (documented code, case id, argv with {root} and {tmp}, what to patch in rank1tools.commands.inspect, stderr needle)
EXIT_CASES = [
    (0, "success", ["inspect", "{root}/base", "--json"], None, ""),
    (
        1,
        "internal-error",
        ["inspect", "{root}/base"],
        ZeroDivisionError("x"),
        "rank1: internal error: ZeroDivisionError",
    ),
    (
        2,
        "unknown-option",
        ["fit-pls", "{root}/store", "--windw", "10:20", "--out", "{tmp}/o"],
        None,
        "No such option: --windw (did you mean --window?)",
    ),
    (
        2,
        "python-literal",
        ["reconstruct", "{root}/base", "{root}/run/checkpoint-30", "--rank", "1", "--alpha", "1_0", "--out", "{tmp}/o"],
        None,
        "--alpha '1_0'",
    ),
    (
        2,
        "rank-above-factor-store",
        [
            "reconstruct",
            "{root}/base",
            "{root}/run/checkpoint-30",
            "--rank",
            "9",
            "--factors",
            "{root}/store",
            "--out",
            "{tmp}/o",
        ],
        None,
        "holds 8",
    ),
    (
        2,
        "metric-not-in-file",
        ["fit-pls", "{root}/store", "--metrics", "{root}/rising.csv", "--metric", "acc", "--out", "{tmp}/o"],
        None,
        "no metric 'acc' (available: accuracy, loss)",
    ),
    (2, "step-not-in-run", ["inspect", "{root}/run", "--steps", "10,40"], None, "no checkpoint for step 40"),
    (2, "out-is-a-url", ["fit-pls", "{root}/store", "--out", "hf://org/name"], None, "outputs are local paths"),
    (3, "missing-input", ["inspect", "{root}/nope"], None, "no such file or directory"),
    (
        3,
        "constant-metric",
        ["fit-pls", "{root}/store", "--metrics", "{root}/flat.csv", "--out", "{tmp}/o"],
        None,
        "a constant metric has nothing to fit",
    ),
    (4, "output-exists", ["fit-pls", "{root}/store", "--out", "{root}/run"], None, "already exists; pass --force"),
    (
        5,
        "gate",
        ["fit-pls", "{root}/store", "--out", "{tmp}/o", "--no-plots", "--fail-below", "1"],
        None,
        "rank1: gate:",
    ),
    (130, "interrupted", ["inspect", "{root}/base"], signal.SIGINT, "rank1: interrupted"),
    (143, "terminated", ["inspect", "{root}/base"], signal.SIGTERM, "rank1: terminated"),
]


def test_every_row_of_the_exit_code_table_has_a_case():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    table = text[text.index("## Exit codes") :].split("\n\n")[1]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.M)}
    assert documented == {code for code, *_ in EXIT_CASES}


@pytest.mark.parametrize(
    "code,args,patch,needle", [pytest.param(c, a, p, n, id=f"{c}-{i}") for c, i, a, p, n in EXIT_CASES]
)
def test_exit_code_table(small_run, tmp_path, monkeypatch, code, args, patch, needle):
    """Each documented exit code, from a real command line through rank1tools.cli.main; a 2 or a 3
    writes nothing."""
    import rank1tools.commands.inspect as insp

    monkeypatch.chdir(tmp_path)  # `--out hf://org/name` once made ./hf:
    if patch is not None:
        monkeypatch.setattr(insp, "inspect_source", _raiser(patch))
    argv = [a.format(root=small_run, tmp=tmp_path) for a in args]
    before = tree_snapshot(small_run)
    r = run_main(*argv)
    assert r.returncode == code, r.stderr
    assert needle in r.stderr, r.stderr
    if code in (2, 3, 4):
        assert r.stderr.count("\n") == 1 and r.stdout == "" and list(tmp_path.iterdir()) == []
        assert tree_snapshot(small_run) == before
