"""Opening a Hub source: `open_hub_checkpoint("hf://ORG/NAME[@REVISION][/SUBFOLDER]")`.

* The revision (branch, tag, or sha; default: the repo's default branch) is resolved to its commit
  sha once, when the source is opened; every later request names that sha, and `Checkpoint.revision`
  (recorded in provenance) is the sha.
* Tensors are listed from the safetensors headers only, fetched with HTTP range requests of the
  first bytes of each weight file (as huggingface_hub's `parse_safetensors_file_metadata`) and
  checked like a local header: no tensor data is downloaded to list a model.
* `HF_HUB_OFFLINE=1`: revisions resolve from the cache's refs, listings and reads come from cached
  files only; a miss is an `InputError` naming the file.
* Authentication is huggingface_hub's own (HF_TOKEN, or the token saved by `hf auth login`); the
  token is never read, printed or recorded here.
"""

from __future__ import annotations

import fnmatch
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError, UsageError
from ..jsonutil import read_json_file
from .checkpoint import (
    ADAPTER_CONFIG,
    AUX_PATTERNS,
    INDEX_FILE,
    PICKLE_SUFFIXES,
    SINGLE_FILE,
    _pickle_error,
    adapter_file,
    check_weight_map,
    is_adapter_folder,
    merge_shards,
    parse_weight_map,
    read_adapter_config,
    read_config,
)
from .hub_checkpoint import HubCheckpoint, _download
from .hub_errors import _hub_errors
from .hub_spec import (
    CACHE_POLICIES,
    HubSpec,
    _api,
    _cache_dir,
    _endpoint,
    _offline,
    _storage_folder,
    cache_policy,
    parse_hub_spec,
)
from .safetensors_file import MAX_HEADER_BYTES, TensorEntry, entry_from_info, parse_header_bytes, read_header

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")

_HEADER_THREADS = 8


def resolve_revision(spec: HubSpec, label: str | None = None) -> str:
    """The commit sha of `spec.revision` (a sha is returned as is, without a request)."""
    label = label or spec.address()
    if spec.revision is not None and _SHA_RE.match(spec.revision):
        return spec.revision
    api = _api()
    with _hub_errors(label, spec.repo_id, spec.revision):
        if hasattr(api, "resolve_revision"):  # huggingface_hub >= 1.x: caches refs, falls back to them offline
            return str(
                api.resolve_revision(
                    spec.repo_id, revision=spec.revision, cache_dir=str(_cache_dir()), local_files_only=_offline()
                ).resolved
            )
        ref = _storage_folder(spec.repo_id) / "refs" / (spec.revision or "main")
        if _offline():
            if ref.is_file():
                return ref.read_text().strip()
            raise InputError(
                f"{label}: revision {spec.revision or 'main'} of {spec.repo_id} is not in the local cache "
                "and HF_HUB_OFFLINE=1 is set"
            )
        sha = api.model_info(spec.repo_id, revision=spec.revision).sha
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
        return sha


def open_hub_checkpoint(spec: str, *, policy: str | None = None) -> HubCheckpoint:
    """Open `hf://ORG/NAME[@REVISION][/SUBFOLDER]` from safetensors headers (no weights downloaded).

    `policy`: cache policy of this source ('keep' or 'evict'); default `cache_policy()`.
    """
    policy = policy or cache_policy()
    if policy not in CACHE_POLICIES:
        raise UsageError(f"cache policy {policy!r}: expected one of {', '.join(CACHE_POLICIES)}")
    hs = parse_hub_spec(spec)
    label = str(spec)
    sha = resolve_revision(hs, label)
    if _offline():
        return _open_offline(hs, label, sha, policy)
    return _open_online(hs, label, sha, policy)


def _list_folder(hs: HubSpec, label: str, sha: str) -> dict[str, int]:
    """Files directly in the source's folder at `sha`: name -> size."""
    from huggingface_hub.hf_api import RepoFile

    where = f"folder {hs.subfolder}" if hs.subfolder else None
    with _hub_errors(label, hs.repo_id, sha, where):
        items = list(_api().list_repo_tree(hs.repo_id, path_in_repo=hs.subfolder, revision=sha))
    prefix = f"{hs.subfolder}/" if hs.subfolder else ""
    files = {}
    for it in items:
        if isinstance(it, RepoFile) and it.path.startswith(prefix) and "/" not in it.path[len(prefix) :]:
            files[it.path[len(prefix) :]] = it.size
    if not items and hs.subfolder:
        raise InputError(f"{label}: folder {hs.subfolder!r} not found in repository {hs.repo_id} at {sha[:12]}")
    return files


def _weight_files(
    label: str, files: dict[str, int] | list[str], read_index, complete: bool = True
) -> tuple[list[str], dict[str, str] | None]:
    """Which safetensors files form the model (like a local folder), and the index's weight map.
    `complete`: `files` is the repo folder's listing (not just what the cache holds)."""
    names = set(files)
    if is_adapter_folder(names):  # a PEFT adapter (io/peft_adapter.py reads it on its base)
        return [adapter_file(label, names)], None
    if SINGLE_FILE in names:
        return [SINGLE_FILE], None
    if INDEX_FILE in names:
        where = f"{label}: {INDEX_FILE}"
        weight_map = parse_weight_map(read_json_file(read_index(), "index", where), where)
        shards = list(dict.fromkeys(weight_map.values()))
        for shard in shards:
            if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
                raise InputError(f"{label}: {INDEX_FILE} names shard {shard!r}, which is not a file beside it")
            if complete and shard not in names:
                raise InputError(f"{label}: {INDEX_FILE} names shard {shard!r}, which is missing from the repo")
        return shards, weight_map
    st = sorted(n for n in names if n.endswith(".safetensors"))
    if len(st) == 1:
        return st, None
    if st:
        raise InputError(f"{label}: {len(st)} .safetensors files but no {INDEX_FILE} to say which form the model")
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise _pickle_error(label, pickles[0])
    raise InputError(f"{label}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")


def _remote_header(repo_id: str, filename: str, sha: str, where: str) -> dict:
    """Tensor name -> HeaderInfo of a weight file on the Hub, from HTTP range requests of its first
    bytes (as huggingface_hub's parse_safetensors_file_metadata, whose TensorInfo multiplies each
    shape out before any check: ["x", 10**12] would build a terabyte string)."""
    from huggingface_hub import constants, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=sha, endpoint=_endpoint())
    headers = build_hf_headers()  # token: huggingface_hub's own lookup
    timeout = constants.HF_HUB_DOWNLOAD_TIMEOUT
    first = get_session().get(url, headers={**headers, "range": "bytes=0-100000"}, timeout=timeout)
    hf_raise_for_status(first)
    head = first.content
    if len(head) < 8:
        raise InputError(f"{where}: not a safetensors file (only {len(head)} bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise InputError(
            f"{where}: corrupt safetensors header (header of {n} bytes, more than the "
            f"{MAX_HEADER_BYTES} safetensors allows)"
        )
    if 8 + n <= len(head):
        raw = head[8 : 8 + n]
    else:
        rest = get_session().get(url, headers={**headers, "range": f"bytes=8-{n + 7}"}, timeout=timeout)
        hf_raise_for_status(rest)
        raw = rest.content
        if len(raw) != n:
            raise InputError(f"{where}: truncated or not a safetensors file (header of {n} bytes, got {len(raw)})")
    return parse_header_bytes(raw, where)[0]


def _entries_from_header(label: str, shard: str, tensors: dict) -> dict[str, TensorEntry]:
    """TensorEntries from a remote header (HeaderInfo); offsets unknown (-1) until downloaded."""
    return {name: entry_from_info(f"{label} ({shard})", shard, name, info, None) for name, info in tensors.items()}


def _check_weight_map(
    label: str, weight_map: dict[str, str] | None, entries: dict[str, TensorEntry], shards: list[str]
) -> None:
    """Index and headers agree (as for a local folder); a lone weight file must hold some tensor."""
    if weight_map is not None:
        check_weight_map(f"{label}: {INDEX_FILE}", weight_map, entries)
    elif not entries:
        raise InputError(f"{label}: {shards[0]} holds no tensors")


def _aux_names(names) -> list[str]:
    return sorted(n for n in names if any(fnmatch.fnmatch(n, p) for p in AUX_PATTERNS))


def _open_online(hs: HubSpec, label: str, sha: str, policy: str) -> HubCheckpoint:
    files = _list_folder(hs, label, sha)
    shards, weight_map = _weight_files(label, files, lambda: _download(hs, INDEX_FILE, sha=sha, label=label))

    def header(shard: str):
        where = f"{hs.subfolder}/{shard}" if hs.subfolder else shard
        with _hub_errors(label, hs.repo_id, sha, f"file {where}"):
            return _remote_header(hs.repo_id, where, sha, f"{label} ({shard})")

    with ThreadPoolExecutor(max_workers=min(_HEADER_THREADS, len(shards))) as pool:
        infos = list(pool.map(header, shards))
    entries = merge_shards(
        label, [(shard, _entries_from_header(label, shard, tensors)) for shard, tensors in zip(shards, infos)]
    )
    _check_weight_map(label, weight_map, entries, shards)
    config = None
    if "config.json" in files:
        config = read_config(Path(_download(hs, "config.json", sha=sha, label=label)).parent, f"{label}: config.json")
    aux = [f for f in _aux_names(files) if f != "config.json"]
    ckpt = HubCheckpoint(hs, label, sha, entries, config, aux_files=aux, policy=policy)
    if config is not None:
        ckpt.root = ckpt.weight_dir
    elif not aux:
        ckpt.root = None
    if ADAPTER_CONFIG in files:
        path = Path(_download(hs, ADAPTER_CONFIG, sha=sha, label=label))
        ckpt.adapter_config = read_adapter_config(path, f"{label}: {ADAPTER_CONFIG}")
    return ckpt


def _open_offline(hs: HubSpec, label: str, sha: str, policy: str) -> HubCheckpoint:
    folder = _storage_folder(hs.repo_id) / "snapshots" / sha
    if hs.subfolder:
        folder = folder / hs.subfolder
    if not folder.is_dir():
        raise InputError(
            f"{label}: {hs.repo_id} at {sha[:12]} is not in the local cache and HF_HUB_OFFLINE=1 is set "
            "(run once online to fill the cache, with --hub-cache-policy keep)"
        )
    present = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") or n == INDEX_FILE for n in present):
        raise InputError(
            f"{label}: the weights of {hs.repo_id} at {sha[:12]} are not in the local cache and "
            "HF_HUB_OFFLINE=1 is set (run once online to fill the cache, with --hub-cache-policy keep)"
        )
    shards, weight_map = _weight_files(label, present, lambda: folder / INDEX_FILE, complete=False)
    per_shard = []
    local: dict[str, Path] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise InputError(
                f"{label}: shard {shard} is not in the local cache and HF_HUB_OFFLINE=1 is set "
                "(run once online to fill the cache, with --hub-cache-policy keep)"
            )
        per_shard.append((shard, read_header(path, shard)[0]))
        local[shard] = path
    entries = merge_shards(label, per_shard)
    _check_weight_map(label, weight_map, entries, shards)
    config = read_config(folder, f"{label}: config.json")
    root = folder if _aux_names(present) else None
    ckpt = HubCheckpoint(hs, label, sha, entries, config, aux_files=[], local=local, root=root, policy=policy)
    if ADAPTER_CONFIG in present:
        ckpt.adapter_config = read_adapter_config(folder / ADAPTER_CONFIG, f"{label}: {ADAPTER_CONFIG}")
    return ckpt
