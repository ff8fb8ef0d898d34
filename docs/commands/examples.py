"""Run the examples of the command pages and write (or check) their transcripts.

    python docs/commands/examples.py write [SCRATCH_DIR]    # regenerate the pages' example blocks
    python docs/commands/examples.py check [SCRATCH_DIR]    # exit 1 naming each block that differs

(`make docs-examples` runs `write`; tests/test_docs_examples.py runs the check.) The pages are the
source: an example is a block

    <!-- example NAME -->                  the whole transcript
    <!-- example NAME lines=1-12,30- -->   only those lines (1-based, inclusive); each gap becomes "…"
    ```console
    $ COMMAND                             every `$ ` line but `$ echo $?` is a command to run
    output ...
    ```

The examples run on what `make demo` leaves beside the GRPO demo: `rank1 demo --synthetic --out
demo-synthetic`, the planted run, which is cheap (seconds) and gives the same figures on every
run. SCRATCH_DIR (default: a temporary folder) gets that demo, then every block's commands in page
order (inspect, decompose, reconstruct, export-lora, fit-pls, linearity, extrapolate, backtest, report, then cli.md), so a later
block may use an earlier one's output, as a reader following the pages does. A command's
transcript is the command, its stdout, its stderr and, when not 0, `$ echo $?` and its exit code;
tables are rendered as in a pipe (never cut, as wide as their values). A plain `rank1 ...` command runs in this process (no torch
import per command); one with shell syntax (a pipe, `&&`, a redirection) runs in bash with
`rank1` on PATH. Trailing spaces are removed.

`check` compares line by line: text exactly (runs of spaces and of table rules count as one), and
each number within one unit of its last printed digit, or 1e-6 relative for long figures (the
last bits of a float32 SVD differ between CPUs).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent
PAGES = [
    HERE / f"{name}.md"
    for name in (
        "inspect",
        "decompose",
        "reconstruct",
        "export-lora",
        "fit-pls",
        "linearity",
        "extrapolate",
        "backtest",
        "report",
    )
]
PAGES.append(DOCS / "cli.md")
DEMO = "demo-synthetic"  # where `make demo` puts the planted run (Makefile)
SETUP = f"rank1 demo --synthetic --out {DEMO} --force"
COLUMNS = "110"
MARK = re.compile(
    r"^<!-- example (?P<name>[\w-]+)(?: lines=(?P<lines>[0-9,-]+))? -->\n```console\n(?P<body>.*?)^```\n", re.M | re.S
)
SHELL_SYNTAX = re.compile(r"[|&;<>`$(){}*?]")


@dataclass
class Example:
    page: Path
    name: str
    lines: str | None
    body: str  # the block as the page has it

    @property
    def commands(self) -> list[str]:
        return [ln[2:] for ln in self.body.splitlines() if ln.startswith("$ ") and ln != "$ echo $?"]


def examples(pages: list[Path] = PAGES) -> list[Example]:
    return [
        Example(page, m["name"], m["lines"], m["body"])
        for page in pages
        for m in MARK.finditer(page.read_text(encoding="utf-8"))
    ]


def select(lines: list[str], spec: str | None) -> list[str]:
    """The lines `spec` names (`1-7,16-19,24-`), a "…" line for each gap."""
    if not spec:
        return lines
    out, last = [], 0
    for part in spec.split(","):
        a, _, b = part.partition("-")
        start = int(a)
        stop = len(lines) if part.endswith("-") else int(b or a)
        if start > last + 1:
            out.append("…")
        out.extend(lines[start - 1 : stop])
        last = stop
    if last < len(lines):
        out.append("…")
    return out


def _rank1_in_process(args: list[str]) -> tuple[str, str, int]:
    from rank1tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv, sys.argv = sys.argv, ["rank1", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv
    return out.getvalue(), err.getvalue(), code


def _shim(folder: Path) -> Path:
    """A folder holding a `rank1` that runs this interpreter's rank1tools (for shell commands)."""
    bin_dir = folder / ".bin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "rank1"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m rank1tools.cli "$@"\n')
    exe.chmod(0o755)
    return bin_dir


def run_command(cmd: str, cwd: Path) -> str:
    """The transcript of one command run in `cwd`."""
    words = shlex.split(cmd)
    if words and words[0] == "rank1" and not SHELL_SYNTAX.search(cmd):
        out, err, code = _rank1_in_process(words[1:])
    else:
        env = dict(os.environ, PATH=f"{_shim(cwd)}{os.pathsep}{os.environ.get('PATH', '')}")
        p = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
        out, err, code = p.stdout, p.stderr, p.returncode
    text = f"$ {cmd}\n{out}{err}"
    if code:
        text += f"$ echo $?\n{code}\n"
    return text


def transcript(example: Example, cwd: Path) -> str:
    """The block's body as running its commands gives it (its lines selection applied)."""
    text = "".join(run_command(cmd, cwd) for cmd in example.commands)
    lines = select([ln.rstrip() for ln in text.splitlines()], example.lines)
    shown = [ln[2:] for ln in lines if ln.startswith("$ ") and ln != "$ echo $?"]
    if shown != example.commands:  # a `lines=` selection must not hide a command the block runs
        raise ValueError(f"{example.page.name}: example {example.name}: lines={example.lines} hides a command")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def scratch(folder: str | None):
    """cwd = the scratch folder with the synthetic demo in it, COLUMNS fixed, for the duration."""
    with contextlib.ExitStack() as stack:
        path = (
            Path(folder) if folder else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rank1-examples-")))
        )
        path.mkdir(parents=True, exist_ok=True)
        old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in ("COLUMNS", "HF_HUB_OFFLINE")}
        os.chdir(path)
        os.environ.update(COLUMNS=COLUMNS, HF_HUB_OFFLINE="1")  # the examples never touch the network
        try:
            out, err, code = _rank1_in_process(shlex.split(SETUP)[1:] + ["-q"])
            if code:
                raise RuntimeError(f"{SETUP} failed ({code}): {err.strip()}")
            yield path
        finally:
            os.chdir(old_cwd)
            for key, value in old_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


# ---- comparison ---------------------------------------------------------------------------------

NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
RULES = re.compile(r"([─━│┃┏┓┗┛┡┩┌┐└┘├┤┬┴┼╇╈╋┳┻])\1*")


def _normal(line: str) -> str:
    return re.sub(r" +", " ", RULES.sub(r"\1", line)).strip()


def _tolerance(quoted: str) -> float:
    mantissa, _, exponent = quoted.partition("e")
    decimals = len(mantissa.partition(".")[2])
    unit = 10.0 ** (int(exponent or 0) - decimals)
    return max(unit * 1.01, 1e-6 * abs(float(quoted))) if decimals or exponent else 0.0


def line_matches(quoted: str, real: str) -> bool:
    """Same words, same numbers (within the quoted figure's last digit)."""
    a, b = _normal(quoted), _normal(real)
    if NUMBER.sub("#", a) != NUMBER.sub("#", b):
        return False
    return all(
        math.isclose(float(x), float(y), rel_tol=0, abs_tol=_tolerance(x))
        for x, y in zip(NUMBER.findall(a), NUMBER.findall(b))
    )


def differences(quoted: str, real: str) -> list[str]:
    """Each line of `quoted` that `real` does not match, as `-quoted / +real` pairs."""
    q, r = quoted.splitlines(), real.splitlines()
    diffs = [f"-{a}\n+{b}" for a, b in zip(q, r) if not line_matches(a, b)]
    if len(q) != len(r):
        diffs.append(f"{len(q)} lines quoted, {len(r)} lines printed")
    return diffs


# ---- entry point --------------------------------------------------------------------------------


def write(folder: str | None = None) -> None:
    with scratch(folder) as cwd:
        for page in PAGES:
            text = page.read_text(encoding="utf-8")

            def repl(m: re.Match, page: Path = page) -> str:
                ex = Example(page, m["name"], m["lines"], m["body"])
                return m.group(0).replace(m["body"], transcript(ex, cwd), 1)

            page.write_text(MARK.sub(repl, text), encoding="utf-8")


def check(folder: str | None = None, skip=lambda example: False) -> dict[str, list[str]]:
    """{"page: block name": differences} for every block whose real output differs from the page's
    (blocks for which `skip` is true are not run)."""
    bad = {}
    with scratch(folder) as cwd:
        for ex in examples():
            if skip(ex):
                continue
            diffs = differences(ex.body, transcript(ex, cwd))
            if diffs:
                bad[f"{ex.page.name}: {ex.name}"] = diffs
    return bad


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    target = sys.argv[2] if len(sys.argv) > 2 else None
    if sys.argv[1] == "write":
        write(target)
    else:
        failures = check(target)
        for where, diffs in failures.items():
            print(f"{where}:\n" + "\n".join(diffs), file=sys.stderr)
        sys.exit(1 if failures else 0)
