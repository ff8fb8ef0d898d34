"""Property test (issue #8): a factor-store manifest mutated at random either loads, or fails
with rank1's own one-line input error; never another exception, never a read outside the store."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rank1tools.commands.decompose import DecomposeOptions, decompose
from rank1tools.errors import Rank1Error
from rank1tools.io.factor_store import FactorStore
from rank1tools.synthetic import LlamaShape, make_base, make_run

SHAPE = LlamaShape(vocab=32, hidden=16, intermediate=40, layers=1, heads=2, kv_heads=1, tie=True)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fuzz-store")
    make_base(root / "base", SHAPE, dtype=torch.float32)
    make_run(root / "run", [1, 2], SHAPE, base_dtype=torch.float32, dtype=torch.float32)
    decompose(
        str(root / "base"),
        [],
        str(root / "store"),
        run=str(root / "run"),
        options=DecomposeOptions(rank=2, device="cpu"),
    )
    return root / "store"


JSON_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(
        ["../../../etc/passwd", "/etc/passwd", "factors/..", "factors/x\x00.safetensors", "factors/../manifest.json"]
    ),
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    """Every (path, value) in a JSON document."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _set(doc, path, value):
    if not path:
        return value
    node = doc
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    return doc


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_manifest_loads_or_fails_with_an_input_error(pristine, tmp_path_factory, data):
    store = tmp_path_factory.mktemp("m") / "store"
    shutil.copytree(pristine, store)
    doc = json.loads((pristine / "manifest.json").read_text())
    places = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path, _old = data.draw(st.sampled_from(places), label="where")
        action = data.draw(st.sampled_from(["replace", "delete", "deep"]), label="how")
        doc = copy.deepcopy(doc)
        if action == "delete" and path:
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
        elif action == "deep":  # a value nested 5000 deep, spliced in as text below
            doc = _set(doc, path, "__DEEP__")
        else:
            doc = _set(doc, path, data.draw(JSON_VALUE, label="value"))
        places = list(_paths(doc))
    text = json.dumps(doc).replace('"__DEEP__"', "[" * 5000 + "]" * 5000)
    (store / "manifest.json").write_text(text if data.draw(st.booleans(), label="json") else "[" * 100000)
    try:
        fs = FactorStore(store)
        for name in list(fs.modules):
            f = fs.load(name)
            assert f["U"].shape[0] == len(fs.steps)
            assert fs.factor_path(name).parent == (store / "factors").resolve()
    except Rank1Error as e:
        assert e.exit_code == 3 and "\n" not in str(e)
