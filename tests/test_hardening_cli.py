"""Hostile and careless command lines (issue #20): numbers in Python-only spellings or out of range,
`--out` as a URL, step selections under their aliases, option typos, usage lines that show value
names instead of Python types. Every refusal is one line, exit 2, before torch is imported, with
nothing written (docs/cli.md, "Exit codes" and "Step selections")."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import typer

from rank1tools.cli import app
from rank1tools.synthetic import write_factor_store

from _support import cli_env, run_main, tree_snapshot

COMMANDS_WITH_OUT = {
    "decompose": ["decompose", "b", "c"],
    "reconstruct": ["reconstruct", "b", "c", "--rank", "1"],
    "fit-pls": ["fit-pls", "f"],
    "linearity": ["linearity", "b", "c"],
    "extrapolate": ["extrapolate", "b", "c", "--method", "relex", "--target-step", "9"],
    "demo": ["demo"],
}
REC = ["reconstruct", "b", "c", "--rank", "1", "--out", "x"]
ALPHARL = ["extrapolate", "b", "--method", "alpharl", "--fits", "f", "--target-metric", "0.5", "--out", "x"]
FIT = ["fit-pls", "f", "--out", "x"]
LIN = ["linearity", "b", "c", "--out", "x"]
DEC = ["decompose", "b", "c", "--out", "x"]

BAD_VALUES = [  # (argv, the one error line after "rank1: error: ")
    ([*ALPHARL, "--min-r2", "0_5"], "--min-r2 '0_5': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*ALPHARL, "--min-r2", "2"], "--min-r2 2: must be at most 1"),
    ([*ALPHARL, "--min-r2", "nan"], "--min-r2 'nan': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*ALPHARL, "--min-r2", "1e999"], "--min-r2 1e999: must be a finite number"),
    ([*REC, "--alpha", "1_0"], "--alpha '1_0': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*REC, "--alpha", "0x10"], "--alpha '0x10': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*REC, "--alpha", "١"], "--alpha '١': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*ALPHARL, "--flag-ratio", "-1"], "--flag-ratio -1: must be greater than 0"),
    ([*ALPHARL, "--flag-ratio", "0"], "--flag-ratio 0: must be greater than 0"),
    ([*FIT, "--fail-below", "1_0"], "--fail-below '1_0': expected a number in ASCII digits, like 0.5, -2 or 1e-3"),
    ([*FIT, "--fail-below", "1.5"], "--fail-below 1.5: must be at most 1"),
    ([*LIN, "--fail-below", "1.5"], "--fail-below 1.5: must be at most 1"),
    ([*LIN, "--fail-below", "-0.1"], "--fail-below -0.1: must be at least 0"),
    (
        [*DEC, "--executor", "ray", "--ray-num-cpus", "1_0"],
        "--ray-num-cpus '1_0': expected a number in ASCII digits, like 0.5, -2 or 1e-3",
    ),
    ([*DEC, "--executor", "ray", "--ray-num-gpus", "-1"], "--ray-num-gpus -1: must be at least 0"),
    (
        [*DEC, "--executor", "ray", "--max-in-flight", "1_0"],
        "--max-in-flight '1_0': expected a whole number in ASCII digits, like 3",
    ),
    ([*DEC, "--executor", "ray", "--max-in-flight", "0"], "--max-in-flight 0: must be at least 1"),
    (["demo", "--seed", "1_0", "--out", "x"], "--seed '1_0': expected a whole number in ASCII digits, like 3"),
    (["demo", "--seed", "-1", "--out", "x"], "--seed '-1': expected a whole number in ASCII digits, like 3"),
    ([*FIT, "--window", "abc"], "--window 'abc': expected a list like 50,100,200 or a range like 10:100:10"),
    ([*FIT, "--steps", "abc"], "--steps 'abc': expected a list like 50,100,200 or a range like 10:100:10"),
    ([*FIT, "--window", "10:20", "--steps", "10:20"], "--steps and --window are one option (an alias): give it once"),
    (
        ["extrapolate", "b", "c", "--method", "relex", "--target-step", "9", "--history-until", "5,8", "--out", "x"],
        "--history-until '5,8': expected one step, like 500",
    ),  # was read as 5
    (
        [
            "extrapolate",
            "b",
            "c",
            "--method",
            "linear",
            "--mode",
            "two-point",
            "--target-step",
            "9",
            "--from",
            "1_0",
            "--out",
            "x",
        ],
        "--from '1_0': expected one step, like 500",
    ),
    ([*FIT, "--min-checkpoints", "2"], "--min-checkpoints 2: at least 3 (a line through 2 points always fits)"),
    *[
        (
            [*argv, "--out", "hf://org/name"],
            "--out hf://org/name: outputs are local paths, not URLs; write to a local "
            "folder (then upload it yourself, e.g. with `hf upload`)",
        )
        for argv in COMMANDS_WITH_OUT.values()
    ],
    (
        [*FIT[:-1], "s3://bucket/fits"],
        "--out s3://bucket/fits: outputs are local paths, not URLs; write to a local "
        "folder (then upload it yourself, e.g. with `hf upload`)",
    ),
]


def test_bad_values_are_one_line_exit_2_before_torch_and_write_nothing(tmp_path):
    """Each bad value in one process: exit 2, the exact line, torch never imported, and no file or
    folder created (the `hf:` folder `--out hf://org/name` used to make included). The inputs do
    not exist: the values are refused before any input is looked at."""
    code = (
        "import json, sys; import rank1tools.cli as c\n"
        "codes = []\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    sys.argv = ['rank1', *args]\n"
        "    try:\n        c.main()\n    except SystemExit as e:\n        codes.append(e.code)\n"
        "print(json.dumps([codes, 'torch' in sys.modules]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, json.dumps([a for a, _ in BAD_VALUES])],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    codes, torch_imported = json.loads(r.stdout.strip().splitlines()[-1])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == len(BAD_VALUES), r.stderr
    for (args, message), got, line in zip(BAD_VALUES, codes, lines):
        assert (got, line) == (2, f"rank1: error: {message}"), args
    assert torch_imported is False
    assert list(tmp_path.iterdir()) == []


def test_good_values_in_plain_spellings_still_pass():
    from rank1tools.options import parse_number

    assert parse_number("0.5", "--x", at_most=1) == 0.5
    assert parse_number("-2", "--x", at_most=1) == -2.0
    assert parse_number(" 1e-3 ", "--x", above=0) == 0.001
    assert parse_number(".5", "--x") == 0.5 and parse_number("+3.", "--x") == 3.0
    assert parse_number("1", "--x", at_most=1) == 1.0  # the bounds are inclusive unless `above`
    assert parse_number("7", "--seed", at_least=0, integer=True) == 7
    assert parse_number(4.0, "--flag-ratio", above=0) == 4.0  # a default, already a number


# ---- usage lines and typo hints ----


def _commands():
    return typer.main.get_command(app).commands


@pytest.mark.parametrize("name", sorted(_commands()))
def test_usage_shows_value_names_not_python_types(name):
    """Every option that takes a value names it (PATH, STEPS, N, R2, auto|cpu...), every argument
    too; nothing shows typer's `<str>`, `<list[str]>`, `<float>` or `{base}`."""
    command = _commands()[name]
    for p in command.params:
        if p.param_type_name == "argument" or not getattr(p, "is_flag", False):
            assert p.metavar and re.fullmatch(
                r"\[?[A-Z][A-Z0-9_]*\]?(\.\.\.)?|[a-z0-9_:.-]+(\|[a-z0-9_:.-]+)+", p.metavar
            ), (p.name, p.metavar)
    r = subprocess.run(
        [sys.executable, "-m", "rank1tools.cli", name, "--help"],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert not re.search(r"<\w|[{}]", r.stdout), r.stdout


TYPOS = [  # (command argv, the mistyped option, the hint)
    (["fit-pls", "f", "--out", "x"], "--windw", "(did you mean --window?)"),
    (["fit-pls", "f", "--out", "x"], "--stpes", "(did you mean --steps?)"),
    (["fit-pls", "f", "--out", "x"], "--metic", "(did you mean --metric or --metrics?)"),
    (["decompose", "b", "c", "--out", "x"], "--rnk", "(did you mean --rank?)"),
    (["extrapolate", "b", "--out", "x"], "--target_step", "(did you mean --target-step?)"),
    (["extrapolate", "b", "--out", "x"], "--history", "(did you mean --history-until?)"),
    (["reconstruct", "b", "c", "--out", "x"], "--steps", ""),  # no step selection there: no hint, not --help
    (["reconstruct", "b", "c", "--out", "x"], "--hlep", ""),
]


@pytest.mark.parametrize("argv,typed,hint", TYPOS, ids=[t for _, t, _ in TYPOS])
def test_typo_hints_name_the_option_meant(argv, typed, hint):
    r = run_main(*argv, typed, "1")
    assert r.returncode == 2
    expected = f"rank1: error: rank1 {argv[0]}: No such option: {typed}{' ' + hint if hint else ''} (see --help)\n"
    assert r.stderr == expected


# ---- one vocabulary for step selections: --steps, with --window an alias ----

STEPS = [10, 20, 30, 40, 50]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    rng = np.random.default_rng(0)
    modules = {}
    for t in ("q", "k"):
        X = rng.standard_normal(8)[None, :] + np.arange(len(STEPS))[:, None] * rng.standard_normal(8)[None, :]
        S = np.linalg.norm(X, axis=1)
        V = rng.standard_normal((len(STEPS), 6))
        modules[f"model.layers.0.self_attn.{t}_proj.weight"] = {
            "U": X / S[:, None],
            "S": S,
            "V": V / np.linalg.norm(V, axis=1, keepdims=True),
            "layer": 0,
            "type": t,
        }
    return write_factor_store(tmp_path_factory.mktemp("store") / "store", STEPS, modules)


@pytest.mark.parametrize(
    "spec,steps",
    [("20:40", [20, 30, 40]), ("10:50:20", [10, 30, 50]), ("10,30,40", [10, 30, 40]), (":30", [10, 20, 30])],
)
def test_fit_pls_steps_and_its_alias_window_select_the_same(store, tmp_path, spec, steps):
    """fit-pls takes --steps with the grammar of every other command (a list, or a range with
    EVERY, which --window refused after importing torch), and --window as its alias: same fit."""
    results = {}
    for option in ("--steps", "--window"):
        r = run_main(
            "fit-pls", str(store), option, spec, "--out", str(tmp_path / option[2:]), "-q", "--no-plots", "--json"
        )
        assert r.returncode == 0, r.stderr
        data = json.loads(r.stdout)
        assert data["steps"] == steps
        results[option] = (tmp_path / option[2:] / "fits.csv").read_text()
    assert results["--steps"] == results["--window"]


def test_fit_pls_step_the_store_lacks_is_a_usage_error(store, tmp_path):
    before = tree_snapshot(tmp_path)
    r = run_main("fit-pls", str(store), "--window", "10,25", "--out", str(tmp_path / "o"))
    assert (r.returncode, r.stdout) == (2, "")
    assert r.stderr == (
        "rank1: error: --window: no checkpoint for step 25 in the factor store (steps 10, 20, 30, 40, 50)\n"
    )
    assert tree_snapshot(tmp_path) == before
