"""The page's figures: drawn by the commands' own plotting code (rank1tools.plots*, captured as SVG
text by plot_common.captured_svg, never written to disk) and made fit to sit inline in one HTML page
(docs/commands/report.md#the-page).

matplotlib's SVG is deterministic with plot_common.RC (svg.hashsalt) and no Date metadata; inline,
several figures share one document, so each figure's ids get a prefix of their own (two figures
would otherwise define the same glyph or clip-path id, and a `url(#…)` may resolve to another
figure's). Without matplotlib, every figure is a line saying what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ...plot_common import INSTALL_HINT, PlotsUnavailable, captured_svg, plots_available
from .html import Figure

UNWRITTEN = Path("plots")  # the out_dir handed to the plot functions: captured, nothing is written there
MISSING = f"matplotlib is not installed: {INSTALL_HINT}"
_PROLOGUE = re.compile(r"\A.*?(?=<svg\b)", re.S)  # the XML declaration and DOCTYPE before <svg>
_METADATA = re.compile(r"\s*<metadata>.*?</metadata>", re.S)  # matplotlib's RDF block: nothing a reader sees
_ID = re.compile(r'\bid="([^"]+)"')
_SIZE = re.compile(r'<svg\b([^>]*?)\swidth="([\d.]+)pt"\s+height="([\d.]+)pt"')


def inline_svg(svg: str, prefix: str) -> str:
    """matplotlib's SVG document as an element for an HTML page: no prologue, ids prefixed, and
    sized by CSS (width 100 %, at most its natural width) instead of fixed points."""
    svg = _METADATA.sub("", _PROLOGUE.sub("", svg, count=1), count=1)
    ids = set(_ID.findall(svg))
    if ids:
        pattern = re.compile(
            r'(\bid="|href="#|url\(#)('
            + "|".join(re.escape(i) for i in sorted(ids, key=len, reverse=True))
            + r')(?=["\)])'
        )
        svg = pattern.sub(lambda m: f"{m.group(1)}{prefix}-{m.group(2)}", svg)

    def size(m: re.Match) -> str:
        width_px = float(m.group(2)) * 4 / 3
        return f'<svg{m.group(1)} role="img" style="max-width:{width_px:.0f}px"'

    return _SIZE.sub(size, svg, count=1).rstrip() + "\n"


class FigureMaker:
    """Draws the figures of one page, numbering them so their ids never collide."""

    def __init__(self):
        self.available = plots_available()
        self.count = 0

    def draw(self, draw: Callable[[], object], captions: dict[str, str]) -> list[Figure]:
        """Run `draw()` (a plots* function given any out_dir: nothing is written) and return the
        figures it made, in `captions`' order (stem -> caption); a stem it did not draw is left out.
        Without matplotlib, one Figure per caption saying so."""
        if not self.available:
            return [Figure(None, caption, MISSING) for caption in captions.values()]
        try:
            with captured_svg() as svgs:
                draw()
        except PlotsUnavailable:
            return [Figure(None, caption, MISSING) for caption in captions.values()]
        figures = []
        for stem, caption in captions.items():
            if stem in svgs:
                self.count += 1
                figures.append(Figure(inline_svg(svgs[stem], f"f{self.count}"), caption))
        return figures
