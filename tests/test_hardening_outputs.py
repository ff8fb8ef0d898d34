"""Hardening, outputs (issue #8 items 1-5, 11, 14): rank1 never writes or deletes outside the
output the user named, never replaces a folder it did not write, and fails with one line.

Every reproducer asserts the exit code, the one-line message, and that the folder around the
inputs and outputs is exactly as before (a listing with sizes, mtimes and hashes).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rank1tools.commands.decompose import DecomposeOptions, decompose, factor_file
from rank1tools.io.factor_store import FactorStore
from rank1tools.io.outputs import MARKER_FILE
from rank1tools.synthetic import LlamaShape, make_base, make_run

from _support import cli_env, run_main, tree_snapshot

SHAPE = LlamaShape(vocab=64, hidden=32, intermediate=80, layers=1, heads=4, kv_heads=2, tie=False)


@pytest.fixture()
def work(tmp_path):
    """tmp/work/{base, run/checkpoint-10, ckpt -> run/checkpoint-10's copy}: a fresh pair per test."""
    root = tmp_path / "work"
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [10], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=1e-4)
    os.rename(root / "run" / "checkpoint-10", root / "ckpt")
    (root / "run").rmdir()
    return root


def _one_line_error(r, code: int, *patterns: str) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: "), r.stderr
    import re

    for p in patterns:
        assert re.search(p, lines[0]), (p, lines[0])
    assert r.stdout == ""
    return lines[0]


def _dec(work: Path, *extra: str):
    return run_main("decompose", str(work / "base"), str(work / "ckpt"), "--rank", "2", "--device", "cpu", "-q", *extra)


def _rec(work: Path, *extra: str):
    return run_main(
        "reconstruct", str(work / "base"), str(work / "ckpt"), "--rank", "1", "--device", "cpu", "-q", *extra
    )


# ---- 1. `..` in --out ----


def test_dotdot_out_never_deletes_the_parent_or_replaces_an_input(work, monkeypatch):
    (work / "inner").mkdir()
    monkeypatch.chdir(work)
    before = tree_snapshot(work.parent)
    # inner/.. is the folder holding the inputs: contains an input, and was not written by rank1
    _one_line_error(_dec(work, "--out", "inner/..", "--force"), 4, r"inner/\.\.: output contains an input")
    _one_line_error(_dec(work, "--out", "inner/../base", "--force"), 4, r"output is an input \(.*base\)")
    _one_line_error(_rec(work, "--out", "inner/../ckpt", "--force"), 4, r"output is an input")
    _one_line_error(_rec(work, "--out", "inner/../base/sub"), 4, r"output is inside an input")
    assert tree_snapshot(work.parent) == before


# ---- 2. --out through a symlink ----


def test_symlinked_out_is_resolved_before_any_check(work):
    (work / "lnk").symlink_to(work / "base")
    before = tree_snapshot(work)
    _one_line_error(_dec(work, "--out", str(work / "lnk" / "sub")), 4, r"output is inside an input")
    _one_line_error(_dec(work, "--out", str(work / "lnk"), "--force"), 4, r"output is an input")
    _one_line_error(_rec(work, "--out", str(work / "lnk"), "--force"), 4, r"output is an input")
    assert tree_snapshot(work) == before  # no .lnk.partial, nothing inside base


# ---- 3. empty --out; --force only over rank1's own folders ----


def test_empty_out_is_refused_and_the_current_folder_kept(work, monkeypatch):
    monkeypatch.chdir(work)
    before = tree_snapshot(work)
    for args in (("--out", "", "--force"), ("--out", "  ")):
        _one_line_error(_dec(work, *args), 2, r"--out is empty")
        _one_line_error(_rec(work, *args), 2, r"--out is empty")
    assert tree_snapshot(work) == before


def test_force_replaces_only_folders_rank1_wrote(work):
    mine = work / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree_snapshot(work)
    for run in (_dec, _rec):
        _one_line_error(
            run(work, "--out", str(mine), "--force"), 4, r"was not written by rank1", r"--force replaces only"
        )
    assert tree_snapshot(work) == before
    # a rank1 output is replaced, and so is an empty folder
    assert _rec(work, "--out", str(work / "r")).returncode == 0
    assert json.loads((work / "r" / MARKER_FILE).read_text())["tool"] == "rank1tools"
    (work / "r" / "stale.txt").write_text("x")
    assert _rec(work, "--out", str(work / "r"), "--force").returncode == 0
    assert not (work / "r" / "stale.txt").exists()
    assert _dec(work, "--out", str(work / "d")).returncode == 0
    assert json.loads((work / "d" / MARKER_FILE).read_text())["command"] == "decompose"
    assert _dec(work, "--out", str(work / "d"), "--force").returncode == 0
    (work / "empty").mkdir()
    assert _dec(work, "--out", str(work / "empty"), "--force").returncode == 0
    assert (work / "empty" / "manifest.json").is_file()
    assert not [p.name for p in work.iterdir() if p.name.startswith(".")]  # no staging, lock or old folder left


# ---- 4. tensor names never become paths ----

HOSTILE = [
    "/abs/path.layers.0.q_proj.weight",
    "../../x.layers.0.q_proj.weight",
    "a/b.layers.0.k_proj.weight",
    "nul\x00.layers.0.v_proj.weight",
    "..",
    ".hidden.layers.0.o_proj.weight",
    "é" * 300 + ".layers.0.o_proj.weight",
]


@pytest.mark.parametrize("name", HOSTILE + ["model.layers.0.self_attn.q_proj.weight"])
def test_factor_file_names_stay_inside_the_store(name):
    f = factor_file(name)
    assert "/" not in f and "\x00" not in f and not f.startswith(".") and len(f.encode()) < 200
    assert f.endswith(".safetensors")
    if name == "model.layers.0.self_attn.q_proj.weight":
        assert f == name + ".safetensors"  # ordinary names stay readable


def test_hostile_tensor_names_are_decomposed_inside_out(tmp_path):
    g = torch.Generator().manual_seed(0)
    names = [n for n in HOSTILE if n != ".."] + ["model.layers.0.mlp.up_proj.weight"]
    base = {n: torch.randn(8, 6, generator=g) for n in names}
    ck = {n: t + 0.01 * torch.randn(8, 6, generator=g) for n, t in base.items()}
    root = tmp_path / "w"
    root.mkdir()
    save_file(base, str(root / "base.safetensors"))
    save_file(ck, str(root / "ck.safetensors"))
    (root / "x.layers.0.q_proj.weight.safetensors").write_text("not finished work")  # where ../../x would land
    outside = tree_snapshot(tmp_path)
    r = run_main(
        "decompose",
        str(root / "base.safetensors"),
        str(root / "ck.safetensors"),
        "--out",
        str(root / "out" / "a" / "b"),
        "--rank",
        "1",
        "--include",
        "*",
        "-q",
        "--device",
        "cpu",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modules"] == len(names)
    after = tree_snapshot(tmp_path)
    new = {p for p in after if p not in outside}
    assert all(p.startswith("w/out") for p in new), sorted(new)
    assert all(after[p] == outside[p] for p in outside)  # nothing outside --out changed
    store = FactorStore(root / "out" / "a" / "b")
    for n in names:  # each file holds its own module, with numbers from its own update
        f = store.load(n)
        d = (ck[n] - base[n]).double()
        assert float(f["S"][0, 0]) == pytest.approx(float(torch.linalg.svdvals(d)[0]), rel=1e-5)


# ---- 5. factor-store manifests are confined and checked ----


@pytest.fixture()
def store(work):
    out = work / "fac"
    decompose(str(work / "base"), [str(work / "ckpt")], str(out), options=DecomposeOptions(rank=2, device="cpu"))
    return out


def _point(store: Path, module_index: int, file: str) -> None:
    mf = store / "manifest.json"
    m = json.loads(mf.read_text())
    m["modules"][module_index]["file"] = file
    mf.write_text(json.dumps(m))


@pytest.mark.parametrize(
    "file,pattern",
    [
        ("../../../etc/passwd", r"names file '\.\./\.\./\.\./etc/passwd', which is not a file in the store's factors/"),
        ("/etc/passwd", r"not a file in the store's factors/"),
        ("factors/../manifest.json", r"not a file in the store's factors/"),
        ("factors/sub/x.safetensors", r"not a file in the store's factors/"),
    ],
)
def test_manifest_paths_outside_the_store_are_refused(work, store, file, pattern):
    _point(store, 0, file)
    before = tree_snapshot(work)
    r = _rec(work, "--factors", str(store), "--out", str(work / "o"))
    _one_line_error(r, 3, pattern)
    assert tree_snapshot(work) == before


def test_manifest_pointing_at_another_modules_file_is_refused(work, store):
    m = json.loads((store / "manifest.json").read_text())
    other = m["modules"][1]
    _point(store, 0, other["file"])
    r = _rec(work, "--factors", str(store), "--out", str(work / "o"))
    _one_line_error(r, 3, rf"holds module '{other['name']}', not '{m['modules'][0]['name']}'")
    assert not (work / "o").exists()


def test_symlink_out_of_the_factors_folder_is_refused(work, store):
    m = json.loads((store / "manifest.json").read_text())
    victim = store / m["modules"][0]["file"]
    victim.unlink()
    victim.symlink_to(work / "base" / "model.safetensors")
    r = _rec(work, "--factors", str(store), "--out", str(work / "o"))
    _one_line_error(r, 3, r"not a file in the store's factors/")


def test_decompose_redoes_a_partial_file_holding_another_module(work):
    """Resume trusts a finished file only if it records the module it stands for."""
    out = work / "o"
    ref = decompose(
        str(work / "base"), [str(work / "ckpt")], str(work / "ref"), options=DecomposeOptions(rank=2, device="cpu")
    )
    partial = work / ".o.partial" / "factors"
    partial.mkdir(parents=True)
    names = ref.modules
    (partial / factor_file(names[0])).write_bytes((work / "ref" / "factors" / factor_file(names[1])).read_bytes())
    res = decompose(str(work / "base"), [str(work / "ckpt")], str(out), options=DecomposeOptions(rank=2, device="cpu"))
    assert res.resumed_modules == 0
    assert (out / "spectrum.csv").read_bytes() == (work / "ref" / "spectrum.csv").read_bytes()


# ---- 11. output errors name the path and exit 4 ----


def test_unwritable_location_is_an_output_error(work):
    before = tree_snapshot(work)
    _one_line_error(_rec(work, "--out", "/proc/rank1-test/out"), 4, r"/proc/rank1-test.*cannot write")
    _one_line_error(_dec(work, "--out", "/proc/rank1-test/out"), 4, r"/proc/rank1-test.*cannot write")
    (work / "file").write_text("x")
    _one_line_error(_rec(work, "--out", str(work / "file" / "out")), 4, r"cannot write|not a directory")
    (work / "file").unlink()
    assert tree_snapshot(work) == before


def test_full_disk_is_an_output_error_without_leftovers(work, monkeypatch):
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    before = tree_snapshot(work)
    line = _one_line_error(_rec(work, "--out", str(work / "o")), 4, r"No space left on device; free some space")
    assert ".o.tmp-" in line  # names the file it was writing
    monkeypatch.setattr(os, "pwrite", real)
    assert tree_snapshot(work) == before


def _fit(store: Path, out: Path):
    return run_main("fit-pls", str(store), "--out", str(out), "--no-plots", "-q")


@pytest.fixture()
def store3(work, tmp_path):
    """A factor store over three checkpoints (what fit-pls needs), beside `work`."""
    make_run(tmp_path / "run3", [10, 20, 30], SHAPE, base_dtype=torch.float32, dtype=torch.float32, noise=1e-4)
    decompose(
        str(work / "base"),
        [],
        str(tmp_path / "fac3"),
        run=str(tmp_path / "run3"),
        options=DecomposeOptions(rank=1, device="cpu"),
    )
    return tmp_path / "fac3"


def test_full_disk_in_safetensors_writes_is_an_output_error(work, store3, monkeypatch):
    """decompose and fit-pls save through safetensors, whose writer reports a full disk as
    SafetensorError("... (os error 28)"), not OSError: it used to be an internal error (exit 1)."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):  # what safetensors raises on ENOSPC (seen on a full tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "serialize_file", full)
    before = tree_snapshot(work)
    line = _one_line_error(_fit(store3, work / "f"), 4, r"No space left on device; free some space and rerun")
    assert line.startswith(f"rank1: error: {work}/.f.tmp-") and "/fits/" in line  # the file it was writing
    assert tree_snapshot(work) == before  # no staging folder, no lock
    line = _one_line_error(
        _dec(work, "--out", str(work / "o")), 4, r"No space left on device; free some space and rerun"
    )
    assert line.startswith(f"rank1: error: {work}/.o.partial/factors/")
    assert not (work / "o").exists()  # the work folder stays for a rerun once space is freed (decompose resumes)
    assert set(tree_snapshot(work)) - set(before) <= {".o.partial", ".o.partial/manifest.json", ".o.partial/factors"}


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KB tmpfs with one page left free (needs root: skipped where mounting is not allowed)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.strip() or r.returncode}): needs root")
    try:
        st = os.statvfs(mnt)
        (mnt / ".filler").write_bytes(bytes(st.f_bavail * st.f_frsize - 4096))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_on_a_real_filesystem_is_an_output_error(work, store3, full_disk):
    for run, out, where in (
        (lambda: _fit(store3, full_disk / "f"), "f", ".f.tmp-"),
        (lambda: _dec(work, "--out", str(full_disk / "o")), "o", ".o.partial"),
    ):
        line = _one_line_error(run(), 4, r"No space left on device; free some space and rerun")
        assert line.startswith(f"rank1: error: {full_disk}/{where}"), line
        assert not (full_disk / out).exists()
    # a checkpoint writer knows its size from the headers: refused before any work (docs/cli.md)
    line = _one_line_error(
        _rec(work, "--out", str(full_disk / "r")), 4, r"1 checkpoint: needs about .* GB of disk but .* GB are free at "
    )
    assert line.startswith(f"rank1: error: {full_disk}/r: "), line
    assert not (full_disk / "r").exists()
    assert set(os.listdir(full_disk)) <= {".filler", ".o.partial"}  # decompose's resumable work; nothing else


def test_non_utf8_out_is_refused_before_any_work(work):
    out = os.fsencode(str(work)) + b"/out\xff"
    before = tree_snapshot(work)
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "rank1tools.cli",
            "reconstruct",
            str(work / "base"),
            str(work / "ckpt"),
            "--rank",
            "1",
            "--out",
            out,
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    _one_line_error(p, 2, r"not valid UTF-8")
    assert tree_snapshot(work) == before


# ---- 14. outputs follow the umask ----


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_follow_the_umask(work, mask):
    code = f"import os, sys; os.umask({mask}); from rank1tools.cli import main; sys.argv = sys.argv[:1] + sys.argv[1:]; main()"
    for args in (
        ["reconstruct", str(work / "base"), str(work / "ckpt"), "--rank", "1,2", "--out", str(work / "r")],
        ["decompose", str(work / "base"), str(work / "ckpt"), "--rank", "1", "--out", str(work / "d")],
    ):
        p = subprocess.run(
            [sys.executable, "-c", code, *args, "--device", "cpu", "-q"],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert p.returncode == 0, p.stderr
    for top in (work / "r", work / "d"):
        for path in [top, *top.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert mode == want, (str(path.relative_to(work)), oct(mode), oct(want))


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_demo_outputs_follow_the_umask(tmp_path, mask):
    """`rank1 demo --synthetic`, and the GRPO demo's model writer (the trainer saves every
    checkpoint through it): safetensors creates files 0600, the demos must not keep that mode."""
    code = (
        f"import os, sys; os.umask({mask})\n"
        "from rank1tools.demo.checkpoints import write_model_folder\n"
        "from rank1tools.demo.model import TinyLlama, TinyLlamaConfig\n"
        "write_model_folder(__import__('pathlib').Path(sys.argv[1]), TinyLlama(TinyLlamaConfig()))\n"
        "from rank1tools.cli import main; sys.argv = ['rank1', *sys.argv[2:]]; main()"
    )
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(tmp_path / "trained"),
            "demo",
            "--synthetic",
            "--out",
            str(tmp_path / "demo"),
            "--device",
            "cpu",
            "-q",
        ],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "trained" / "model.safetensors").is_file()
    assert (tmp_path / "demo" / "run" / "checkpoint-50" / "model.safetensors").is_file()
    for top in (tmp_path / "trained", tmp_path / "demo"):
        for path in [top, *top.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            want = (0o777 if path.is_dir() else 0o666) & ~mask
            assert mode == want, (str(path.relative_to(tmp_path)), oct(mode), oct(want))


def test_input_vanishing_mid_run_is_an_input_error(work, monkeypatch):
    """A shard that disappears after its header was read is bad input (exit 3), and nothing is left."""
    from rank1tools.io import checkpoint as checkpoint_module

    real_open = checkpoint_module.Checkpoint.locate
    calls = []

    def vanish(self, name):
        path, entry = real_open(self, name)
        calls.append(name)
        if len(calls) == 3:  # the third tensor's shard is gone by the time it is read
            return path.with_name("gone.safetensors"), entry
        return path, entry

    monkeypatch.setattr(checkpoint_module.Checkpoint, "locate", vanish)
    before = tree_snapshot(work)
    _one_line_error(
        _rec(work, "--out", str(work / "o")), 3, r"gone\.safetensors: cannot read \(No such file or directory\)"
    )
    assert tree_snapshot(work) == before
