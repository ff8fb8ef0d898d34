"""The page's HTML pieces (docs/commands/report.md#the-page): escaping, numbers, tables collapsed
past a screenful, figures and the page around the sections, with its inline CSS. No script, no
external file: the page is one self-contained file that renders the same offline."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

from ... import __version__

SCREENFUL = 20  # rows a table shows whole; a longer one shows its first and last EDGE_ROWS
EDGE_ROWS = 5
SHORT_CELL = 28  # characters: a text cell up to this long is kept on one line
GENERATOR = f"rank1tools {__version__}"  # the page's <meta name="generator">: how --force recognises it


def esc(text) -> str:
    return escape(str(text), quote=True)


def fmt(value, digits: int = 3) -> str:
    """A table cell: integers as they are, floats to `digits` significant decimals, None/NaN as –."""
    if value is None or value == "":
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if math.isinf(value):
            return "∞" if value > 0 else "−∞"
        if value != 0 and (abs(value) < 10**-(digits) or abs(value) >= 1e6):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


@dataclass
class Table:
    """A table: columns (header texts), rows (cell values, formatted by fmt unless str), an optional
    caption; `numeric` columns are right-aligned (default: every column whose cells are numbers)."""

    columns: list[str]
    rows: list[list]
    caption: str = ""
    numeric: set[int] | None = None
    digits: int = 3

    def _numeric(self) -> set[int]:
        if self.numeric is not None:
            return self.numeric
        found = set()
        for j in range(len(self.columns)):
            cells = [r[j] for r in self.rows if j < len(r) and r[j] not in (None, "")]
            if cells and all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in cells):
                found.add(j)
        return found

    def _row(self, row, numeric) -> str:
        cells = []
        for j, v in enumerate(row):
            text = v if isinstance(v, Html) else Html(esc(v if isinstance(v, str) else fmt(v, self.digits)))
            # short cells never wrap (a path like step-20 or a method name stays on one line)
            short = not isinstance(v, Html) and len(str(v)) <= SHORT_CELL
            cls = ' class="num"' if j in numeric else (' class="nw"' if short else "")
            cells.append(f"<td{cls}>{text.markup}</td>")
        return "<tr>" + "".join(cells) + "</tr>"

    def _table(self, rows, numeric, caption: str = "", gap: int = 0) -> str:
        head = "".join(f"<th{' class=num' if j in numeric else ''}>{esc(c)}</th>" for j, c in enumerate(self.columns))
        body = [self._row(r, numeric) for r in rows]
        if gap:
            half = len(body) // 2
            body.insert(
                half,
                f'<tr class="gap"><td colspan="{len(self.columns)}">⋯ {gap} more rows, listed below ⋯</td></tr>',
            )
        cap = f"<caption>{esc(caption)}</caption>" if caption else ""
        return (
            f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table></div>"
        )

    def html(self) -> str:
        numeric = self._numeric()
        if len(self.rows) <= SCREENFUL:
            return self._table(self.rows, numeric, self.caption)
        top, middle, bottom = self.rows[:EDGE_ROWS], self.rows[EDGE_ROWS:-EDGE_ROWS], self.rows[-EDGE_ROWS:]
        return (
            self._table(top + bottom, numeric, f"{self.caption} ({len(self.rows)} rows)".strip(), gap=len(middle))
            + f"<details><summary>the other {len(middle)} rows (rows {EDGE_ROWS + 1}..{len(self.rows) - EDGE_ROWS})"
            f"</summary>{self._table(middle, numeric)}</details>"
        )


@dataclass(frozen=True)
class Html:
    """Markup already escaped (a table cell or paragraph that holds tags)."""

    markup: str


@dataclass
class Figure:
    """An inline SVG figure (markup from figures.py) or the reason it is missing."""

    svg: str | None
    caption: str
    missing: str = ""

    def html(self) -> str:
        if self.svg is None:
            return f'<p class="missing">Figure not drawn ({esc(self.caption)}): {esc(self.missing)}</p>'
        return f'<figure class="fig">{self.svg}<figcaption>{esc(self.caption)}</figcaption></figure>'


@dataclass
class Section:
    """One section of the page: an id, a heading, and its parts in order (Html, Table, Figure)."""

    id: str
    title: str
    subtitle: str = ""
    parts: list = field(default_factory=list)

    def add(self, part) -> Section:
        self.parts.append(part)
        return self

    def html(self) -> str:
        sub = f'<p class="sub">{esc(self.subtitle)}</p>' if self.subtitle else ""
        body = "\n".join(p.markup if isinstance(p, Html) else p.html() for p in self.parts)
        return f'<section id="{esc(self.id)}">\n<h2>{esc(self.title)}</h2>{sub}\n{body}\n</section>'


def paragraph(text: str, cls: str = "") -> Html:
    return Html(f"<p{f' class={chr(34)}{cls}{chr(34)}' if cls else ''}>{esc(text)}</p>")


def heading(text: str) -> Html:
    return Html(f"<h3>{esc(text)}</h3>")


def code(text: str) -> Html:
    return Html(f"<code>{esc(text)}</code>")


CSS = """
:root{--ink:#1d2330;--muted:#5b6474;--line:#dde2ea;--bg:#f6f7fa;--card:#fff;--accent:#2456c4;--warn:#a4461a;--ok:#1f7a45}
*{box-sizing:border-box}
html{-webkit-text-size-adjust:100%}
body{margin:0;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--ink);background:var(--bg);overflow-wrap:break-word}
header{background:#18233b;color:#fff;padding:22px 16px 18px}
header h1{margin:0 auto;max-width:1100px;font-size:24px;font-weight:650}
header p{margin:6px auto 0;max-width:1100px;color:#c9d3e6}
nav{max-width:1100px;margin:10px auto 0;display:flex;flex-wrap:wrap;gap:6px}
nav a{color:#dfe7f7;text-decoration:none;font-size:13px;border:1px solid #3c4c70;border-radius:14px;padding:2px 10px}
nav a:hover{background:#2b3a5e}
main{max-width:1100px;margin:0 auto;padding:8px 12px 40px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;margin:16px 0;padding:4px 18px 16px}
h2{font-size:19px;margin:14px 0 4px}
h3{font-size:15px;margin:18px 0 6px;color:#2d3748}
p.sub,figcaption,caption,.src{color:var(--muted);font-size:13px}
p.missing{color:var(--warn);font-style:italic}
p.warn{color:var(--warn);border-left:3px solid var(--warn);padding-left:10px}
#verdict{border:2px solid var(--accent)}
#verdict ul{padding-left:20px;margin:8px 0}
#verdict li{margin:6px 0}
#verdict li.flag::marker{content:"⚑ ";color:var(--warn)}
b.v{font-variant-numeric:tabular-nums;color:var(--accent)}
b.who{font-weight:600;color:#2d3748}
.src{display:block;font-size:12px}
.scroll{display:inline-block;vertical-align:top;overflow-x:auto;max-width:100%;margin:8px 16px 8px 0}
td code{overflow-wrap:anywhere}
td:has(> code){min-width:18em}
table{border-collapse:collapse;font-size:13px}
caption{text-align:left;padding:2px 0 4px}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
th{background:#eef1f6;font-weight:600;white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.nw{white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfd}
tr.gap td{text-align:center;color:var(--muted);font-style:italic;background:#fff}
details{margin:4px 0 10px}
summary{cursor:pointer;color:var(--accent);font-size:13px}
figure.fig{margin:12px 0;max-width:100%}
figure.fig svg{display:block;width:100%;height:auto}
code{font:12.5px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:#eef1f6;padding:1px 4px;border-radius:4px}
footer{max-width:1100px;margin:0 auto;padding:0 14px 30px;color:var(--muted);font-size:12px}
@media (max-width:600px){.scroll{margin-right:0}body{font-size:14px}section{padding:2px 10px 12px}header h1{font-size:20px}th,td{padding:3px 6px}}
"""


def page(title: str, subtitle: str, sections: list[Section], footer: str) -> str:
    """The whole document; the generator meta on its second line is how --force recognises a page rank1 wrote."""
    nav = "".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(s.html() for s in sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta name="generator" content="{esc(GENERATOR)}">\n'
        '<meta charset="utf-8">\n<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p><nav>{nav}</nav></header>\n"
        f"<main>\n{body}\n</main>\n<footer>{esc(footer)}</footer>\n</body></html>\n"
    )
