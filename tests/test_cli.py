"""`rank1` command line: inspect on models and runs, exit codes, --help without torch.

Success paths run in-process with typer's CliRunner. Exit codes and the one-line error come from
`rank1tools.cli.main` (CliRunner bypasses it): those tests call main() itself, and the unsupported-verl
run goes through a real `rank1` process. The bad-input matrix is in test_bad_input.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter

import pytest
from typer.testing import CliRunner

import rank1tools
from rank1tools.cli import app
from rank1tools.errors import UsageError

from _support import build_run, cli_env, finish_cli, reference_tensors, start_cli, tree_snapshot

runner = CliRunner()


def _expected_model_report(folder, tie: bool, layers: int) -> dict:
    """What `inspect --json` must say, from safetensors' own reader and Llama naming (docs/concepts.md#words)."""
    ref = reference_tensors(folder)
    matrices = [
        n for n, r in ref.items() if n.startswith("model.layers.") and n.endswith("_proj.weight") and len(r.shape) == 2
    ]
    return {
        "tensors": len(ref),
        "parameters": sum(r.tensor.numel() for r in ref.values()),
        "bytes": sum(r.tensor.numel() * r.tensor.element_size() for r in ref.values()),
        "dtypes": dict(Counter(r.dtype_code for r in ref.values())),
        "shards": len({r.shard for r in ref.values()}),
        "matrix_modules": len(matrices),
        "matrix_parameters": sum(ref[n].tensor.numel() for n in matrices),
        "module_types": {t: layers for t in sorted(["q", "k", "v", "o", "gate", "up", "down"])},
        "layers": layers,
        "lm_head_tied": tie,
        "kind": "model",
    }


def test_inspect_model_json(model):
    res = runner.invoke(app, ["inspect", str(model.path), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    exp = _expected_model_report(model.path, model.tie, model.shape.layers)
    assert exp["matrix_modules"] == 7 * model.shape.layers
    for key, value in exp.items():
        assert data[key] == value, key
    assert data["source"] == str(model.path)
    assert data["revision"] is None


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_inspect_model_table(models, tie):
    m = models("bf16", tie, True)
    ref = reference_tensors(m.path)
    res = runner.invoke(app, ["inspect", str(m.path)])
    assert res.exit_code == 0, res.output
    rows = dict(re.findall(r"│ (\w[\w ]*?)\s+│ (.*?)\s+│", res.stdout))
    assert int(rows["tensors"]) == len(ref)
    assert rows["parameters"] == f"{sum(r.tensor.numel() for r in ref.values()):,}"
    assert int(rows["shards"]) == len(list(m.path.glob("*.safetensors")))
    assert rows["dtypes"] == f"BF16: {len(ref)}"
    assert rows["matrix modules"].startswith(f"{7 * m.shape.layers} in {m.shape.layers} layers")
    assert rows["lm_head"] == ("tied to embedding" if tie else "stored")


def test_inspect_safetensors_file(models):
    m = models("fp32", True, False)
    res = runner.invoke(app, ["inspect", str(m.path / "model.safetensors"), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["tensors"] == len(reference_tensors(m.path))
    assert data["shards"] == 1 and data["lm_head_tied"] is True


@pytest.mark.parametrize("layout", ["trl", "verl", "openrlhf"])
def test_inspect_run_json_lists_steps(tmp_path, layout):
    run = build_run(tmp_path / "run", [100, 5, 10], layout)
    res = runner.invoke(app, ["inspect", str(run), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["kind"] == "run"
    assert [c["step"] for c in data["checkpoints"]] == [5, 10, 100]
    for c in data["checkpoints"]:
        ref = reference_tensors(c["weights"])
        assert c["status"] == "ok" and c["problem"] is None and c["layout"] == layout
        assert c["tensors"] == len(ref)
        assert c["parameters"] == sum(r.tensor.numel() for r in ref.values())
        assert c["dtypes"] == {"F32": len(ref)}
    res = runner.invoke(app, ["inspect", str(run), "--json", "--steps", "10:100"])
    assert res.exit_code == 0, res.output
    assert [c["step"] for c in json.loads(res.stdout)["checkpoints"]] == [10, 100]


def test_inspect_run_table_lists_steps(tmp_path):
    run = build_run(tmp_path / "run", [100, 5, 10], "trl")
    res = runner.invoke(app, ["inspect", str(run)])
    assert res.exit_code == 0, res.output
    assert f"{3} checkpoints" in res.stdout
    steps = [int(m) for m in re.findall(r"│\s+(\d+) │ trl ", res.stdout)]
    assert steps == [5, 10, 100]


_TORCH_PROBE = (
    "import sys, rank1tools.cli as c\n"
    "sys.argv = ['rank1', *sys.argv[1:]]\n"
    "try:\n    c.main()\nexcept SystemExit as e:\n    code = e.code\n"
    "sys.stderr.write(f'torch imported: {\"torch\" in sys.modules}\\n')\n"
    "sys.exit(code)\n"
)


def test_inspect_reads_headers_without_importing_torch(models, tmp_path):
    """`rank1 inspect` (model folder, run; table and JSON) never imports torch, and prints exactly
    what the same command prints in a process where torch is loaded; the JSON report still equals
    safetensors' own listing."""
    m = models("bf16", True, True)
    run = build_run(tmp_path / "run", [5, 10], "trl")
    for args in (
        ["inspect", str(m.path), "--json"],
        ["inspect", str(m.path)],
        ["inspect", str(run), "--json"],
        ["inspect", str(run)],
    ):
        r = subprocess.run(
            [sys.executable, "-c", _TORCH_PROBE, *args], capture_output=True, text=True, env=cli_env(), timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert r.stderr.splitlines()[-1] == "torch imported: False", (args, r.stderr)
        assert r.stdout == runner.invoke(app, args).stdout, args
        if args == ["inspect", str(m.path), "--json"]:
            data = json.loads(r.stdout)
            for key, value in _expected_model_report(m.path, True, m.shape.layers).items():
                assert data[key] == value, key


def test_inspect_run_bad_steps_raises_usage_error(tmp_path):
    run = build_run(tmp_path / "run", [1, 2], "trl")
    res = runner.invoke(app, ["inspect", str(run), "--steps", "3"])
    assert isinstance(res.exception, UsageError)
    assert "no checkpoint for step 3" in str(res.exception)


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.stdout.strip() == f"rank1tools {rank1tools.__version__}"


# ---------- exit codes and stderr come from rank1tools.cli.main ----------


def call_main(args, monkeypatch, capsys):
    """Run rank1tools.cli.main() in-process, as the console script does; returns (code, stdout, stderr)."""
    from rank1tools.cli import main

    monkeypatch.setattr(sys, "argv", ["rank1", *map(str, args)])
    monkeypatch.delenv("RANK1_DEBUG", raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main()
    out, err = capsys.readouterr()
    code = info.value.code
    return (0 if code is None else code), out, err


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("rank1: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def verl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("verl")
    run = build_run(root / "run", [10, 30], "verl")
    actor = run / "global_step_20" / "actor"
    actor.mkdir(parents=True)
    (actor / "model_world_size_2_rank_0.pt").write_bytes(b"opaque FSDP shard bytes (never unpickled)")
    return run


def test_run_with_unsupported_verl_step_exits_3(verl_run, tmp_path):
    """A real `rank1` process: the listing is printed, then one error line and exit code 3."""
    before = tree_snapshot(verl_run)
    r = finish_cli(start_cli(["inspect", verl_run, "--json"], cwd=tmp_path))
    assert r.returncode == 3
    line = _one_error_line(r.stderr)
    assert "1 of 3 checkpoints unusable" in line
    assert "step 20" in line and "unsupported" in line and "model_world_size_2_rank_0.pt" in line
    data = json.loads(r.stdout)  # the listing is still printed, the bad step included
    assert [(c["step"], c["status"]) for c in data["checkpoints"]] == [(10, "ok"), (20, "unusable"), (30, "ok")]
    assert list(tmp_path.iterdir()) == [] and tree_snapshot(verl_run) == before


def test_run_with_corrupt_checkpoint_exits_3(tmp_path, monkeypatch, capsys):
    run = build_run(tmp_path / "run", [1, 2], "trl")
    shard = run / "checkpoint-2" / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, out, err = call_main(["inspect", run], monkeypatch, capsys)
    assert code == 3
    line = _one_error_line(err)
    assert "1 of 2 checkpoints unusable" in line
    assert "step 2" in line and "truncated" in line and "checkpoint-2" in line


def test_missing_step_exits_2(verl_run, monkeypatch, capsys):
    code, out, err = call_main(["inspect", verl_run, "--steps", "10,40"], monkeypatch, capsys)
    assert code == 2
    assert out == ""
    line = _one_error_line(err)
    assert "no checkpoint for step 40" in line and "10, 20, 30" in line


def test_malformed_steps_exits_2(verl_run, monkeypatch, capsys):
    code, out, err = call_main(["inspect", verl_run, "--steps", "10:x"], monkeypatch, capsys)
    assert code == 2
    assert out == ""
    assert (
        _one_error_line(err)
        == "rank1: error: --steps '10:x': expected a list like 50,100,200 or a range like 10:100:10"
    )


def test_model_json_through_main(models, monkeypatch, capsys):
    m = models("bf16", True, True)
    code, out, err = call_main(["inspect", m.path, "--json"], monkeypatch, capsys)
    assert code == 0, err
    assert err == ""
    data = json.loads(out)
    assert data["tensors"] == len(reference_tensors(m.path))
    assert data["matrix_modules"] == 7 * m.shape.layers and data["lm_head_tied"] is True


def test_internal_error_is_one_line_exit_1(models, monkeypatch, capsys):
    """An unexpected exception becomes one 'internal error' line and exit code 1 (no traceback)."""
    import rank1tools.commands.inspect as insp

    def boom(*args, **kwargs):
        raise ZeroDivisionError("synthetic failure")

    monkeypatch.setattr(insp, "inspect_source", boom)
    code, out, err = call_main(["inspect", models("fp32").path], monkeypatch, capsys)
    assert code == 1
    assert err.splitlines() == [
        "rank1: internal error: ZeroDivisionError: synthetic failure (set RANK1_DEBUG=1 for a traceback)"
    ]


def test_help_exits_0():
    r = subprocess.run(
        [sys.executable, "-m", "rank1tools.cli", "--help"], capture_output=True, text=True, env=cli_env(), timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "inspect" in r.stdout and "Usage" in r.stdout


def test_help_does_not_import_torch():
    code = (
        "import sys; sys.argv=['rank1','--help']; import rank1tools.cli as c\n"
        "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout  # help really ran
    assert r.stdout.strip().splitlines()[-1] == "False"


EARLY_ERRORS = [  # (args, exit code, message) — each must be refused before torch is imported
    (["decompose", "b", "c", "--rank", "1.5", "--out", "x"], 2, "--rank '1.5': expected a positive integer"),
    (["decompose", "b", "c", "--rank", "٣", "--out", "x"], 2, "--rank '٣': expected a positive integer"),
    (["decompose", "b", "--run", "r", "--steps", "10,,20", "--out", "x"], 2, "--steps '10,,20'"),
    (["decompose", "b", "c", "--device", "gpu", "--out", "x"], 2, "--device 'gpu'"),
    (["decompose", "b", "c", "--out", "", "--force"], 2, "--out is empty"),
    (["decompose", "b", "c", "--out", "existing"], 4, "existing: already exists; pass --force"),
    (["decompose", "b", "c", "--out", "existing", "--force"], 4, "was not written by rank1"),
    (["decompose", "b", "c", "--out", "b/sub"], 4, "output is inside an input (b)"),
    (["reconstruct", "b", "c", "--rank", "1,,2", "--out", "x"], 2, "--rank '1,,2'"),
    (["reconstruct", "b", "c", "--rank", "1", "--max-shard-size", "5XB", "--out", "x"], 2, "--max-shard-size '5XB'"),
    (["reconstruct", "b", "c", "--rank", "1", "--max-shard-size", "-1GB", "--out", "x"], 2, "--max-shard-size '-1GB'"),
    (["reconstruct", "b", "c", "--rank", "1", "--dtype", "float8", "--out", "x"], 2, "--dtype 'float8'"),
    (["reconstruct", "b", "c", "--rank", "1", "--rest", "none", "--out", "x"], 2, "--rest 'none'"),
    (
        ["reconstruct", "b", "c", "--rank", "1", "--alpha", "inf", "--out", "x"],
        2,
        "--alpha 'inf': expected a number in ASCII digits",
    ),
    (
        ["reconstruct", "b", "c", "--rank", "1", "--hub-cache-policy", "never", "--out", "x"],
        2,
        "--hub-cache-policy 'never'",
    ),
    (["inspect", "r", "--steps", "٢٠"], 2, "--steps '٢٠'"),
    (["demo", "--out", "existing"], 4, "already exists"),
]


def test_option_and_output_errors_answer_before_importing_torch(tmp_path):
    """Option errors take no torch import and open no input: one line, the right code, at once."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "mine.txt").write_text("x")
    (tmp_path / "b").mkdir()
    code = (
        "import json, sys; import rank1tools.cli as c\n"
        "results = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['rank1', *args]\n"
        "    try:\n        c.main()\n    except SystemExit as e:\n        results.append(e.code)\n"
        "print(json.dumps([results, 'torch' in sys.modules]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps([a for a, _, _ in EARLY_ERRORS])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    codes, torch_imported = json.loads(r.stdout.strip().splitlines()[-1])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(EARLY_ERRORS), r.stderr
    for (args, want_code, needle), got, line in zip(EARLY_ERRORS, codes, lines):
        assert got == want_code, (args, got, line)
        assert line.startswith("rank1: error: ") and needle in line, (args, line)
    assert torch_imported is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b", "existing"]  # nothing written


# ---------- tables: never a value cut (docs/cli.md, "Tables") ----------

LONG = "a-folder-name-long-enough-to-overflow-any-terminal-" * 3


def test_in_a_pipe_no_value_is_cut_or_wrapped(tmp_path):
    """Through a pipe (a subprocess, COLUMNS=60 set as a CI runner might): every path and figure is
    printed whole on one line, in every command's table. The old tables cut paths to `future/st…`."""
    import torch

    from rank1tools.synthetic import LlamaShape, make_base, make_run

    shape = LlamaShape(vocab=96, hidden=48, intermediate=112, layers=1, heads=4, kv_heads=2, tie=True)
    root = tmp_path / LONG
    make_base(root / "base", shape, dtype=torch.float32)
    make_run(root / "run", [10, 20, 30], shape, base_dtype=torch.float32, dtype=torch.float32)
    out = root / "future" / "step-500"
    env = {**cli_env(), "COLUMNS": "60"}

    def rank1(*args):
        r = subprocess.run(
            [sys.executable, "-m", "rank1tools.cli", *map(str, args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        assert "…" not in r.stdout
        return r.stdout.splitlines()

    lines = rank1("inspect", root / "run")
    for step in (10, 20, 30):
        assert any(f"│ {root / 'run' / f'checkpoint-{step}'} " in line for line in lines), step
    lines = rank1("reconstruct", root / "base", root / "run" / "checkpoint-30", "--rank", "1,2", "--out", out, "-q")
    for rank in (1, 2):
        assert any(f"│ {rank}    │ {out / f'rank-{rank}'} " in line for line in lines), lines
    lines = rank1("decompose", root / "base", "--run", root / "run", "--out", root / "spectra", "-q", "--rank", "2")
    assert lines[-1].startswith(f"7 modules x 3 checkpoints -> {root / 'spectra'} (overall energy_1 0.")
    lines = rank1("fit-pls", root / "spectra", "--out", root / "fits", "-q", "--no-plots")
    assert lines[-1] == f"-> {root / 'fits'}"
    assert any(
        line.startswith("most linear (r2_step): model.layers.0.") and line.count("model.layers.0.") == 5
        for line in lines
    )  # five modules and their figures on one line


def test_on_a_narrow_terminal_cells_fold_instead_of_being_cut(monkeypatch, capsys):
    """On a terminal narrower than a value, rich folds the value onto the next lines: every
    character is still printed, and no ellipsis replaces any of it."""
    from rich.console import Console

    from rank1tools.cli import render
    from rank1tools.commands.reconstruct.plan import RankOutput

    monkeypatch.setattr(render, "_console", lambda: Console(width=50, force_terminal=True, color_system=None))
    path = "outputs/" + "future-step-500-of-a-long-run/" * 3 + "rank-1"

    rank_output = RankOutput(
        rank="1", path=path, lost_fraction=0.001, rel_error=1e-3, updated_elements=1234, warning=None, tensors=[]
    )
    render.reconstruct(type("Result", (), {"modules": 7, "used_factors": False, "outputs": [rank_output]}))
    out = capsys.readouterr().out
    assert "…" not in out
    cells = "".join(re.findall(r"│ 1\s+│ (\S+)", out) + re.findall(r"^│\s+│ (\S+)", out, re.M))
    assert cells == path
