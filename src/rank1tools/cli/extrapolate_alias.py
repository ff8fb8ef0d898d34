"""The `rank1 extrapolate` group's parsing: the `--method M` alias and the flag rule.

`rank1 extrapolate BASE --method M ...` is rewritten to `rank1 extrapolate M BASE ...` before click
parses it (ExtrapolateGroup), so both forms run the same code and record the same command line; each
method's subcommand (MethodCommand) refuses a flag of another method with one line naming the
method(s) it belongs to (docs/commands/extrapolate.md, "Subcommands, the `--method` alias and the
flag rule"). The subcommands themselves live in cli/extrapolate_commands.py.
"""

from __future__ import annotations

import typer
from typer._click.core import Context  # typer vendors click: its contexts and usage errors
from typer._click.exceptions import NoSuchOption
from typer._click.exceptions import UsageError as ClickUsageError

from ..commands.extrapolate.registry import METHODS
from .app import Rank1Command

METHOD_NAMES = tuple(METHODS)


def rewrite_method_alias(args: list[str]) -> list[str]:
    """`BASE ... --method M ...` (or `--method=M`) -> `M BASE ...`; the subcommand form as it is.
    Both at once must agree. Only tokens before a `--` are options."""
    from ..errors import UsageError

    end = args.index("--") if "--" in args else len(args)
    found, rest, i = [], [], 0
    while i < end:
        tok = args[i]
        if tok == "--method":
            if i + 1 >= end:
                raise UsageError(f"--method needs a value: {', '.join(METHOD_NAMES)}")
            found.append(args[i + 1])
            i += 2
            continue
        if tok.startswith("--method="):
            found.append(tok.split("=", 1)[1])
        else:
            rest.append(tok)
        i += 1
    rest += args[end:]
    if not found:
        return args
    if len(set(found)) > 1:
        raise UsageError(f"--method given twice ({found[0]}, {found[1]}): give it once")
    name = found[0]
    if name not in METHOD_NAMES:
        raise UsageError(f"--method {name!r}: expected one of {', '.join(METHOD_NAMES)}")
    if rest and rest[0] in METHOD_NAMES:
        if rest[0] != name:
            raise UsageError(f"--method {name} and the subcommand {rest[0]} disagree: give one of them")
        return rest
    return [name, *rest]


class ExtrapolateGroup(typer.core.TyperGroup):
    """`rank1 extrapolate`: the methods as subcommands, `--method M` as an alias."""

    alias_options = ("--method",)  # options the group itself reads (docs: the alias)

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        if not args or args[0] in ("-h", "--help"):
            return super().parse_args(ctx, args)
        rewritten = rewrite_method_alias(args)
        if rewritten is args and args[0] not in self.commands:  # no method given
            head = args[: args.index("--")] if "--" in args else args
            if "-h" in head or "--help" in head:
                return super().parse_args(ctx, ["--help"])
            _no_method(ctx, self, args)
        if rewritten is not args:
            _record_command_line(args, rewritten)
        return super().parse_args(ctx, rewritten)


def _record_command_line(args: list[str], rewritten: list[str]) -> None:
    """Record the subcommand form in the provenance's argv (rank1tools.COMMAND_LINE): the alias and
    the subcommand form write the same bytes."""
    import rank1tools

    from ..engine.executor_options import without_executor_args

    line = rank1tools.COMMAND_LINE
    if line and "extrapolate" in line:
        at = line.index("extrapolate") + 1
        if line[at:] == without_executor_args(args):
            rank1tools.COMMAND_LINE = [*line[:at], *without_executor_args(rewritten)]


def _options(params: list, args: list[str]):
    """The option tokens of `args` (`--flag` or `--flag=value`, up to `--`), with the options'
    values skipped: (flag as typed, known to `params`)."""
    own = {o: p for p in params for o in (*p.opts, *p.secondary_opts)}
    i = 0
    while i < len(args) and args[i] != "--":
        tok = args[i]
        flag = tok.split("=", 1)[0]
        takes_value = flag in own and own[flag].param_type_name == "option" and not own[flag].is_flag
        if flag.startswith("-") and len(flag) > 1 and not _is_number(flag):
            yield flag, flag in own
        i += 2 if takes_value and "=" not in tok else 1


def _is_number(text: str) -> bool:
    return text[1:2].isdigit() or text[1:2] == "."


def _no_method(ctx: Context, group, args: list[str]) -> None:
    """No subcommand and no --method: an unknown flag gets the usual hint (against every method's
    flags), else the usage error asks for a method."""
    from ..errors import UsageError

    params, seen = [], set()
    for name in METHOD_NAMES:
        for p in group.commands[name].params:
            if p.name not in seen:
                seen.add(p.name)
                params.append(p)
    for flag, known in _options(params, args):
        if not known:
            union = typer.core.TyperCommand(name="extrapolate", params=params)
            raise NoSuchOption(flag, ctx=Context(union, info_name="extrapolate", parent=ctx.parent))
    raise UsageError(
        "extrapolate needs a method: rank1 extrapolate alpharl|relex|linear BASE ... "
        "(or --method M; see rank1 extrapolate --help)"
    )


class MethodCommand(Rank1Command):
    """One method's subcommand: a flag of another method is refused naming the method(s) it
    belongs to (registry.foreign_flag_error), before click calls it unknown."""

    method_name = ""

    def parse_args(self, ctx: Context, args: list[str]) -> list[str]:
        from ..commands.extrapolate.registry import foreign_flag_error

        for flag, known in _options(self.params, args):
            error = None if known else foreign_flag_error(flag, self.method_name)
            if error is not None:
                raise error
        try:
            return super().parse_args(ctx, args)
        except ClickUsageError as e:
            if "unexpected extra argument" in e.format_message():
                error = foreign_flag_error("CHECKPOINT", self.method_name)
                if error is not None:
                    raise error from None
            raise


def method_command(name: str):
    """The subcommand class of method `name` (its click `cls`)."""
    return type(f"{name.capitalize()}Command", (MethodCommand,), {"method_name": name})
