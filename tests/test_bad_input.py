"""Bad input: every case fails with one `rank1: error:` line, exit code 3, empty stdout, nothing written.

The main cases run as real `rank1 inspect` processes (rank1tools.cli.main), one per core at a time.
Every case (and a few more) is also checked in-process against `open_source`, which is cheap.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import pytest

from rank1tools.errors import InputError
from rank1tools.io import check_compatible, open_checkpoint, open_source

from _support import copy_model, reference_tensors, run_cli_many, tree_snapshot

# Each builder makes its case inside `root` and returns (path to pass, regexes the message must match).


def case_missing_path(root, models):
    return root / "does-not-exist", [r"does-not-exist: no such file or directory"]


def case_no_weights(root, models):
    folder = root / "model"
    folder.mkdir()
    for f in ("config.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(models("fp32").path / f, folder / f)
    return folder, [r"no safetensors weights", r"model\.safetensors"]


def case_index_names_missing_shard(root, models):
    folder = copy_model(models("bf16", False, True), root / "model")
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    victim = shards[len(shards) // 2]
    victim.unlink()
    return folder, [rf"names shard '{victim.name}', which does not exist", r"model\.safetensors\.index\.json"]


def case_index_names_path_outside(root, models):
    folder = copy_model(models("bf16", False, True), root / "model")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(folder.glob("model-*-of-*.safetensors"))[0]
    # the shard really exists, just outside the model folder: refused for where it is, not for being absent
    first.rename(root / "x.safetensors")
    index["weight_map"] = {k: ("../x.safetensors" if v == first.name else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder, [r"shard '\.\./x\.safetensors' is not a file inside"]


def case_truncated(root, models):
    folder = copy_model(models("fp32", True, False), root / "model")
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    return folder, [r"model\.safetensors", r"truncated"]


def case_corrupt_header(root, models):
    folder = copy_model(models("fp32", False, False), root / "model")
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff\xfe#garbage!\x00"
    f.write_bytes(bytes(data))
    return folder, [r"model\.safetensors", r"corrupt safetensors header"]


def case_invalid_config(root, models):
    folder = copy_model(models("bf16", True, False), root / "model")
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    return folder, [r"config\.json", r"unreadable config\.json"]


def case_pickle_only(root, models):
    folder = root / "model"
    folder.mkdir()
    shutil.copy(models("fp32").path / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x80\x02}q\x00" * 50)  # never a real pickle
    return folder, [r"pytorch_model\.bin", r"pickle", r"never unpickles"]


CLI_CASES = {
    "missing_path": case_missing_path,
    "no_weights": case_no_weights,
    "index_missing_shard": case_index_names_missing_shard,
    "index_path_outside": case_index_names_path_outside,
    "truncated": case_truncated,
    "corrupt_header": case_corrupt_header,
    "invalid_config": case_invalid_config,
    "pickle_only": case_pickle_only,
}


def case_pickle_file_named(root, models):
    folder, _ = case_pickle_only(root, models)
    return folder / "pytorch_model.bin", [r"pickle"]


def case_header_length_garbage(root, models):
    folder = copy_model(models("fp32", False, False), root / "model")
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[0:8] = struct.pack("<Q", 2**40)
    f.write_bytes(bytes(data))
    return folder, [r"truncated or not a safetensors file"]


def case_tiny_file(root, models):
    folder = root / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"abc")
    return folder, [r"not a safetensors file \(only 3 bytes\)"]


def case_shard_truncated(root, models):
    folder = copy_model(models("bf16", True, True), root / "model")
    last = sorted(folder.glob("model-*-of-*.safetensors"))[-1]
    last.write_bytes(last.read_bytes()[:-2])
    return folder, [re.escape(last.name), r"truncated"]


def case_index_invalid_json(root, models):
    folder = copy_model(models("fp32", False, True), root / "model")
    (folder / "model.safetensors.index.json").write_text("{not json")
    return folder, [r"unreadable index"]


def case_index_without_weight_map(root, models):
    folder = copy_model(models("fp32", False, True), root / "model")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    return folder, [r"unreadable index"]


def case_index_maps_to_wrong_shard(root, models):
    folder = copy_model(models("fp32", False, True), root / "model")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(k for k, v in index["weight_map"].items() if v == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    return folder, [rf"maps tensor '{re.escape(name)}' to '{shards[1]}', which does not hold it"]


def case_index_absolute_path(root, models):
    folder = copy_model(models("fp32", False, True), root / "model")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (str(folder / first) if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder, [r"is not a file inside"]


def case_several_files_no_index(root, models):
    folder = copy_model(models("fp32", False, True), root / "model")
    (folder / "model.safetensors.index.json").unlink()
    return folder, [r"\.safetensors files but no model\.safetensors\.index\.json"]


def case_not_safetensors_file(root, models):
    f = root / "weights.npz"
    f.write_bytes(b"\x93NUMPY")
    return f, [r"not a \.safetensors file"]


def case_config_not_object(root, models):
    folder = copy_model(models("fp32", False, False), root / "model")
    (folder / "config.json").write_text("[1, 2, 3]")
    return folder, [r"config\.json is not a JSON object"]


def case_overlapping_offsets(root, models):
    folder = root / "model"
    folder.mkdir()
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    return folder, [r"overlap or leave a hole"]


def case_unsupported_dtype(root, models):
    folder = root / "model"
    folder.mkdir()
    raw = json.dumps({"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(8))
    return folder, [r"unsupported dtype C64"]


API_ONLY_CASES = {
    "pickle_file_named": case_pickle_file_named,
    "header_length_garbage": case_header_length_garbage,
    "tiny_file": case_tiny_file,
    "shard_truncated": case_shard_truncated,
    "index_invalid_json": case_index_invalid_json,
    "index_without_weight_map": case_index_without_weight_map,
    "index_maps_to_wrong_shard": case_index_maps_to_wrong_shard,
    "index_absolute_path": case_index_absolute_path,
    "several_files_no_index": case_several_files_no_index,
    "not_safetensors_file": case_not_safetensors_file,
    "config_not_object": case_config_not_object,
    "overlapping_offsets": case_overlapping_offsets,
    "unsupported_dtype": case_unsupported_dtype,
}


@pytest.mark.parametrize("case", sorted({**CLI_CASES, **API_ONLY_CASES}))
def test_open_source_refuses(tmp_path, models, case):
    builder = {**CLI_CASES, **API_ONLY_CASES}[case]
    path, patterns = builder(tmp_path, models)
    before = tree_snapshot(tmp_path)
    with pytest.raises(InputError) as info:
        open_source(str(path))
    msg = str(info.value)
    assert info.value.exit_code == 3
    assert "\n" not in msg
    for pat in patterns:
        assert re.search(pat, msg), f"{pat!r} not in {msg!r}"
    assert tree_snapshot(tmp_path) == before


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, models):
    """Build every CLI case, run the `rank1 inspect` processes (as many at once as there are cores)."""
    cases = {}
    for name, builder in CLI_CASES.items():
        root = tmp_path_factory.mktemp(name)
        path, patterns = builder(root, models)
        cwd = root / "cwd"
        cwd.mkdir()
        cases[name] = (["inspect", path], cwd, root, patterns, tree_snapshot(root))
    results = run_cli_many({name: (args, cwd) for name, (args, cwd, *_) in cases.items()})
    return {
        name: (results[name], patterns, before, tree_snapshot(root))
        for name, (_, _, root, patterns, before) in cases.items()
    }


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_inspect_refuses(cli_results, case):
    result, patterns, before, after = cli_results[case]
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rank1: error: ")
    for pat in patterns:
        assert re.search(pat, lines[0]), f"{pat!r} not in {lines[0]!r}"
    assert after == before  # nothing written: not in the input, not in the working directory


def test_base_checkpoint_shape_mismatch(tmp_path, models):
    """No command compares two models yet: the check itself is an InputError (exit code 3)."""
    base = open_checkpoint(models("fp32", False, False).path)
    other = copy_model(models("fp32", False, False), tmp_path / "other")
    # rebuild `other` with one narrower tensor, through safetensors' own saver
    from safetensors.torch import save_file

    tensors = {n: r.tensor for n, r in reference_tensors(other).items()}
    tensors["model.layers.1.self_attn.o_proj.weight"] = tensors["model.layers.1.self_attn.o_proj.weight"][
        :, :32
    ].contiguous()
    save_file(tensors, str(other / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError) as info:
        check_compatible(base, open_checkpoint(other))
    assert info.value.exit_code == 3
    msg = str(info.value)
    assert "model.layers.1.self_attn.o_proj.weight" in msg and "[64, 32]" in msg and "[64, 64]" in msg


@pytest.mark.parametrize(
    "header",
    [b"[]", b'{"a": 5}', b'{"a": {"dtype": "F32", "shape": "xy", "data_offsets": [0, 4]}}'],
    ids=["list-header", "tensor-not-object", "string-shape"],
)
def test_structurally_invalid_json_header_is_input_error(tmp_path, header):
    f = tmp_path / "model.safetensors"
    header += b" " * (-len(header) % 8)
    f.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(InputError, match="corrupt"):
        open_checkpoint(f)


def test_index_with_non_string_shard_is_input_error(tmp_path, models):
    src = models("fp32", False, True).path
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": ["x"]}}))
    with pytest.raises(InputError, match="weight_map values must be file names"):
        open_checkpoint(dst)
