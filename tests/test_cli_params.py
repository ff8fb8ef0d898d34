"""The options several commands share are declared once, in rank1tools/cli/params.py (issue #19):
no command module declares them again, and the executor options the provenance's command line
leaves out are the ones the CLI declares."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from rank1tools.cli import app
from rank1tools.engine.executor_options import EXECUTOR_FLAGS, without_executor_args

CLI = Path(__file__).resolve().parents[1] / "src" / "rank1tools" / "cli"
SHARED = [
    "--out",
    "--force",
    "--include",
    "--exclude",
    "--steps",
    "--run",
    "--revisions",
    "--subfolders",
    "--commits",
    "--hub-cache-policy",
    "--device",
    "--dtype",
    "--max-shard-size",
    "--quiet",
    "--json",
    *EXECUTOR_FLAGS.values(),
]


def test_shared_options_are_declared_only_in_params():
    for path in sorted(CLI.glob("*.py")):
        if path.name == "params.py":
            continue
        text = path.read_text(encoding="utf-8")
        for flag in SHARED:
            assert not re.search(rf"typer\.Option\([^\n]*\"{flag}\"", text), f"{path.name} declares {flag} again"


def _all_commands():
    root = typer.main.get_command(app)
    for _name, cmd in root.commands.items():
        yield from (cmd.commands.values() if hasattr(cmd, "commands") else [cmd])


def test_every_executor_option_is_left_out_of_the_recorded_command_line():
    declared = {o for cmd in _all_commands() for p in cmd.params for o in p.opts if o in EXECUTOR_FLAGS.values()}
    assert declared == set(EXECUTOR_FLAGS.values())
    argv = ["decompose", "b", *[x for f in sorted(declared) for x in (f, "1")], "--rank", "2"]
    assert without_executor_args(argv) == ["decompose", "b", "--rank", "2"]


def test_option_groups_keep_their_place_in_help():
    """--run and its options stand where the command's placeholder stood (after --out), the
    executor options after --force."""
    for cmd in _all_commands():
        names = [o for p in cmd.params for o in p.opts if o.startswith("--")]
        if "--run" in names:
            assert names.index("--run") == names.index("--out") + 1, cmd.name
        if "--executor" in names:
            assert names.index("--executor") == names.index("--force") + 1, cmd.name
