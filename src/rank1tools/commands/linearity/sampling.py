"""`rank1 linearity --sample`: which elements of a tensor its per-element R² figures use."""

from __future__ import annotations

import numpy as np

from ...modules import stable_hash

SAMPLE_BLOCK = 1 << 20  # sampling splits a tensor into blocks of this many elements (see sample_indices)


def sample_indices(numel: int, n: int | None, seed: int, name: str) -> np.ndarray | None:
    """Sorted indices of a uniform random subset of n of the tensor's numel elements (None: n is
    None or at least numel, so every element counts). Deterministic for (seed, name): the
    generator is seeded with both, so each tensor gets its own sample. Memory O(n): the blocks of
    SAMPLE_BLOCK elements get their counts from one multivariate hypergeometric draw (the counts
    a uniform n-subset has), then a uniform subset within each block."""
    if n is None or n >= numel:
        return None
    rng = np.random.default_rng([seed, stable_hash(name)])
    blocks = -(-numel // SAMPLE_BLOCK)
    sizes = np.full(blocks, SAMPLE_BLOCK, dtype=np.int64)
    sizes[-1] = numel - SAMPLE_BLOCK * (blocks - 1)
    counts = rng.multivariate_hypergeometric(sizes, n) if blocks > 1 else np.array([n])
    parts = [
        b * SAMPLE_BLOCK + np.sort(rng.choice(int(sizes[b]), int(k), replace=False)) for b, k in enumerate(counts) if k
    ]
    return np.concatenate(parts).astype(np.int64)
