"""Host memory and disk: how much is available, and a refusal before work that cannot fit.

Torch-free. A safetensors header can declare a tensor of any size (a 16 GiB tensor in a sparse
file, or simply one larger than this machine's memory); the commands estimate their peak working
set from the headers and call `check_memory` before reading anything, so such an input fails with
one line instead of an allocation failure or the OOM killer.

`RANK1_AVAILABLE_MEMORY` (bytes) replaces the measured figure: a knob for tests and for
containing a run to less than the machine has. GPU memory is not read.

The streaming commands (linearity, extrapolate relex / linear) hold a few chunks of T × chunk
elements whatever the tensor size (`streaming_peak_bytes`); the checkpoints a command writes need
their full size on disk, checked with `check_disk` before any work (a header can declare a
terabyte tensor in a sparse file: writing one copy per target would run for hours, then fail).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .errors import OutputError, ResourceError, UsageError

ENV_AVAILABLE = "RANK1_AVAILABLE_MEMORY"
MEMINFO = Path("/proc/meminfo")


def available_memory_bytes() -> int | None:
    """Bytes of host memory available to a new allocation: $RANK1_AVAILABLE_MEMORY if set, else
    Linux's MemAvailable (free memory plus reclaimable cache); None when unknown."""
    override = os.environ.get(ENV_AVAILABLE)
    if override is not None and override.strip():
        try:
            value = int(float(override))
        except ValueError:
            raise UsageError(f"{ENV_AVAILABLE}={override!r}: expected a number of bytes") from None
        if value < 0:
            raise UsageError(f"{ENV_AVAILABLE}={override!r}: expected a number of bytes")
        return value
    try:
        text = MEMINFO.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            try:
                return int(parts[1]) * (1024 if len(parts) > 2 and parts[2] == "kB" else 1)
            except (IndexError, ValueError):
                return None
    return None


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_memory(need_bytes: int, what: str) -> None:
    """Raise ResourceError "WHAT: needs about X GB of memory but Y GB are available" when the
    estimate exceeds what is available; nothing when it fits or availability is unknown."""
    avail = available_memory_bytes()
    if avail is not None and need_bytes > avail:
        raise ResourceError(f"{what}: needs about {_gb(need_bytes)} of memory but {_gb(avail)} are available")


def check_largest_tensor(
    names: Iterable[str], need: Callable[[str], int], shape: Callable[[str], Sequence[int]]
) -> None:
    """Refuse (check_memory) before any work when the tensor with the largest working set `need(name)`
    does not fit: the check every command makes, each with its own estimate of a tensor's need."""
    name = max(names, key=need)
    check_memory(need(name), f"tensor {name!r} {list(shape(name))}")


def svd_bytes(shape: tuple[int, ...], exact: bool, sketch: int) -> int:
    """Working memory of `topk_svd` on an m x n float32 matrix: the exact SVD's copy of the input,
    U, V^T and workspace, or the randomized path's few (m + n) x sketch blocks. A rescaled copy
    (matrices outside the safe range) and an exact fallback of the randomized path are rare and
    not counted."""
    m, n = shape[0], shape[1]
    r = min(m, n)
    if exact:
        return 4 * (m * n + m * r + r * n + 4 * r * r)
    return 4 * 4 * (m + n) * sketch


def decompose_peak_bytes(numel: int, raw_bytes: int, svd: int, on_cpu: bool = True, workers: int = 1) -> int:
    """Peak host bytes while `decompose` works on one tensor of N = `numel` elements, R = `raw_bytes`
    (its largest stored size among the inputs).

    One worker: the base in float32 (4 N), the update being decomposed (4 N) and the SVD's working
    memory, while the read-ahead thread forms the next update (or the next module's base): its raw
    read (R) and its float32 copy (4 N). Two workers (no read-ahead): each holds the base, the update
    and either a raw read or the SVD's working memory, counted for the largest tensor twice. On a
    GPU only the raw reads stay on the host.
    """
    if not on_cpu:
        return 2 * raw_bytes
    if workers > 1:
        return workers * (8 * numel + raw_bytes + svd)
    return 12 * numel + raw_bytes + svd


def reconstruct_peak_bytes(
    numel: int,
    raw_bytes: int,
    out_itemsize: int,
    *,
    selected: bool,
    from_factors: bool,
    svd: int,
    rest: str,
    on_cpu: bool = True,
) -> int:
    """Peak host bytes while `reconstruct` writes one tensor (N elements, R raw bytes).

    Selected: reading and subtracting holds base, checkpoint and update in float32 plus a raw
    read (12 N + R; with a factor store only the base, 4 N + R), then base and update with the
    SVD's working memory, then the base and two outputs of the output dtype (the previous rank's
    is freed as the next is made). Not selected: `--rest base` holds the raw base and its cast
    (R + out N); `--rest checkpoint` also the base in float32, the intended and stored updates
    and their difference (R + 20 N + out N). On a GPU the float32 copies of selected tensors
    live there; the host holds the raw read and the outputs.
    """
    outs = 2 * out_itemsize * numel
    if selected:
        if not on_cpu:
            return raw_bytes + outs
        if from_factors:
            return 4 * numel + max(raw_bytes, outs)
        return max(12 * numel + raw_bytes, 8 * numel + svd, 4 * numel + outs)
    if rest == "base":
        return raw_bytes + out_itemsize * numel
    return raw_bytes + 20 * numel + out_itemsize * numel


def streaming_peak_bytes(T: int, chunk: int, raw_itemsize: int, *, targets: int = 0, sample: int = 0) -> int:
    """Peak host bytes of a streaming pass over one tensor: chunks of `chunk` elements of the base
    and T checkpoints. Two raw reads of the T + 1 rows (one read ahead) and their float32 copies;
    the updates in float32 and the per-element line fits in float64 (linearity); per target the
    float64 update, its float32 copy and the stored chunk (relex, linear); a linearity `--sample`'s
    int64 indices."""
    rows = (T + 1) * chunk
    return rows * (2 * raw_itemsize + 4) + T * chunk * (4 + 4 * 8) + targets * chunk * 20 + 8 * sample


def check_disk(need_bytes: int, folder: Path, what: str) -> None:
    """Raise OutputError (exit 4) "WHAT: needs about X GB of disk but Y GB are free at FOLDER" when
    the outputs cannot fit; nothing when they fit or the free space cannot be read."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need_bytes > free:
        raise OutputError(f"{what}: needs about {_gb(need_bytes)} of disk but {_gb(free)} are free at {folder}")
