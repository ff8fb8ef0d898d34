"""The user docs cover the CLI as it is: every command has a page naming every option it declares
(and no option it lacks), every relative link and anchor in README.md and docs/ resolves, and the
docs never send a user to the project's internal specification (users do not have it)."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest
import typer

from rank1tools.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = DOCS / "commands"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]


def _cli():
    return typer.main.get_command(app)


def _options(command) -> set[str]:
    names = set()
    for p in command.params:
        if p.param_type_name == "option":
            names.update(p.opts)
            names.update(p.secondary_opts)
    if hasattr(command, "alias_options"):  # a command with one subcommand per variant (extrapolate METHOD)
        for sub in command.commands.values():
            names |= _options(sub)
        names |= set(command.alias_options)
    return names


def _has_token(text: str, token: str) -> bool:
    """`--rank` as a word of its own: not inside `--rank-x`, `x--rank` or `rank-k`."""
    return re.search(rf"(?<![\w-]){re.escape(token)}(?![\w-])", text) is not None


def _option_tables(text: str) -> str:
    """The table rows of a page's "## Options" section."""
    m = re.search(r"^## Options\n(.*?)(?=^## )", text, re.M | re.S)
    assert m, "no '## Options' section"
    return "\n".join(line for line in m.group(1).splitlines() if line.startswith("|"))


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    keep = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LMN")
    return keep.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in _without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            base = _slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
        out.update(re.findall(r'<a id="([^"]+)"></a>', line))  # explicit anchors (the generated benchmarks page)
    return out


def test_slug_matches_github():
    assert _slug("A verl run, after `verl.model_merger`") == "a-verl-run-after-verlmodel_merger"
    assert _slug("`rank1 inspect SOURCE`") == "rank1-inspect-source"
    assert _slug("Linearity of the rank-1 trajectory (`fit-pls`)") == "linearity-of-the-rank-1-trajectory-fit-pls"


@pytest.mark.parametrize("name", sorted(_cli().commands))
def test_every_command_has_a_page_with_every_option(name):
    command = _cli().commands[name]
    page = PAGES / f"{name}.md"
    assert page.is_file(), f"docs/commands/{name}.md is missing"
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# `rank1 {name}"), f"{page.name}: title should name `rank1 {name}`"
    declared = _options(command)
    missing = sorted(o for o in declared if not _has_token(text, o))
    assert not missing, f"docs/commands/{name}.md does not mention {missing}"
    documented = set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", _option_tables(text)))
    unknown = sorted(documented - declared - {"--help", "--version"})
    assert not unknown, f"docs/commands/{name}.md documents options rank1 {name} lacks: {unknown}"
    assert "Exit codes" in text, f"{page.name}: no exit codes"
    if name == "demo":
        assert "## Output" in text
    else:  # a real example: the command run, with its output after it
        assert re.search(rf"^\$ rank1 {name} \S.*\n(?!```)", text, re.M), f"{page.name}: no example run of rank1 {name}"


def test_cli_index_links_every_command_and_names_global_options():
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    for name in _cli().commands:
        assert f"(commands/{name}.md)" in text, f"docs/cli.md does not link docs/commands/{name}.md"
    for opt in _options(_cli()) | {"--help", "-h"}:
        assert _has_token(text, opt), f"docs/cli.md does not mention {opt}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for name in _cli().commands:
        assert f"(docs/commands/{name}.md)" in readme, f"README.md does not link docs/commands/{name}.md"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = _without_code_blocks(path.read_text(encoding="utf-8"))
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{path.relative_to(ROOT)}: broken links: {broken}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_do_not_refer_to_the_internal_spec(path):
    hits = [i + 1 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()) if "SPEC" in line]
    assert not hits, f"{path.relative_to(ROOT)} mentions SPEC on lines {hits}: users do not have it"


def test_help_texts_do_not_refer_to_the_internal_spec():
    cli = _cli()
    texts = [cli.help or ""]
    for command in cli.commands.values():
        texts.append(command.help or "")
        texts.extend(getattr(p, "help", None) or "" for p in command.params)
    assert not [t for t in texts if "SPEC" in t]
