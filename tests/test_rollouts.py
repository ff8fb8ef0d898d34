"""io/rollouts.py: the rollouts JSONL reader and its one-line errors (docs/concepts.md)."""

from __future__ import annotations

import json

import pytest

from rank1tools.errors import InputError
from rank1tools.io.rollouts import ENV_MAX_BYTES, read_rollouts


def _write(tmp_path, text: str | bytes):
    p = tmp_path / "rollouts.jsonl"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_reads_prompts_chats_ids_and_extra_fields(tmp_path):
    lines = [
        json.dumps({"id": "a", "prompt": "2+3=", "completion": "5"}),
        "",
        json.dumps(
            {
                "messages": [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1"}],
                "completion": "2",
                "checkpoint": "step-10",
            }
        ),
        json.dumps({"id": 7, "prompt": "", "completion": " x"}),
    ]
    rs = read_rollouts(_write(tmp_path, "\n".join(lines) + "\n"))
    assert [r.line for r in rs] == [1, 3, 4]
    assert rs[0].prompt == "2+3=" and rs[0].messages is None and rs[0].id == "a" and rs[0].chat() is None
    assert rs[1].prompt is None and rs[1].id is None
    assert rs[1].chat() == [{"role": "system", "content": "add"}, {"role": "user", "content": "1+1"}]
    assert rs[1].extra == {"checkpoint": "step-10"}
    assert rs[2].id == 7 and rs[2].prompt == "" and rs[2].completion == " x"


def test_crlf_and_bom_are_read(tmp_path):
    text = '\ufeff{"prompt": "a", "completion": "b"}\r\n{"prompt": "c", "completion": "d"}\r\n'
    rs = read_rollouts(_write(tmp_path, text.encode("utf-8")))
    assert [(r.prompt, r.completion) for r in rs] == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "a", "completion": ', "line 2: unreadable JSON"),
        ('["a", "b"]', "line 2: expected a JSON object, found list"),
        ('{"prompt": "a", "prompt": "b", "completion": "c"}', "line 2: key 'prompt' appears twice"),
        ('{"completion": "c"}', "line 2: expected exactly one of `prompt` and `messages`, found neither"),
        (
            '{"prompt": "a", "messages": [{"role": "user", "content": "a"}], "completion": "c"}',
            "line 2: expected exactly one of `prompt` and `messages`, found both",
        ),
        ('{"prompt": 3, "completion": "c"}', "line 2: `prompt` must be a string, found int"),
        ('{"prompt": "a"}', "line 2: missing `completion`"),
        ('{"prompt": "a", "completion": null}', "line 2: `completion` must be a string, found NoneType"),
        ('{"prompt": "a", "completion": ""}', "line 2: empty `completion`"),
        ('{"prompt": "a", "completion": "b", "id": true}', "line 2: `id` must be a string or an integer"),
        ('{"prompt": "a", "completion": "b", "id": 1.5}', "line 2: `id` must be a string or an integer"),
        ('{"messages": [], "completion": "c"}', "line 2: `messages` must be a non-empty list"),
        ('{"messages": "hi", "completion": "c"}', "line 2: `messages` must be a non-empty list"),
        ('{"messages": ["hi"], "completion": "c"}', "line 2: messages[0] is str"),
        ('{"messages": [{"content": "x"}], "completion": "c"}', "line 2: messages[0].role must be"),
        ('{"messages": [{"role": "user", "content": 1}], "completion": "c"}', "line 2: messages[0].content must be"),
        ('{"prompt": "a", "completion": "b", "id": "x"}', "line 2: id 'x' already used on line 1"),
        ("[" * 100000 + "]" * 100000, "line 2: unreadable JSON"),
    ],
)
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, line, message):
    p = _write(tmp_path, '{"prompt": "a", "completion": "b", "id": "x"}\n' + line + "\n")
    with pytest.raises(InputError) as e:
        read_rollouts(p)
    text = str(e.value)
    assert e.value.exit_code == 3
    assert text.startswith(f"{p}: ") and message in text and "\n" not in text


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "no rollouts"),
        (b"\n  \n", "no rollouts"),
        (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff"}\n', "line 2: not UTF-8 text"),
        (b'{"prompt": "a\x00", "completion": "b"}\n', "binary"),
    ],
)
def test_bad_files_are_refused(tmp_path, data, message):
    p = _write(tmp_path, data)
    with pytest.raises(InputError, match=message):
        read_rollouts(p)


def test_missing_file_and_size_limit(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="cannot read rollouts file"):
        read_rollouts(tmp_path / "nope.jsonl")
    p = _write(tmp_path, '{"prompt": "a", "completion": "b"}\n')
    monkeypatch.setenv(ENV_MAX_BYTES, "10")
    with pytest.raises(InputError, match=f"above the limit of 10 .*{ENV_MAX_BYTES}"):
        read_rollouts(p)
    monkeypatch.setenv(ENV_MAX_BYTES, "ten")
    with pytest.raises(InputError, match=ENV_MAX_BYTES):
        read_rollouts(p)
