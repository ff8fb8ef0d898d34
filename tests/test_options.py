"""Option value parsers (rank1tools.options): accepted forms, and one-line UsageErrors (exit 2)
for everything else, including empty list items and non-ASCII digits (int("٢٠") == 20)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from rank1tools.errors import UsageError
from rank1tools.options import RankSpec, parse_positive_int, parse_ranks, parse_size, parse_steps

from _support import run_main, tree_snapshot


def test_importable_without_torch():
    code = "import rank1tools.options, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_old_import_paths_still_work():
    from rank1tools.commands.reconstruct import RankSpec as R2
    from rank1tools.commands.reconstruct import parse_ranks as p2
    from rank1tools.io.runs import parse_steps as s2

    assert (R2, p2, s2) == (RankSpec, parse_ranks, parse_steps)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("40KB", 40_000),
        ("2TB", 2 * 10**12),
        ("7B", 7),
        ("2GiB", 2 * 2**30),
        ("3MiB", 3 * 2**20),
        ("1KiB", 1024),
        ("1TiB", 2**40),
        ("1000000", 10**6),
        ("1", 1),
        (" 5gb ", 5 * 10**9),
        ("1.5GB", 1_500_000_000),
        ("5 GB", 5 * 10**9),
    ],
)
def test_parse_size_values(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "5XB",
        "0",
        "abc",
        "",
        "1e9",
        "-1",
        "-1GB",
        "٥GB",
        "٥",
        "GB",
        "5G",
        "1.GB",
        "0GB",
        "0.0000001KB",
        "5 G B",
        "inf",
        "nan",
        "1_000",
    ],
)
def test_parse_size_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_size(text)
    assert info.value.exit_code == 2
    msg = str(info.value)
    assert msg.startswith(f"--max-shard-size {text!r}: ") and "\n" not in msg
    assert re.search(r"expected a size like 5GB, 500MB or a number of bytes|must be at least 1 byte", msg)


def test_parse_size_names_the_option():
    with pytest.raises(UsageError, match=r"^--cache-size '5XB': expected a size like 5GB"):
        parse_size("5XB", "--cache-size")
    assert (
        str(pytest.raises(UsageError, parse_size, "5XB").value)
        == "--max-shard-size '5XB': expected a size like 5GB, 500MB or a number of bytes"
    )


@pytest.mark.parametrize("text, expected", [("1", 1), ("08", 8), (" 12 ", 12), (str(2**63 - 1), 2**63 - 1)])
def test_parse_positive_int_values(text, expected):
    assert parse_positive_int(text, "--rank") == expected


@pytest.mark.parametrize("text", ["0", "-1", "", "1.0", "٣", "1e3", "+3", str(2**63), "3 4", "0x10"])
def test_parse_positive_int_refuses(text):
    with pytest.raises(UsageError) as info:
        parse_positive_int(text, "--rank")
    assert str(info.value) == f"--rank {text!r}: expected a positive integer"


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("50,100,200", ("list", [50, 100, 200])),
        (" 5 , 7 ", ("list", [5, 7])),
        ("0", ("list", [0])),
        ("10:100:10", ("range", (10, 100, 10))),
        ("10:", ("range", (10, None, None))),
        (":100", ("range", (None, 100, None))),
        ("::5", ("range", (None, None, 5))),
        (":", ("range", (None, None, None))),
    ],
)
def test_parse_steps_values(spec, expected):
    assert parse_steps(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "10,,20",
        "5,",
        ",5",
        "",
        " ",
        "٢٠",
        "10,٢٠",
        "1٠:20",
        "-5",
        "10:-20",
        "+5",
        "1e3",
        "99999999999999999999",
        "10:100:0",
        "1:2:3:4",
        "a:b",
        "0x10",
    ],
)
def test_parse_steps_refuses(spec):
    with pytest.raises(UsageError) as info:
        parse_steps(spec)
    assert info.value.exit_code == 2
    assert str(info.value) == f"--steps {spec!r}: expected a list like 50,100,200 or a range like 10:100:10"


def test_parse_ranks_values():
    assert parse_ranks("8") == [RankSpec("8", count=8)]
    assert parse_ranks("1, 2,4") == [RankSpec("1", count=1), RankSpec("2", count=2), RankSpec("4", count=4)]
    [pct] = parse_ranks("1%")
    assert (pct.fraction, pct.folder, pct.resolve((200, 300))) == (0.01, "rank-1pct", 2)
    assert parse_ranks("0.5%")[0].fraction == 0.005


@pytest.mark.parametrize(
    "spec, message",
    [
        ("1,,2", r"^--rank '1,,2': empty item in the list$"),
        ("1,", r"^--rank '1,': empty item in the list$"),
        ("", r"^--rank: give at least one rank$"),
        ("٣", r"^--rank '٣': expected an integer \(8\) or a percentage"),
        ("٣%", r"^--rank '٣%': expected an integer"),
        ("1e2", r"^--rank '1e2': expected an integer"),
        ("0", r"^--rank 0: must be at least 1$"),
        ("-2", r"^--rank -2: must be at least 1$"),
        ("0%", r"^--rank 0%: a percentage must be in \(0%, 100%\]$"),
        ("101%", r"^--rank 101%: a percentage must be in"),
        ("2,2", r"^--rank 2,2: a rank is repeated$"),
        ("9" * 30, r"^--rank '9{30}': expected an integer"),
    ],
)
def test_parse_ranks_refuses(spec, message):
    with pytest.raises(UsageError, match=message) as info:
        parse_ranks(spec)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--rank", "1,,2"],
        ["--rank", "٣"],
        ["--max-shard-size", "5XB"],
        ["--max-shard-size", "0"],
    ],
    ids=["rank-empty-item", "rank-unicode", "shard-size-unit", "shard-size-zero"],
)
def test_reconstruct_refuses_bad_option_before_reading(tmp_path, args):
    """Exit 2 with one line, before any input is opened (the paths do not exist) or output written."""
    before = tree_snapshot(tmp_path)
    result = run_main(
        "reconstruct",
        str(tmp_path / "base"),
        str(tmp_path / "ckpt"),
        "--out",
        str(tmp_path / "o"),
        "--rank",
        "1",
        *args,
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and re.match(rf"rank1: error: {re.escape(args[0])} ", lines[0]), result.stderr
    assert tree_snapshot(tmp_path) == before


@pytest.mark.parametrize("steps", ["10,,20", "٢٠"])
def test_inspect_refuses_bad_steps(tmp_path, steps):
    (tmp_path / "run" / "checkpoint-20").mkdir(parents=True)
    result = run_main("inspect", str(tmp_path / "run"), "--steps", steps)
    assert result.returncode == 2 and result.stdout == ""
    assert (
        result.stderr == f"rank1: error: --steps {steps!r}: expected a list like 50,100,200 or a range like 10:100:10\n"
    )
