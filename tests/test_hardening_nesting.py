"""Hardening, outputs inside or around other outputs (issue #20 §3, "a nested output is deleted").

Run A `linearity --out d --force` while run B `fit-pls --out d/sub`: B used to exit 0 and print its
path, then A's swap deleted `d/sub`. Now an output inside or around a live run's output, inside a
rank1 output folder or inside a staging folder is refused (exit 4, one line); the demo may still
write its analyses inside its own folder, whose lock it holds. Runs are stopped at exact phases with
the RANK1_TEST_PAUSE hook (rank1tools.signals), and a property-based test runs two random commands
at once on random nested or overlapping `--out` paths: no output a command completed is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from rank1tools.io.output_lock import OutputLock
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import finish_cli, finish_paused, run_cli, run_main, start_cli, start_paused, tree_snapshot

SHAPE = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=2, heads=4, kv_heads=2, tie=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nest")
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [5, 10, 20, 40], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=3e-3)
    r = run_main(
        "decompose",
        str(root / "base"),
        "--run",
        str(root / "run"),
        "--out",
        str(root / "store"),
        "--rank",
        "2",
        "--device",
        "cpu",
        "-q",
    )
    assert r.returncode == 0, r.stderr
    return root


def _fit(inputs: Path, out: str, *extra: str) -> list[str]:
    return ["fit-pls", str(inputs / "store"), "--out", out, "--no-plots", "-q", *extra]


def _linearity(inputs: Path, out: str, *extra: str) -> list[str]:
    return [
        "linearity",
        str(inputs / "base"),
        "--run",
        str(inputs / "run"),
        "--out",
        out,
        "--no-plots",
        "-q",
        "--device",
        "cpu",
        *extra,
    ]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _debris(root: Path) -> list[str]:
    """Locks, staging and swap folders anywhere under `root` (none may outlive the runs)."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob(".*")
        if p.name.endswith((".lock", ".partial")) or ".tmp-" in p.name or ".old-" in p.name
    )


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("rank1: test pause")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rank1: error: "), stderr
    return lines[0]


@pytest.mark.parametrize("existing", [True, False], ids=["d-existing-force", "d-new"])
def test_output_inside_a_live_runs_output_is_refused(inputs, tmp_path, existing):
    """The issue's repro: A replaces `d` (or makes it) while B asks for `d/sub`."""
    if existing:  # d: a completed rank1 output, replaced by A with --force
        assert run_main(*_fit(inputs, str(tmp_path / "d"))).returncode == 0
    a, lines = start_paused(_linearity(inputs, "d", *(["--force"] if existing else [])), tmp_path, "staged")
    try:
        b = run_cli(_fit(inputs, "d/sub"), tmp_path)
    finally:
        ra = finish_paused(a, lines, signal.SIGUSR1)  # resume A
    assert b.returncode == 4, b.stderr
    line = _one_error_line(b.stderr)
    assert line.startswith(
        f"rank1: error: d/sub: lies inside {tmp_path / 'd'}, the output of another rank1 run "
        f"that is still writing (pid {a.pid}: rank1 linearity "
    ), line
    assert b.stdout == ""
    assert ra.returncode == 0, ra.stderr
    assert ra.stdout.strip().splitlines()[-1] == "-> d"
    assert sorted(os.listdir(tmp_path / "d")) == [
        "by_type.csv",
        "linearity.csv",
        "linearity.jsonl",
        "rank1tools.json",
        "summary.json",
    ]  # A's, and no d/sub
    assert json.loads((tmp_path / "d" / "rank1tools.json").read_text())["command"] == "linearity"
    assert _debris(tmp_path) == []


def test_output_inside_a_completed_rank1_output_is_refused(inputs, tmp_path):
    """rank1 replaces its outputs whole (--force, a rerun): an output inside one would be deleted
    with it, so it is refused; the outer output is left as it was."""
    assert run_main(*_fit(inputs, str(tmp_path / "d"))).returncode == 0
    before = tree_snapshot(tmp_path)
    for out in ("d/sub", "d/a/b"):
        r = run_main(*_fit(inputs, str(tmp_path / out)))
        assert r.returncode == 4, r.stderr
        assert _one_error_line(r.stderr) == (
            f"rank1: error: {tmp_path / out}: lies inside {tmp_path / 'd'}, an output folder of rank1; rank1 "
            "replaces its outputs whole (--force, a rerun), which would delete this one: choose an --out outside it"
        )
        assert tree_snapshot(tmp_path) == before


def test_output_around_a_live_runs_output_is_refused(inputs, tmp_path):
    """A live run writes d/sub (its lock held); `--force` on the rank1 folder d would delete it."""
    assert run_main(*_fit(inputs, str(tmp_path / "d"))).returncode == 0
    with OutputLock(tmp_path / "d" / "sub", "d/sub"):
        before = tree_snapshot(tmp_path)
        r = run_cli(_fit(inputs, "d", "--force"), tmp_path)
        assert r.returncode == 4, r.stderr
        assert _one_error_line(r.stderr).startswith(
            f"rank1: error: d: contains {tmp_path / 'd' / 'sub'}, the output of another rank1 run that is still "
            f"writing (pid {os.getpid()}"
        )
        assert tree_snapshot(tmp_path) == before


def test_output_inside_a_staging_folder_is_refused(inputs, tmp_path):
    for staging in (".d.tmp-123-abc", ".d.old-9-x", ".d.partial"):
        (tmp_path / staging).mkdir()
        r = run_main(*_fit(inputs, str(tmp_path / staging / "sub")))
        assert r.returncode == 4, r.stderr
        assert f"lies inside {tmp_path / staging}, a staging folder of a rank1 run" in _one_error_line(r.stderr)
        assert list((tmp_path / staging).iterdir()) == []


def test_demo_writes_inside_its_own_output(tmp_path):
    """The one nesting allowed: the demo's analyses inside the demo folder whose lock it holds."""
    r = run_main("demo", "--synthetic", "--out", str(tmp_path / "demo"), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert {"base", "run", "decompose", "rank-1", "rank1tools.json"} <= set(os.listdir(tmp_path / "demo"))
    assert _debris(tmp_path) == []


# ---- property: two random commands at once on nested/overlapping outputs lose no completed output ----

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PATHS = ["o", "o/a", "o/a/b", "o/b", "p"]  # nested, siblings, unrelated


@pytest.fixture(scope="module")
def references(inputs, tmp_path_factory) -> dict[tuple[str, str], dict[str, bytes]]:
    """What each (command, --out) writes when it runs alone: outputs are deterministic, and the
    provenance records the command line, which differs with --out only."""
    refs = {}
    for kind in ("fit", "lin"):
        for out in PATHS:
            cwd = tmp_path_factory.mktemp("ref")
            r = run_main(*_command(inputs, kind, str(cwd / out), False))
            assert r.returncode == 0, r.stderr
            refs[kind, out] = _files(cwd / out)
    return refs


def _command(inputs: Path, kind: str, out: str, force: bool) -> list[str]:
    extra = ["--force"] if force else []
    return _fit(inputs, out, *extra) if kind == "fit" else _linearity(inputs, out, *extra)


def _same_output(got: dict[str, bytes], want: dict[str, bytes]) -> bool:
    """Same files and bytes; rank1tools.json compared without its command line (its --out)."""

    def strip(files):
        out = dict(files)
        out["rank1tools.json"] = json.dumps(
            {k: v for k, v in json.loads(files["rank1tools.json"]).items() if k != "argv"}
        )
        return out

    return strip(got) == strip(want)


run_spec = st.tuples(st.sampled_from(["fit", "lin"]), st.sampled_from(PATHS), st.booleans())


@settings(max_examples=6, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    first=run_spec,
    second=run_spec,
    existing=st.sampled_from([None, *PATHS]),
    pause=st.sampled_from([None, "staged", "published"]),
)
def test_two_concurrent_runs_never_lose_a_completed_output(
    inputs, references, tmp_path_factory, first, second, existing, pause
):
    """`existing`: a completed output there beforehand. `pause`: the first run is held at that
    phase while the second runs from start to end (None: both just run at once)."""
    root = tmp_path_factory.mktemp("prop")
    kept = {}  # outputs that must survive, unless a --force run that completed replaced them
    if existing is not None:
        shutil.copytree(inputs / "store", root / "_tmp")  # any rank1 folder: its files are compared as they are
        os.renames(root / "_tmp", root / existing)
        kept[existing] = _files(root / existing)
    (k1, out1, f1), (k2, out2, f2) = first, second
    if pause is None:
        p1, p2 = start_cli(_command(inputs, k1, out1, f1), root), start_cli(_command(inputs, k2, out2, f2), root)
        results = [(first, finish_cli(p1)), (second, finish_cli(p2))]
    else:
        p1 = start_cli(_command(inputs, k1, out1, f1), root, env={"RANK1_TEST_PAUSE": pause})
        lines = []
        for line in p1.stderr:  # until it pauses, or ends (refused before reaching the phase)
            lines.append(line)
            if line.startswith("rank1: test pause:"):
                break
        r2 = run_cli(_command(inputs, k2, out2, f2), root)
        results = [(first, finish_paused(p1, lines, signal.SIGUSR1)), (second, r2)]
    written: dict[str, list] = {}  # out -> the references of the runs that completed it
    for (kind, out, _force), r in results:
        assert r.returncode in (0, 4), r.stderr  # done, or refused with an output error
        if r.returncode == 0:
            assert r.stdout.strip().splitlines()[-1] == f"-> {out}"
            written.setdefault(out, []).append(references[kind, out])
        else:
            _one_error_line(r.stderr)
            assert r.stdout == ""
    for out in {*kept, *written}:
        assert (root / out).is_dir(), f"output {out} is gone: {results}"
        got = _files(root / out)
        if out in written:  # both completed the same --out (the later one with --force): either
            assert any(_same_output(got, want) for want in written[out]), f"output {out} damaged: {results}"
        else:
            assert got == kept[out], f"existing output {out} damaged: {results}"
    assert _debris(root) == []
