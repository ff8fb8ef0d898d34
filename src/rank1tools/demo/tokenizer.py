"""Character-level tokenizer of the demo task, and its Hugging Face files written by hand.

One token per character: `<pad>`, `<s>`, `</s>`, `<unk>`, the ten digits, `+` and `=`. Encoding a
text prepends `<s>` (as Llama tokenizers do). The files are a `tokenizer.json` holding a BPE model
without merges (so every character is its own token), a post-processor that adds `<s>`, and a
decoder that joins characters; `transformers.AutoTokenizer` loads the folder and gives the same
ids. No `tokenizers` import is needed to write them.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL = (PAD, BOS, EOS, UNK)
CHARS = "0123456789+="
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate((*SPECIAL, *CHARS))}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL)
DIGIT_IDS = [VOCAB[d] for d in "0123456789"]
_ID_TO_TOKEN = {i: t for t, i in VOCAB.items()}
MAX_LENGTH = 32


def encode(text: str, bos: bool = True) -> list[int]:
    """Token ids of `text` (one per character), `<s>` first unless bos=False."""
    ids = [VOCAB.get(ch, UNK_ID) for ch in text]
    return [BOS_ID, *ids] if bos else ids


def decode(ids) -> str:
    """Text of token ids, special tokens dropped."""
    return "".join(t for t in (_ID_TO_TOKEN.get(int(i), UNK) for i in ids) if t not in SPECIAL)


def _added_token(token: str) -> dict:
    return {
        "id": VOCAB[token],
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def tokenizer_json() -> dict:
    bos = {"SpecialToken": {"id": BOS, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(t) for t in SPECIAL],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {BOS: {"id": BOS, "ids": [BOS_ID], "tokens": [BOS]}},
        },
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(VOCAB),
            "merges": [],
        },
    }


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_LENGTH,
        "padding_side": "left",
        "added_tokens_decoder": {
            str(VOCAB[t]): {k: v for k, v in _added_token(t).items() if k != "id"} for t in SPECIAL
        },
    }


def write_tokenizer(folder: Path) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": tokenizer_config(),
        "special_tokens_map.json": {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK},
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
