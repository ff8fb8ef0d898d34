"""Run discovery: trainer layouts, numeric step order, unsupported checkpoints, --steps selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from rank1tools.errors import InputError, UsageError
from rank1tools.io import discover_run, open_source, select_steps
from rank1tools.io.runs import RunCheckpoint, parse_steps

from _support import build_run, reference_tensors

STEPS = [100, 5, 10]  # lexical order (10, 100, 5) differs from numeric order (5, 10, 100)

LAYOUT_FOLDERS = {
    "trl": (lambda s: f"checkpoint-{s}", lambda s: f"checkpoint-{s}"),
    "verl": (lambda s: f"global_step_{s}", lambda s: f"global_step_{s}/actor/huggingface"),
    "openrlhf": (lambda s: f"global_step{s}_hf", lambda s: f"global_step{s}_hf"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FOLDERS))
def test_layouts_found_in_numeric_step_order(tmp_path, layout):
    run = build_run(tmp_path / "run", STEPS, layout)
    found = discover_run(run)
    step_dir, weight_dir = LAYOUT_FOLDERS[layout]
    assert [c.step for c in found] == sorted(STEPS)
    for c in found:
        assert c.layout == layout
        assert c.problem is None
        assert Path(c.path) == run / step_dir(c.step)
        assert Path(c.weights) == run / weight_dir(c.step)
        # the weights path opens to the tensors that were written there
        ckpt = open_source(c.weights)
        assert sorted(ckpt.names) == sorted(reference_tensors(run / weight_dir(c.step)))


def test_sharded_checkpoints_in_a_run(tmp_path):
    run = build_run(tmp_path / "run", [2, 1], "trl", max_shard_size="40KB")
    found = discover_run(run)
    assert [c.step for c in found] == [1, 2]
    for c in found:
        assert (Path(c.weights) / "model.safetensors.index.json").is_file()
        assert len(open_source(c.weights).shards) >= 3


def test_verl_huggingface_directly_under_step(tmp_path):
    run = build_run(tmp_path / "run", [3], "openrlhf")
    (run / "global_step3_hf").rename(tmp_path / "hf")
    (run / "global_step_3").mkdir()
    (tmp_path / "hf").rename(run / "global_step_3" / "huggingface")
    [c] = discover_run(run)
    assert (c.step, c.layout, c.problem) == (3, "verl", None)
    assert Path(c.weights) == run / "global_step_3" / "huggingface"


def test_verl_fsdp_only_step_is_reported_not_skipped(tmp_path):
    run = build_run(tmp_path / "run", [10, 30], "verl")
    actor = run / "global_step_20" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"not a real pickle, never loaded")
    found = discover_run(run)
    assert [c.step for c in found] == [10, 20, 30]
    bad = found[1]
    assert bad.weights is None
    assert bad.layout == "verl"
    assert bad.problem is not None
    assert "unsupported" in bad.problem
    assert "model_world_size_2_rank_0.pt" in bad.problem
    assert [c.problem for c in (found[0], found[2])] == [None, None]


def test_step_folder_without_weights_is_reported(tmp_path):
    run = build_run(tmp_path / "run", [1], "trl")
    (run / "checkpoint-2").mkdir()
    (run / "checkpoint-2" / "trainer_state.json").write_text("{}")
    found = discover_run(run)
    assert [c.step for c in found] == [1, 2]
    assert found[1].weights is None and "no safetensors" in found[1].problem


def test_unrelated_entries_are_ignored(tmp_path):
    run = build_run(tmp_path / "run", [7], "trl")
    (run / "runs").mkdir()
    (run / "global-step-3").mkdir()  # no layout's prefix (global_step)
    (run / "README.md").write_text("notes")
    assert [c.step for c in discover_run(run)] == [7]


def test_step_folder_lookalikes_are_listed_unusable(tmp_path):
    """A child with a layout's prefix is never skipped: listed with why it cannot be used."""
    run = build_run(tmp_path / "run", [7], "trl")
    (run / "checkpoint-abc").mkdir()
    (run / "checkpoint-8").write_text("a file, not a step folder")
    found = discover_run(run)
    assert [(c.step, Path(c.path).name, c.weights, c.problem) for c in found] == [
        (7, "checkpoint-7", str(run / "checkpoint-7"), None),
        (8, "checkpoint-8", None, "not a directory"),
        (None, "checkpoint-abc", None, found[2].problem),
    ]
    assert found[2].problem.startswith("not a step folder name")


def test_same_step_twice_is_an_error(tmp_path):
    run = build_run(tmp_path / "run", [10], "trl")
    build_run(run, [10], "openrlhf")
    with pytest.raises(InputError, match="step 10 appears twice"):
        discover_run(run)


def test_not_a_run(tmp_path):
    with pytest.raises(InputError, match="no such directory"):
        discover_run(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no checkpoint folders"):
        discover_run(tmp_path / "empty")
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="must be a directory"):
        discover_run(tmp_path / "f")


# ---- --steps ----


def _fake_run(steps: list[int]) -> list[RunCheckpoint]:
    return [RunCheckpoint(s, f"/run/checkpoint-{s}", "trl", f"/run/checkpoint-{s}") for s in sorted(steps)]


def test_select_steps_on_discovered_run(tmp_path):
    run = build_run(tmp_path / "run", STEPS, "trl")
    found = discover_run(run)
    assert [c.step for c in select_steps(found, None)] == [5, 10, 100]
    assert [c.step for c in select_steps(found, "100,5")] == [5, 100]
    assert [c.step for c in select_steps(found, "10:100:10")] == [10, 100]
    assert select_steps(found, "10") == [found[1]]


RUN = [5, 10, 20, 30, 50, 100, 150]


@pytest.mark.parametrize(
    "spec",
    [
        "10:100:10",
        "10:100:20",
        "10:100",
        "50:",
        ":20",
        "::50",
        ":",
        "0:1000:5",
        "5:5",
        " 20 : 50 ",
    ],
)
def test_range_is_inclusive_and_strided_from_start(spec):
    parts = [p.strip() for p in spec.split(":")] + [""] * (3 - spec.count(":") - 1)
    start, stop, every = (int(p) if p else None for p in parts)
    expected = [
        s
        for s in RUN
        if (start is None or s >= start)
        and (stop is None or s <= stop)
        and (every is None or (s - (start or 0)) % every == 0)
    ]
    assert expected, "the case must select something"
    assert [c.step for c in select_steps(_fake_run(RUN), spec)] == expected


def test_range_examples():
    run = _fake_run(RUN)
    assert [c.step for c in select_steps(run, "10:100:10")] == [10, 20, 30, 50, 100]
    assert [c.step for c in select_steps(run, "10:100:20")] == [10, 30, 50]  # 10 + 20k
    assert [c.step for c in select_steps(run, "10:100")] == [10, 20, 30, 50, 100]  # both ends inclusive


def test_list_is_sorted_and_deduplicated():
    assert [c.step for c in select_steps(_fake_run(RUN), "150, 5,20,5")] == [5, 20, 150]


def test_parse_steps_values():
    assert parse_steps("50,100,200") == ("list", [50, 100, 200])
    assert parse_steps("10:100:10") == ("range", (10, 100, 10))
    assert parse_steps("10:") == ("range", (10, None, None))
    assert parse_steps(":100") == ("range", (None, 100, None))


@pytest.mark.parametrize("spec", ["7", "5,7", "5,10,1000"])
def test_missing_step_is_a_usage_error(spec):
    missing = [s for s in map(int, spec.split(",")) if s not in RUN][0]
    with pytest.raises(UsageError) as info:
        select_steps(_fake_run(RUN), spec)
    assert info.value.exit_code == 2
    assert f"no checkpoint for step {missing}" in str(info.value)
    assert "5, 10, 20" in str(info.value)  # says which steps exist


def test_range_selecting_nothing_is_a_usage_error():
    with pytest.raises(UsageError, match="selects no checkpoint") as info:
        select_steps(_fake_run(RUN), "200:300")
    assert info.value.exit_code == 2


@pytest.mark.parametrize("spec", ["abc", "1;2", "1.5", "", ",", "1:2:3:4", "10:100:0", "10:100:-5", "a:b", "5,x"])
def test_malformed_steps_is_a_usage_error(spec):
    for call in (lambda: parse_steps(spec), lambda: select_steps(_fake_run(RUN), spec)):
        with pytest.raises(UsageError) as info:
            call()
        assert info.value.exit_code == 2
        assert str(info.value).startswith(f"--steps {spec!r}: expected")
