"""Hardening of input reading: safetensors headers, index files, config.json, run discovery.

Each case is a reproducer of a bad input that was accepted (or misread, or ended in a traceback):
`rank1 inspect` must exit 3 with one `rank1: error:` line naming the file or tensor, print nothing
on stdout (model sources) and write nothing. CLI calls go through rank1tools.cli.main in-process
(`run_main`); a few run as real processes.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rank1tools.errors import InputError
from rank1tools.io import discover_run, open_source, select_steps
from rank1tools.io.runs import _find_pickles

from _support import build_run, run_cli, run_main, tree_snapshot

Q = "model.layers.0.self_attn.q_proj.weight"


def write_safetensors(path: Path, header: dict | bytes, data_len: int) -> Path:
    """A safetensors file written byte by byte: 8-byte length, header, `data_len` zero bytes."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    return path


def assert_refused(root: Path, source: Path, *patterns: str) -> str:
    """`rank1 inspect SOURCE` exits 3 with one error line matching every pattern, nothing on stdout,
    nothing written under `root`; the same source through open_source raises InputError."""
    before = tree_snapshot(root)
    with pytest.raises(InputError) as info:
        open_source(str(source))
    result = run_main("inspect", str(source))
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rank1: error: "), result.stderr
    for pat in patterns:
        assert re.search(pat, lines[0]), f"{pat!r} not in {lines[0]!r}"
    assert lines[0] == f"rank1: error: {info.value}"
    assert tree_snapshot(root) == before
    return lines[0]


# ---------------------------------------------------------------- headers (item 1)

# (shape, data_offsets) of a q_proj entry, in a file whose data area is 64 bytes (a valid [4, 4] F32)
BAD_ENTRIES = {
    "negative-dims": ([-4, -4], [0, 64]),
    "float-dim": ([4.0, 4], [0, 64]),
    "bool-dim": ([True, 16], [0, 64]),
    "string-dim": (["4", 4], [0, 64]),
    "shape-not-list": ({"a": 4}, [0, 64]),
    "string-times-huge": (["x", 10**12], [0, 64]),  # a 10**12-character string if multiplied out
    "offsets-reversed": ([4, 4], [64, 0]),
    "offsets-negative": ([4, 4], [-64, 0]),
    "offsets-float": ([4, 4], [0.0, 64]),
    "offsets-three": ([4, 4], [0, 32, 64]),
    "offsets-bool": ([1], [False, True]),
}


@pytest.mark.parametrize("case", sorted(BAD_ENTRIES))
def test_invalid_shape_or_offsets_refused(tmp_path, case):
    shape, offsets = BAD_ENTRIES[case]
    f = write_safetensors(
        tmp_path / "m" / "model.safetensors", {Q: {"dtype": "F32", "shape": shape, "data_offsets": offsets}}, 64
    )
    what = "shape" if case.startswith(("negative", "float-dim", "bool", "string", "shape")) else "data_offsets"
    assert_refused(tmp_path, f.parent, r"model\.safetensors", re.escape(repr(Q)), rf"invalid {what}")


def test_negative_size_entry_cannot_hide_a_truncated_file(tmp_path):
    """[4, 4] then [-4, 4] with offsets [64, 0]: sizes add to 0, so a file of only its header
    looked complete (inspect exited 0 with "matrix_parameters": -16)."""
    header = {
        Q: {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "model.layers.0.self_attn.k_proj.weight": {"dtype": "F32", "shape": [-4, 4], "data_offsets": [64, 0]},
    }
    f = write_safetensors(tmp_path / "m" / "model.safetensors", header, 0)
    assert_refused(tmp_path, f.parent, r"k_proj", r"invalid (shape|data_offsets)")


@pytest.mark.parametrize("header", [{}, {"__metadata__": {"format": "pt"}}], ids=["empty", "metadata-only"])
def test_safetensors_file_without_tensors_refused(tmp_path, header):
    f = write_safetensors(tmp_path / "m" / "model.safetensors", header, 0)
    assert_refused(tmp_path, f.parent, r"model\.safetensors: holds no tensors")
    assert_refused(tmp_path, f, r"model\.safetensors: holds no tensors")


# ---------------------------------------------------------------- index (items 2-4)


def write_sharded(folder: Path, shards: dict[str, list[str]], weight_map: dict[str, str]) -> Path:
    """Shards holding the named 4x4 float32 tensors (saved by safetensors itself), and an index."""
    folder.mkdir(parents=True)
    for shard, names in shards.items():
        save_file(
            {n: torch.full((4, 4), float(i)) for i, n in enumerate(names)},
            str(folder / shard),
            metadata={"format": "pt"},
        )
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


A, B = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
K = "model.layers.0.self_attn.k_proj.weight"


@pytest.mark.parametrize("listed_in", [A, B])
def test_tensor_in_two_shards_refused(tmp_path, listed_in):
    """Whichever shard the index names, the message says what is wrong (before: accepted with
    the index naming B, 'does not hold it' with the index naming A)."""
    V = "model.layers.0.self_attn.v_proj.weight"
    folder = write_sharded(tmp_path / "m", {A: [Q, K], B: [K, V]}, {Q: A, K: listed_in, V: B})
    assert_refused(tmp_path, folder, rf"tensor '{K}' is stored in both '{A}' and '{B}'")


def test_tensor_missing_from_weight_map_refused(tmp_path):
    """Before: K was counted (and read) though the index does not list it."""
    folder = write_sharded(tmp_path / "m", {A: [Q, K]}, {Q: A})
    assert_refused(
        tmp_path,
        folder,
        rf"shard '{A}' holds tensor '{K}' that the index does not list",
        r"model\.safetensors\.index\.json",
    )


def test_empty_weight_map_refused(tmp_path):
    folder = write_sharded(tmp_path / "m", {A: [Q]}, {})
    assert_refused(tmp_path, folder, r"index\.json: weight_map lists no tensors")


# ---------------------------------------------------------------- deep JSON (item 5)

DEEP = b"[" * 200_000 + b"]" * 200_000


def test_deeply_nested_header_refused(tmp_path):
    f = write_safetensors(tmp_path / "m" / "model.safetensors", b'{"a": ' + DEEP + b"}", 0)
    assert_refused(tmp_path, f.parent, r"model\.safetensors: corrupt safetensors header", r"nested too deeply")


@pytest.mark.parametrize("victim", ["config.json", "model.safetensors.index.json"])
def test_deeply_nested_config_or_index_refused(tmp_path, victim):
    folder = write_sharded(tmp_path / "m", {A: [Q]}, {Q: A})
    (folder / victim).write_bytes(b'{"x": ' + DEEP + b"}")
    what = "config.json" if victim == "config.json" else "index"
    assert_refused(tmp_path, folder, rf"{re.escape(victim)}: unreadable {what} \(JSON nested too deeply\)")


def test_index_not_utf8_or_not_object(tmp_path):
    folder = write_sharded(tmp_path / "m", {A: [Q]}, {Q: A})
    index = folder / "model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"\xff": 1}}')
    assert_refused(tmp_path, folder, r"index\.json: unreadable index")
    index.write_text("[1, 2]")
    assert_refused(tmp_path, folder, r"index\.json: unreadable index \(no weight_map object\)")


# ---------------------------------------------------------------- runs (items 6-8)


@pytest.fixture(scope="module")
def good_step(tmp_path_factory) -> Path:
    """A usable checkpoint-7 folder, linked into each case's run."""
    return build_run(tmp_path_factory.mktemp("good"), [7], "trl") / "checkpoint-7"


def _run_with(tmp_path: Path, good_step: Path, make_child) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint-7").symlink_to(good_step, target_is_directory=True)
    make_child(run)
    return run


RUN_CASES = {  # child -> (how to make it, expected step, problem regex)
    "checkpoint--5": (lambda r: (r / "checkpoint--5").mkdir(), None, r"^not a step folder name"),
    "checkpoint-abc": (lambda r: (r / "checkpoint-abc").mkdir(), None, r"^not a step folder name"),
    "checkpoint-٢٠": (lambda r: (r / "checkpoint-٢٠").mkdir(), None, r"^not a step folder name"),
    "global_step_x": (lambda r: (r / "global_step_x").mkdir(), None, r"^not a step folder name"),
    "checkpoint-99999999999999999999999999": (
        lambda r: (r / "checkpoint-99999999999999999999999999").mkdir(),
        None,
        r"^step number too large",
    ),
    "checkpoint-20": (lambda r: (r / "checkpoint-20").write_text("a file"), 20, r"^not a directory$"),
    "checkpoint-30": (lambda r: (r / "checkpoint-30").symlink_to(r / "gone"), 30, r"^broken symbolic link$"),
}


@pytest.mark.parametrize("child", list(RUN_CASES))
def test_run_lists_unusable_children(tmp_path, good_step, child):
    make, step, problem = RUN_CASES[child]
    run = _run_with(tmp_path, good_step, make)
    found = discover_run(run)
    assert [(c.step, Path(c.path).name) for c in found] == [(7, "checkpoint-7"), (step, child)]
    assert found[0].problem is None and found[1].weights is None
    assert re.search(problem, found[1].problem), found[1].problem
    before = tree_snapshot(tmp_path)
    result = run_main("inspect", str(run), "--json")
    assert result.returncode == 3
    rows = json.loads(result.stdout)["checkpoints"]
    assert [(r["step"], r["status"]) for r in rows] == [(7, "ok"), (step, "unusable")]
    assert re.search(problem, rows[1]["problem"])
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    where = f"step {step}" if step is not None else re.escape(str(run / child))
    assert re.fullmatch(rf"rank1: error: {re.escape(str(run))}: 1 of 2 checkpoints unusable \({where}: .+\)", lines[0])
    table = run_main("inspect", str(run))  # the step column names a folder without a step (rich folds long names)
    label = str(step) if step is not None else child
    assert table.returncode == 3 and (len(label) > 20 or re.search(rf"│ +{re.escape(label)} │", table.stdout))
    assert tree_snapshot(tmp_path) == before


def test_unnamed_entries_not_selected_by_steps(tmp_path, good_step):
    run = _run_with(tmp_path, good_step, lambda r: (r / "checkpoint-abc").mkdir())
    found = discover_run(run)
    assert [c.step for c in select_steps(found, None)] == [7, None]
    assert [c.step for c in select_steps(found, "7")] == [7]
    assert [c.step for c in select_steps(found, ":")] == [7]
    result = run_main("inspect", str(run), "--steps", "7", "--json")
    assert result.returncode == 0, result.stderr
    assert [r["step"] for r in json.loads(result.stdout)["checkpoints"]] == [7]


def test_decompose_run_with_unusable_entry(tmp_path, good_step, models):
    run = _run_with(tmp_path, good_step, lambda r: (r / "checkpoint-abc").mkdir())
    base = models("fp32").path
    before = tree_snapshot(tmp_path)
    result = run_main("decompose", str(base), "--run", str(run), "--out", str(tmp_path / "out"), "-q")
    assert result.returncode == 3 and result.stdout == ""
    assert (
        result.stderr == f"rank1: error: {run / 'checkpoint-abc'}: not a step folder name "
        "(checkpoint-N, global_step_N, global_stepN_hf; N in digits 0-9)\n"
    )
    assert tree_snapshot(tmp_path) == before
    ok = run_main(
        "decompose", str(base), "--run", str(run), "--steps", "7", "--out", str(tmp_path / "out"), "-q", "--json"
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["steps"] == [7]


def test_pickle_search_is_bounded(tmp_path, monkeypatch):
    folder = tmp_path / "global_step_1"
    (folder / "actor" / "deeper").mkdir(parents=True)
    (folder / "a.pt").write_bytes(b"x")
    (folder / "actor" / "model_world_size_2_rank_0.pt").write_bytes(b"x")
    (folder / "actor" / "deeper" / "too_deep.pt").write_bytes(b"x")
    (folder / "linked").symlink_to(tmp_path, target_is_directory=True)  # not followed
    assert _find_pickles(folder) == ["a.pt", os.path.join("actor", "model_world_size_2_rank_0.pt")]
    monkeypatch.setattr("rank1tools.io.runs._PICKLE_SEARCH_ENTRIES", 1)
    assert len(_find_pickles(folder)) <= 1


def test_step_folder_linked_to_root_does_not_walk_the_filesystem(tmp_path, good_step):
    run = _run_with(tmp_path, good_step, lambda r: (r / "checkpoint-9").symlink_to("/", target_is_directory=True))
    t0 = time.monotonic()
    result = run_cli(["inspect", str(run), "--json"], tmp_path)
    assert time.monotonic() - t0 < 60
    assert result.returncode == 3, result.stderr
    rows = json.loads(result.stdout)["checkpoints"]
    assert [(r["step"], r["status"]) for r in rows] == [(7, "ok"), (9, "unusable")]
    assert "no safetensors weights" in rows[1]["problem"]


def test_openrlhf_deepspeed_state_beside_hf_weights(tmp_path):
    """OpenRLHF keeps DeepSpeed's global_stepN/ beside global_stepN_hf/: one step N, the weights;
    a DeepSpeed folder alone is listed unusable (it was skipped silently)."""
    run = build_run(tmp_path / "run", [20], "openrlhf")
    for step in (20, 30):
        (run / f"global_step{step}").mkdir()
        (run / f"global_step{step}" / "mp_rank_00_model_states.pt").write_bytes(b"never unpickled")
    found = discover_run(run)
    assert [(c.step, c.layout, Path(c.path).name) for c in found] == [
        (20, "openrlhf", "global_step20_hf"),
        (30, "deepspeed", "global_step30"),
    ]
    assert found[0].problem is None
    assert found[1].weights is None and "mp_rank_00_model_states.pt" in found[1].problem


# ---- an output folder's marker: invalid is not missing (#20) ----


@pytest.mark.parametrize(
    "marker, why",
    [
        ("{not json", "not valid JSON"),
        ('{"tool": "someone-else"}', 'no "tool": "rank1tools" entry'),
        ('["rank1tools"]', 'no "tool": "rank1tools" entry'),
        (None, "not a regular file"),
    ],
)
def test_invalid_marker_is_named_not_reported_missing(tmp_path, marker, why):
    from rank1tools.errors import OutputError
    from rank1tools.io.outputs import prepare_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    if marker is None:
        (out / "rank1tools.json").mkdir()
    else:
        (out / "rank1tools.json").write_text(marker)
    before = tree_snapshot(tmp_path)
    with pytest.raises(OutputError) as info:
        prepare_output(out, force=True)
    msg = str(info.value)
    assert msg.startswith(f"{out}: exists and was not written by rank1 ({out / 'rank1tools.json'} is invalid: {why})")
    assert "no rank1tools.json" not in msg and "\n" not in msg
    assert tree_snapshot(tmp_path) == before
    (out / "rank1tools.json").rename(tmp_path / "gone") if marker is not None else (out / "rank1tools.json").rmdir()
    with pytest.raises(OutputError, match=r"\(no rank1tools.json\)"):
        prepare_output(out, force=True)


# ---- run folders that look like checkpoints but do not match the layout (#20) ----

LOOKALIKES = ["Checkpoint-25", ".checkpoint-5", "GLOBAL_STEP_3"]


def test_lookalike_step_folders_are_noted(tmp_path, good_step, models):
    run = _run_with(
        tmp_path, good_step, lambda r: [(r / n).symlink_to(good_step, target_is_directory=True) for n in LOOKALIKES]
    )
    (run / "checkpoint-9").symlink_to(good_step, target_is_directory=True)
    (run / "notes").mkdir()  # an unrelated folder is not a look-alike
    assert [c.step for c in discover_run(run)] == [7, 9]
    note = (
        f"rank1: note: {run}: skipped 3 folders that look like checkpoints but do not match the layout "
        "(checkpoint-N, global_step_N, global_stepN_hf: lower case, not hidden): .checkpoint-5, Checkpoint-25, "
        "GLOBAL_STEP_3"
    )
    r = run_main("inspect", str(run), "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == [note] and json.loads(r.stdout)["notes"] == [note.removeprefix("rank1: note: ")]
    r = run_main(
        "decompose",
        str(models("fp32").path),
        "--run",
        str(run),
        "--out",
        str(tmp_path / "out"),
        "-q",
        "--json",
        "--rank",
        "1",
        "--include",
        Q,
    )
    assert r.returncode == 0, r.stderr
    assert note in r.stderr.splitlines() and json.loads(r.stdout)["steps"] == [7, 9]


def test_run_of_only_lookalikes_is_refused_listing_them(tmp_path, good_step, models):
    run = tmp_path / "run"
    run.mkdir()
    for n in LOOKALIKES:
        (run / n).symlink_to(good_step, target_is_directory=True)
    before = tree_snapshot(tmp_path)
    want = (
        f"rank1: error: {run}: no checkpoint folders (checkpoint-N, global_step_N, global_stepN_hf) in this "
        "directory; seen but not matching the layout (case, hidden): .checkpoint-5, Checkpoint-25, GLOBAL_STEP_3\n"
    )
    r = run_main("decompose", str(models("fp32").path), "--run", str(run), "--out", str(tmp_path / "out"), "-q")
    assert (r.returncode, r.stderr) == (3, want)
    r = run_main("inspect", str(run))
    assert (r.returncode, r.stderr) == (3, want)
    assert tree_snapshot(tmp_path) == before
