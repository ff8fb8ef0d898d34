"""Fixtures: tiny Llama-shaped Hugging Face checkpoints and training runs built with
`rank1tools.synthetic` (which saves through safetensors / huggingface_hub, not our writer).

Models are built once per session into a temporary directory and must be treated as read-only;
a test that damages or edits a model copies it first (`copy_model`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # for `_support`, whatever pytest's import mode

from _support import DTYPES, ModelFixture, build_model  # noqa: E402


class _ModelCache:
    def __init__(self, factory: pytest.TempPathFactory):
        self._factory = factory
        self._built: dict[tuple, ModelFixture] = {}

    def __call__(self, dtype: str = "fp32", tie: bool = False, sharded: bool = False) -> ModelFixture:
        key = (dtype, tie, sharded)
        if key not in self._built:
            name = f"{dtype}-{'tied' if tie else 'untied'}-{'sharded' if sharded else 'single'}"
            self._built[key] = build_model(
                self._factory.mktemp(name) / "model", dtype=DTYPES[dtype], tie=tie, sharded=sharded
            )
        return self._built[key]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> _ModelCache:
    """models(dtype='fp32'|'bf16', tie=bool, sharded=bool) -> a read-only ModelFixture, built once."""
    return _ModelCache(tmp_path_factory)


ALL_MODEL_KINDS = [
    pytest.param(
        (dtype, tie, sharded), id=f"{dtype}-{'tied' if tie else 'untied'}-{'sharded' if sharded else 'single'}"
    )
    for dtype in ("fp32", "bf16")
    for tie in (False, True)
    for sharded in (False, True)
]


@pytest.fixture(params=ALL_MODEL_KINDS)
def model(request, models) -> ModelFixture:
    """Every fixture kind: fp32/bf16 x untied/tied x single file/sharded."""
    dtype, tie, sharded = request.param
    return models(dtype, tie, sharded)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance for one test module (tests/_ray_support.local_ray); skips without Ray."""
    ray = pytest.importorskip("ray")
    from _ray_support import local_ray

    with local_ray(ray) as r:
        yield r


def pytest_collection_modifyitems(items):
    """Tests on a local Ray instance are `ray` tests wherever they live (`make test-fast` skips
    them by marker), also when their file forgot the mark."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)
