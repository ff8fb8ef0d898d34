"""Paste the transcripts written by examples.sh into the command pages.

    python docs/commands/fill_examples.py SCRATCH_DIR/transcripts

Each page marks an example with

    <!-- example NAME -->            the whole transcript NAME.txt
    <!-- example NAME lines=1-12,30- -->   only those lines (1-based, inclusive); each gap becomes "…"

followed by a ```console block, and the block is replaced by the transcript. Trailing spaces
(rich pads its tables) are removed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

MARK = re.compile(r"^<!-- example (?P<name>[\w-]+)(?: lines=(?P<lines>[0-9,-]+))? -->\n```console\n.*?^```\n",
                  re.M | re.S)


def select(lines: list[str], spec: str | None) -> list[str]:
    if not spec:
        return lines
    out, last = [], 0
    for part in spec.split(","):
        a, _, b = part.partition("-")
        start = int(a)
        stop = len(lines) if part.endswith("-") else int(b or a)
        if start > last + 1:
            out.append("…")
        out.extend(lines[start - 1:stop])
        last = stop
    if last < len(lines):
        out.append("…")
    return out


def fill(page: Path, transcripts: Path) -> None:
    def repl(m: re.Match) -> str:
        text = (transcripts / f"{m['name']}.txt").read_text(encoding="utf-8")
        lines = [ln.rstrip() for ln in text.splitlines()]
        body = "\n".join(select(lines, m["lines"]))
        head = m.group(0).split("\n", 1)[0]
        return f"{head}\n```console\n{body}\n```\n"

    text = page.read_text(encoding="utf-8")
    page.write_text(MARK.sub(repl, text), encoding="utf-8")


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    for page in sorted(Path(__file__).parent.glob("*.md")):
        fill(page, folder)
