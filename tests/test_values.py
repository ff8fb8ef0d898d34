"""Values parsed once (issue #19): a step selection is parsed where it enters — the CLI's RunSpec, or
StepSelection.of for a library caller's text — and handed down typed; --max-shard-size is
normalised by one function, values.shard_size."""

from __future__ import annotations

import pytest

from rank1tools import values
from rank1tools.errors import UsageError
from rank1tools.io import discover_run, select_steps
from rank1tools.values import StepSelection, parse_steps, shard_size

from _support import build_run, run_main


@pytest.fixture
def parse_calls(monkeypatch):
    """Every call of values.parse_steps (StepSelection.parse's parser), with its arguments."""
    calls = []

    def counting(spec, option="--steps"):
        calls.append((spec, option))
        return parse_steps(spec, option)

    monkeypatch.setattr(values, "parse_steps", counting)
    return calls


def test_step_selection_holds_what_parse_steps_reads():
    listed = StepSelection.of(" 50 , 100,50", "--window")
    assert (listed.kind, listed.listed, listed.option, listed.text) == (
        "list",
        (50, 100, 50),
        "--window",
        " 50 , 100,50",
    )
    assert listed.pick([100, 50, 7]) == [50, 100] and listed.missing([50, 7]) == [100]
    ranged = StepSelection.of("10:100:10")
    assert (ranged.kind, ranged.start, ranged.stop, ranged.every) == ("range", 10, 100, 10)
    assert ranged.pick([5, 10, 15, 20, 100, 110]) == [10, 20, 100] and ranged.missing([5]) == []
    assert StepSelection.of(":").pick([3, 1]) == [3, 1] and str(ranged) == "10:100:10"


def test_step_selection_of_passes_a_selection_and_none_through(parse_calls):
    selection = StepSelection.of("1,2")
    assert StepSelection.of(selection) is selection and StepSelection.of(None) is None
    assert parse_calls == [("1,2", "--steps")]


def test_step_selection_refusal_names_the_option():
    with pytest.raises(UsageError) as info:
        StepSelection.of("2x", "--window")
    assert str(info.value) == "--window '2x': expected a list like 50,100,200 or a range like 10:100:10"


def test_select_steps_takes_text_or_a_selection_alike(tmp_path):
    found = discover_run(build_run(tmp_path / "run", [5, 10, 100], "trl"))
    for text in ("100,5", "10:100:10", "10", ":"):
        assert select_steps(found, text) == select_steps(found, StepSelection.of(text))


def test_run_spec_parses_steps_once(parse_calls):
    from rank1tools.cli.params import RunSpec

    spec = RunSpec(run="r", steps="10:20")
    assert isinstance(spec.steps, StepSelection) and spec.steps.text == "10:20"
    assert RunSpec(steps=spec.steps).steps is spec.steps and RunSpec().steps is None
    assert len(parse_calls) == 1


def test_inspect_parses_steps_once(tmp_path, parse_calls):
    run = build_run(tmp_path / "run", [5, 10, 100], "trl")
    result = run_main("inspect", str(run), "--steps", "5:10", "--json")
    assert result.returncode == 0, result.stderr
    assert parse_calls == [("5:10", "--steps")]


def test_fit_pls_window_parsed_once_by_the_cli(tmp_path, monkeypatch, parse_calls):
    """--window is parsed by the CLI into the StepSelection the command receives, naming --window."""
    import rank1tools.commands.fit_pls as fit_pls_module

    seen = {}

    def fake_fit_pls(factors, out, *, options, force, progress):
        seen["options"] = options
        raise UsageError("stop here")

    monkeypatch.setattr(fit_pls_module, "fit_pls", fake_fit_pls)
    result = run_main("fit-pls", str(tmp_path / "factors"), "--window", "20:60", "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "stop here" in result.stderr
    window = seen["options"].window
    assert isinstance(window, StepSelection) and (window.text, window.option) == ("20:60", "--window")
    assert seen["options"].window_option == "--window"
    assert parse_calls == [("20:60", "--window")]


def test_fit_pls_options_parse_a_library_callers_text():
    from rank1tools.commands.fit_pls import FitPlsOptions

    assert FitPlsOptions(window="10,20").window == StepSelection.of("10,20")
    with pytest.raises(UsageError, match=r"^--window '1,,2': expected"):
        FitPlsOptions(window="1,,2", window_option="--window")


def test_history_options_hold_a_step_selection():
    from rank1tools.commands.extrapolate.registry import ExtrapolateOptions

    options = ExtrapolateOptions(method="relex", run="r", steps="20:60", target_steps=[100])
    assert options.steps == StepSelection.of("20:60")
    with pytest.raises(UsageError, match=r"^--steps '20::0': expected"):
        ExtrapolateOptions(method="linear", run="r", steps="20::0", target_steps=[100])


@pytest.mark.parametrize("value, expected", [("5GB", 5 * 10**9), ("2KiB", 2048), ("1", 1), (100, 100)])
def test_shard_size(value, expected):
    assert shard_size(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("5XB", "--max-shard-size '5XB': expected a size like 5GB, 500MB or a number of bytes"),
        ("0", "--max-shard-size '0': must be at least 1 byte"),
        (0, "--max-shard-size 0: must be at least 1 byte"),
        (True, "--max-shard-size True: must be at least 1 byte"),
    ],
)
def test_shard_size_refuses(value, message):
    with pytest.raises(UsageError) as info:
        shard_size(value)
    assert str(info.value) == message


def test_options_classes_hold_bytes():
    from rank1tools.commands.extrapolate.registry import ExtrapolateOptions
    from rank1tools.commands.reconstruct.plan import ReconstructOptions

    assert ReconstructOptions(max_shard_size="40KB").max_shard_size == 40_000
    assert ExtrapolateOptions(method="relex", run="r", target_steps=[1], max_shard_size="2KiB").max_shard_size == 2048
    assert ExtrapolateOptions(method="relex", run="r", target_steps=[1], max_shard_size=123).max_shard_size == 123
