"""`rank1 extrapolate METHOD`: one subcommand per registered method, `--method M` as its alias, and
one generic refusal of another method's flags (docs/commands/extrapolate.md, "Flags"). The flag ×
method matrix is generated from the registry, so a new flag cannot be forgotten."""

from __future__ import annotations

import filecmp
import re
import shutil
import subprocess
import sys

import pytest
import typer

from rank1tools.cli import app
from rank1tools.cli.extrapolate_alias import METHOD_NAMES
from rank1tools.commands.extrapolate.base import own_flags
from rank1tools.commands.extrapolate.registry import METHODS, ExtrapolateOptions, flag_owners

from _support import cli_env, run_main

# the smallest valid command line of each method (the inputs need not exist: flags are refused first)
VALID = {
    "relex": ["b", "c", "--target-step", "9", "--out", "x"],
    "linear": ["b", "c", "--target-step", "9", "--out", "x"],
    "alpharl": ["b", "--fits", "f", "--target-metric", "0.5", "--out", "x"],
}
NO_VALUE = {"--position-index", "--subfolders", "--commits", "--extrapolate-norms"}


def _subcommands():
    return typer.main.get_command(app).commands["extrapolate"].commands


def test_the_cli_knows_every_registered_method():
    assert tuple(METHODS) == METHOD_NAMES == tuple(sorted(VALID, key=list(METHODS).index))
    assert set(_subcommands()) == set(METHODS)


def _cli_flags(name: str) -> set[str]:
    cmd = _subcommands()[name]
    flags = {o for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
    if any(p.param_type_name == "argument" and p.name == "checkpoints" for p in cmd.params):
        flags.add("CHECKPOINT")
    return flags


def _common_flags() -> set[str]:
    return set.intersection(*(_cli_flags(m) for m in METHODS))


@pytest.mark.parametrize("name", list(METHODS))
def test_each_subcommand_takes_the_flags_its_options_declare(name):
    """The subcommand's flags beyond those every method shares are exactly its options class's
    FLAGS: a flag added to one side only fails here."""
    declared = {f for flags in own_flags(METHODS[name].options).values() for f in flags}
    assert _cli_flags(name) - _common_flags() == declared


MATRIX = [(m, flag, owners) for m in METHODS for flag, owners in flag_owners().items() if m not in owners]


def _foreign(flag: str) -> list[str]:
    if flag == "CHECKPOINT":
        return ["c2"]
    return [flag] if flag in NO_VALUE else [flag, "1"]


@pytest.mark.parametrize("form", ["subcommand", "alias"])
@pytest.mark.parametrize("method,flag,owners", MATRIX, ids=[f"{m}:{f}" for m, f, _ in MATRIX])
def test_a_flag_of_another_method_exits_2_naming_it(method, flag, owners, form):
    args = VALID[method]
    if flag == "CHECKPOINT":
        args = [args[0], "c2", *args[1:]]
        expected = f"CHECKPOINT arguments apply to --method {' and '.join(owners)}, not {method}"
    else:
        args = [*args, *_foreign(flag)]
        expected = f"{flag} applies to --method {' and '.join(owners)}, not {method}"
    argv = ["extrapolate", method, *args] if form == "subcommand" else ["extrapolate", *args, "--method", method]
    r = run_main(*argv)
    assert (r.returncode, r.stderr) == (2, f"rank1: error: {expected}\n"), argv


def test_the_issue_examples_exit_2():
    r = run_main(
        "extrapolate",
        "b",
        "c",
        "--method",
        "relex",
        "--target-step",
        "9",
        "--out",
        "x",
        "--fits",
        "X",
        "--target-metric",
        "0.7",
        "--container",
        "last",
        "--min-r2",
        "0.9",
    )
    assert (r.returncode, r.stderr) == (2, "rank1: error: --fits applies to --method alpharl, not relex\n")
    r = run_main("extrapolate", "b", "c", "--method", "linear", "--target-step", "9", "--out", "x", "--r2", "loo_r2")
    assert (r.returncode, r.stderr) == (2, "rank1: error: --r2 applies to --method alpharl, not linear\n")


def test_library_callers_get_the_same_refusal():
    from rank1tools.errors import UsageError

    with pytest.raises(UsageError, match=r"^--fits applies to --method alpharl, not relex$"):
        ExtrapolateOptions(method="relex", target_steps=[9], fits="X")
    with pytest.raises(UsageError, match=r"^--rank applies to --method relex, not linear$"):
        ExtrapolateOptions(method="linear", target_steps=[9], rank=2)
    with pytest.raises(UsageError, match="needs --target-step"):
        METHODS["relex"].options()
    with pytest.raises(UsageError, match="--mode 'x'"):
        METHODS["linear"].options(target_steps=[9], mode="x")


@pytest.mark.parametrize("name", list(METHODS))
def test_subcommand_help_lists_only_its_own_flags(name):
    r = subprocess.run(
        [sys.executable, "-m", "rank1tools.cli", "extrapolate", name, "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    listed = set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", r.stdout, flags=re.M)) - {"--help"}
    assert listed == {f for f in _cli_flags(name) if f.startswith("--")}
    foreign = {f for f, owners in flag_owners().items() if name not in owners and f.startswith("--")}
    assert not foreign & set(re.findall(r"--[\w-]+", r.stdout))


def test_group_help_names_the_methods_and_the_alias():
    r = run_main("extrapolate", "--help")
    assert r.returncode == 0
    assert all(m in r.stdout for m in METHODS) and "--method" in r.stdout


def test_no_method_is_one_line_exit_2():
    r = run_main("extrapolate", "b", "c", "--target-step", "9", "--out", "x")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "needs a method" in r.stderr
    r = run_main("extrapolate", "b", "--method", "nope", "--out", "x")
    assert (r.returncode, r.stderr) == (2, "rank1: error: --method 'nope': expected one of alpharl, relex, linear\n")


def _tree_equal(a, b) -> bool:
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    return not mismatch and not errors and all(_tree_equal(a / d, b / d) for d in cmp.common_dirs)


@pytest.mark.parametrize("method,extra", [("relex", ["--rank", "2"]), ("linear", ["--mode", "two-point"])])
def test_alias_and_subcommand_write_the_same_bytes(tmp_path, method, extra):
    from rank1tools.synthetic import LlamaShape, make_base, make_run

    shape = LlamaShape(vocab=32, hidden=16, intermediate=24, layers=1, heads=2, kv_heads=1)
    make_base(tmp_path / "base", shape)
    make_run(tmp_path / "run", [10, 20, 30], shape)
    out = tmp_path / "out"
    common = [
        str(tmp_path / "base"),
        "--run",
        str(tmp_path / "run"),
        "--target-step",
        "40,60",
        "--out",
        str(out),
        *extra,
        "-q",
    ]
    r = run_main("extrapolate", *common, "--method", method)
    assert r.returncode == 0, r.stderr
    shutil.move(out, tmp_path / "alias")
    r = run_main("extrapolate", method, *common)
    assert r.returncode == 0, r.stderr
    assert _tree_equal(tmp_path / "alias", out)
