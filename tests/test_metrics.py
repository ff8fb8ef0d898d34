"""Metrics files for fit-pls (rank1tools.io.metrics): CSV, TSV, JSON Lines, JSON object / list,
TRL trainer_state.json; metric choice; align(); one-line InputErrors (exit 3) for bad files."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rank1tools.errors import InputError, UsageError
from rank1tools.io.metrics import Metrics, align, read_metrics


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def refuse(path: Path, pattern: str, code: int = 3, **kw) -> str:
    """One line naming the file; exit 3 for a bad file, 2 for a name the command line gives that the
    file lacks (--metric, --step-column) or a choice it must make (docs/cli.md, exit codes)."""
    with pytest.raises((InputError, UsageError)) as info:
        read_metrics(path, **kw)
    msg = str(info.value)
    assert info.value.exit_code == code
    assert "\n" not in msg and msg.startswith(str(path) + ": "), msg
    assert re.search(pattern, msg), msg
    return msg


def trainer_state(steps: int = 6, eval_every: int = 2) -> dict:
    """A TRL GRPOTrainer-style trainer_state.json: a train entry every step, eval entries at some steps,
    and the final summary entry, as transformers writes them."""
    log = []
    for step in range(1, steps + 1):
        log.append(
            {
                "completion_length": 180.5 + step,
                "epoch": round(step / steps, 4),
                "grad_norm": 0.41 + step / 100,
                "kl": 0.0005 * step,
                "learning_rate": 1e-06 * (1 - step / steps),
                "loss": 0.0001 * step,
                "reward": 0.3 + 0.05 * step,
                "reward_std": 0.25,
                "rewards/accuracy_reward/mean": 0.25 + 0.05 * step,
                "rewards/accuracy_reward/std": 0.43,
                "step": step,
            }
        )
        if step % eval_every == 0:
            log.append(
                {
                    "epoch": round(step / steps, 4),
                    "eval_accuracy": 0.4 + step / 100,
                    "eval_loss": 0.5,
                    "eval_runtime": 12.3,
                    "eval_samples_per_second": 40.1,
                    "eval_steps_per_second": 5.0,
                    "step": step,
                }
            )
    log.append(
        {
            "epoch": 1.0,
            "step": steps,
            "total_flos": 0.0,
            "train_loss": 0.0003,
            "train_runtime": 812.4,
            "train_samples_per_second": 1.97,
            "train_steps_per_second": 0.007,
        }
    )
    return {
        "best_metric": None,
        "epoch": 1.0,
        "eval_steps": eval_every,
        "global_step": steps,
        "is_hyper_param_search": False,
        "log_history": log,
        "logging_steps": 1,
        "max_steps": steps,
        "num_train_epochs": 1,
        "save_steps": 2,
        "total_flos": 0.0,
        "train_batch_size": 8,
        "trial_name": None,
    }


# --- formats ----------------------------------------------------------------------------------------


def test_importable_without_torch():
    code = "import rank1tools.io.metrics, sys; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_csv(tmp_path):
    p = write(tmp_path, "m.csv", "step,accuracy,loss\n100,0.25,1.5\n50,0.125,2.0\n200,0.5,1.0\n")
    m = read_metrics(p, metric="accuracy")
    assert isinstance(m, Metrics)
    assert m.values == {50: 0.125, 100: 0.25, 200: 0.5} and list(m.values) == [50, 100, 200]
    assert m.available == ["accuracy", "loss"] and m.metric == "accuracy" and m.step_column == "step"
    assert m.sha256 == hashlib.sha256(p.read_bytes()).hexdigest() and m.path == str(p) and m.format == "csv"
    assert read_metrics(p, metric="loss").values == {50: 2.0, 100: 1.5, 200: 1.0}


def test_tsv_and_csv_details(tmp_path):
    p = write(tmp_path, "m.tsv", "global_step\tname\treward\n10\trun-a\t0.5\n20\trun-a\t 0.75 \n30.0\trun-a\t1e-1\n")
    m = read_metrics(p)  # `name` has no numbers: not a metric, so `reward` is the only one
    assert (m.metric, m.step_column, m.format, m.available) == ("reward", "global_step", "tsv", ["reward"])
    assert m.values == {10: 0.5, 20: 0.75, 30: 0.1}
    # BOM, CRLF, blank lines, quoted header; tabs in a .csv are detected from the header
    p2 = tmp_path / "bom.csv"
    p2.write_bytes(b'\xef\xbb\xbf"Step","acc"\r\n\r\n1,0.5\r\n2,0.625\r\n')
    assert read_metrics(p2).values == {1: 0.5, 2: 0.625}
    assert read_metrics(write(tmp_path, "t.csv", "step\tacc\n3\t0.5\n")).values == {3: 0.5}


def test_empty_cells_are_missing(tmp_path):
    p = write(tmp_path, "m.csv", "step,acc,loss\n10,0.5,1\n20,,1\n30,0.75,\n40,,2\n40,0.875,2\n")
    m = read_metrics(p, metric="acc")
    assert m.values == {10: 0.5, 30: 0.75, 40: 0.875} and m.missing_steps == [20]


def test_jsonl(tmp_path):
    rows = [
        {"_step": 0, "_runtime": 1.5, "_timestamp": 1.7e9, "train/reward": 0.1, "eval/acc": None},
        {"_step": 1, "_runtime": 3.0, "_timestamp": 1.7e9 + 2, "train/reward": 0.2},
        {
            "_step": 2,
            "_runtime": 4.5,
            "_timestamp": 1.7e9 + 4,
            "train/reward": 0.3,
            "eval/acc": 0.55,
            "_wandb": {"runtime": 4},
        },
    ]
    p = write(tmp_path, "history.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    m = read_metrics(p, metric="train/reward")
    assert m.values == {0: 0.1, 1: 0.2, 2: 0.3} and m.step_column == "_step" and m.format == "jsonl"
    assert m.available == ["_runtime", "_timestamp", "train/reward", "eval/acc"]
    acc = read_metrics(p, metric="eval/acc")
    assert acc.values == {2: 0.55} and acc.missing_steps == [0]  # step 1 did not log it: not missing
    refuse(p, r"several metrics \(train/reward, eval/acc\); choose one with --metric$", code=2)
    assert read_metrics(p, metric="_runtime").values == {0: 1.5, 1: 3.0, 2: 4.5}  # bookkeeping, if asked


def test_json_object(tmp_path):
    p = write(tmp_path, "acc.json", json.dumps({"200": 0.61, "50": 0.42, "100": 0.5, "150": None}))
    m = read_metrics(p)
    assert (m.metric, m.available, m.format) == ("value", ["value"], "json")
    assert m.values == {50: 0.42, 100: 0.5, 200: 0.61} and list(m.values) == [50, 100, 200]
    assert m.missing_steps == [150]


def test_json_list(tmp_path):
    p = write(
        tmp_path,
        "acc.json",
        json.dumps([{"step": 20, "value": 0.3}, {"step": 10, "value": 0.25}, {"step": 30.0, "value": 1}]),
    )
    m = read_metrics(p)
    assert m.metric == "value" and m.values == {10: 0.25, 20: 0.3, 30: 1.0}
    rows = write(
        tmp_path, "rows.json", json.dumps([{"step": 1, "acc": 0.5, "len": 100}, {"step": 2, "acc": 0.6, "len": 90}])
    )
    assert read_metrics(rows, metric="len").values == {1: 100.0, 2: 90.0}


def test_trainer_state(tmp_path):
    p = write(tmp_path, "trainer_state.json", json.dumps(trainer_state(), indent=2))
    m = read_metrics(p, metric="rewards/accuracy_reward/mean")
    assert m.format == "trainer_state" and m.step_column == "step"
    assert m.values == {s: 0.25 + 0.05 * s for s in range(1, 7)}
    ev = read_metrics(p, metric="eval_accuracy")
    assert ev.values == {s: 0.4 + s / 100 for s in (2, 4, 6)} and ev.missing_steps == []
    assert read_metrics(p, metric="learning_rate").values[6] == 0.0
    assert read_metrics(p, metric="loss").values == {s: 0.0001 * s for s in range(1, 7)}
    assert read_metrics(p, metric="train_loss").values == {6: 0.0003}
    for name in (
        "rewards/accuracy_reward/mean",
        "eval_accuracy",
        "loss",
        "learning_rate",
        "epoch",
        "reward",
        "eval_runtime",
        "train_runtime",
    ):
        assert name in m.available
    assert "step" not in m.available
    msg = refuse(p, r"several metrics \(.*\); choose one with --metric$", code=2)
    assert "eval_accuracy" in msg and "rewards/accuracy_reward/mean" in msg
    for bookkeeping in ("epoch", "eval_runtime", "eval_samples_per_second", "train_runtime", "total_flos"):
        assert bookkeeping + "," not in msg and bookkeeping + ")" not in msg


def test_trainer_state_duplicates(tmp_path):
    state = trainer_state()
    state["log_history"].insert(3, dict(state["log_history"][0]))  # identical repeat: accepted
    p = write(tmp_path, "trainer_state.json", json.dumps(state))
    assert read_metrics(p, metric="loss").values[1] == 0.0001
    state["log_history"].insert(3, {"step": 4, "eval_accuracy": 0.9})
    p = write(tmp_path, "trainer_state.json", json.dumps(state))
    refuse(
        p,
        r"log_history\[\d+\]: step 4 has eval_accuracy 0\.\d+, but log_history\[3\] gave 0\.9$",
        metric="eval_accuracy",
    )


def test_single_metric_default_ignores_bookkeeping(tmp_path):
    p = write(tmp_path, "m.csv", "Step,epoch,_timestamp,wall_time,accuracy\n1,0.1,17,2,0.5\n2,0.2,18,3,0.6\n")
    m = read_metrics(p)
    assert m.metric == "accuracy" and m.available == ["epoch", "_timestamp", "wall_time", "accuracy"]


def test_step_column_option(tmp_path):
    p = write(tmp_path, "m.csv", "iteration,step_time,acc\n5,0.3,0.5\n10,0.3,0.7\n")
    refuse(
        p,
        r"no step column \(step / global_step / Step / _step; choose one with --step-column\); "
        r"columns: iteration, step_time, acc$",
    )
    m = read_metrics(p, metric="acc", step_column="iteration")
    assert m.values == {5: 0.5, 10: 0.7} and m.step_column == "iteration"
    refuse(p, r"no step column 'iter' \(columns: iteration, step_time, acc\)$", code=2, step_column="iter")


def test_align(tmp_path):
    p = write(tmp_path, "m.csv", "step,acc\n0,0.1\n50,0.2\n100,0.3\n150,0.4\n")
    m = read_metrics(p)
    assert align(m, [200, 100, 50, 25, 100]) == ([50, 100], [25, 200], [0, 150])
    assert align(m, []) == ([], [], [0, 50, 100, 150])


# --- refusals ---------------------------------------------------------------------------------------


def test_missing_and_unreadable(tmp_path):
    refuse(tmp_path / "nope.csv", r"cannot read metrics file \(No such file or directory\)$")
    refuse(tmp_path, r"metrics file is a directory, not a regular file$")
    bad = tmp_path / "latin.csv"
    bad.write_bytes(b"step,acc\n1,0.5\xe9\n")
    refuse(bad, r"not UTF-8 text")


@pytest.mark.parametrize("name, text", [("e.csv", ""), ("e.jsonl", "\n \n"), ("e.json", "  "), ("e.tsv", "\n")])
def test_empty_file(tmp_path, name, text):
    refuse(write(tmp_path, name, text), r"empty metrics file$")


@pytest.mark.parametrize(
    "name, text", [("h.csv", "step,acc\n"), ("l.json", "[]"), ("o.json", "{}"), ("t.json", '{"log_history": []}')]
)
def test_no_rows(tmp_path, name, text):
    refuse(write(tmp_path, name, text), r"no rows in the metrics file$")


def test_no_step_column(tmp_path):
    refuse(
        write(tmp_path, "m.csv", "iter,acc,loss\n1,0.5,1\n"),
        r"no step column \(step / global_step / Step / _step; .*\); columns: iter, acc, loss$",
    )
    refuse(
        write(tmp_path, "m.jsonl", '{"iter": 1, "acc": 0.5}\n{"iter": 2, "acc": 0.6, "x": 1}\n'),
        r"no step column .*columns: iter, acc, x$",
    )


@pytest.mark.parametrize(
    "cell, problem",
    [
        ("abc", r"value 'abc' is not a number"),
        ("nan", r"value 'nan' is not finite"),
        ("-inf", r"is not finite"),
        ("1e999", r"'1e999' is not finite"),
        ("٠.5", r"is not a number"),
        ("1_0", r"is not a number"),
        ("0x1", r"is not a number"),
    ],
)
def test_non_numeric_value(tmp_path, cell, problem):
    p = write(tmp_path, "m.csv", f"step,acc\n1,0.5\n2,{cell}\n3,0.7\n")
    refuse(p, r": line 3: .*" + problem + "$", metric="acc")


def test_non_numeric_value_json(tmp_path):
    refuse(
        write(tmp_path, "m.jsonl", '{"step": 1, "acc": 0.5}\n\n{"step": 2, "acc": "0.6"}\n'),
        r": line 3: value '0\.6' is not a number$",
    )
    refuse(
        write(tmp_path, "m.json", '[{"step": 1, "acc": 0.5}, {"step": 2, "acc": NaN}]'),
        r": \[1\]: value nan is not finite$",
    )
    refuse(write(tmp_path, "o.json", '{"1": 0.5, "2": true}'), r": key '2': value True is not a number$")
    refuse(write(tmp_path, "b.json", '{"1": 0.5, "2": 1' + "0" * 400 + "}"), r": key '2': value .* is too large$")


@pytest.mark.parametrize(
    "step, problem",
    [
        ("-5", r"step '-5' is negative"),
        ("1.5", r"step '1\.5' is not"),
        ("", r"step is empty"),
        ("x", r"step 'x' is not"),
        ("٣", r"step '٣' is not"),
        ("1e3", r"step '1e3' is not"),
        ("9" * 20, r"is not a non-negative integer"),
    ],
)
def test_bad_step(tmp_path, step, problem):
    refuse(write(tmp_path, "m.csv", f"step,acc\n1,0.5\n{step},0.6\n"), r": line 3: .*" + problem)


def test_bad_step_json(tmp_path):
    refuse(write(tmp_path, "m.json", '[{"step": -1, "value": 0.5}]'), r": \[0\]: step -1 is negative$")
    refuse(write(tmp_path, "m.json", '[{"step": 2.5, "value": 0.5}]'), r": \[0\]: step 2\.5 is not an integer$")
    refuse(write(tmp_path, "m.json", '[{"step": true, "value": 0.5}]'), r": \[0\]: step True is not")
    refuse(write(tmp_path, "m.json", '[{"step": null, "value": 0.5}]'), r": \[0\]: step None is not")
    refuse(
        write(tmp_path, "m.json", '[{"value": 0.5, "step": 1}, {"value": 0.5}]'), r": \[1\]: 'value' without 'step'$"
    )
    refuse(write(tmp_path, "o.json", '{"10": 0.5, "ten": 0.6}'), r": key 'ten': step 'ten' is not")


def test_duplicate_steps(tmp_path):
    p = write(tmp_path, "m.csv", "step,acc\n10,0.5\n20,0.6\n10,0.5\n")
    assert read_metrics(p).values == {10: 0.5, 20: 0.6}  # identical repeat
    p = write(tmp_path, "m.csv", "step,acc\n10,0.5\n20,0.6\n10.0,0.55\n")
    refuse(p, r": line 4: step 10 has acc 0\.55, but line 2 gave 0\.5$")
    p = write(tmp_path, "m.json", '[{"step": 3, "value": 1}, {"step": 3, "value": 2}]')
    refuse(p, r": \[1\]: step 3 has value 2\.0, but \[0\] gave 1\.0$")


def test_unknown_metric(tmp_path):
    p = write(tmp_path, "m.csv", "step,acc,loss,note\n1,0.5,1.0,ok\n")
    refuse(p, r"no metric 'reward' \(available: acc, loss\)$", code=2, metric="reward")  # not in the file
    refuse(p, r"no metric 'note' \(available: acc, loss\)$", metric="note")  # a column, without numbers
    refuse(p, r"no metric 'step' \(available: acc, loss\)$", metric="step")


def test_several_metrics_without_choice(tmp_path):
    p = write(tmp_path, "m.csv", "step,epoch,a,b,c\n1,0.1,1,2,3\n")
    refuse(p, r": several metrics \(a, b, c\); choose one with --metric$", code=2)
    refuse(
        write(tmp_path, "n.csv", "step,epoch,note\n1,0.5,x\n"), r": no metric column \(columns: step, epoch, note\)$"
    )


def test_all_values_missing(tmp_path):
    refuse(
        write(tmp_path, "m.csv", "step,acc,loss\n1,,1\n2,,1\n"), r"no metric 'acc' \(available: loss\)$", metric="acc"
    )
    refuse(
        write(tmp_path, "m.json", '{"1": null, "2": 0.5}'.replace("0.5", "null")),
        r"no metric column \(columns: step, value\)$",
    )


@pytest.mark.parametrize("name", ["deep.json", "deep.jsonl", "deep"])
def test_deeply_nested_json(tmp_path, name):
    text = "[" * 100_000 + "]" * 100_000 if name != "deep.jsonl" else '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    refuse(write(tmp_path, name, text), r"unreadable (metrics file|JSON) \(.*nested too deeply\)$")


def test_malformed_files(tmp_path):
    refuse(write(tmp_path, "m.json", '{"log_history": {"step": 1}}'), r": log_history is not a list$")
    refuse(
        write(tmp_path, "m.json", '{"log_history": [1, 2]}'), r": log_history\[0\]: expected a JSON object, found int$"
    )
    refuse(write(tmp_path, "m.json", '"0.5"'), r": expected a JSON object \{step: value\}, .*; found str$")
    refuse(write(tmp_path, "m.json", '{"step": 1,'), r": unreadable metrics file \(")
    refuse(write(tmp_path, "m.jsonl", '{"step": 1, "a": 1}\n[1]\n'), r": line 2: expected a JSON object, found list$")
    refuse(write(tmp_path, "m.jsonl", '{"step": 1, "a": 1}\n{"step": 2,\n'), r": line 2: unreadable JSON \(")
    refuse(write(tmp_path, "m.csv", "step,acc\n1,0.5\n2,0.6,7\n"), r": line 3: 3 cells, but the header has 2 columns$")
    refuse(
        write(tmp_path, "m.csv", "step,acc,acc\n1,0.5,0.5\n"), r": line 1: column 'acc' appears twice in the header$"
    )
    refuse(write(tmp_path, "m.csv", 'step,acc\n1,"0.5\n'), r": line \d+: unreadable CSV \(")


def test_detection_without_extension(tmp_path):
    assert read_metrics(write(tmp_path, "a", '{"5": 0.5}')).values == {5: 0.5}
    assert read_metrics(write(tmp_path, "b", '{"step": 5, "r": 0.5}\n{"step": 6, "r": 0.6}\n')).format == "jsonl"
    assert read_metrics(write(tmp_path, "c.txt", "step\tr\n5\t0.5\n")).format == "tsv"
