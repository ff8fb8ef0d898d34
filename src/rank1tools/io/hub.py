"""Hugging Face Hub sources: `hf://ORG/NAME[@REVISION][/SUBFOLDER]`, streamed shard by shard.

* The revision (branch, tag, or sha; default: the repo's default branch) is resolved to its commit
  sha once, when the source is opened; every later request names that sha, and `Checkpoint.revision`
  (recorded in provenance) is the sha.
* Tensors are listed from the safetensors headers only, fetched with HTTP range requests of the
  first bytes of each weight file (as huggingface_hub's `parse_safetensors_file_metadata`) and
  checked like a local header: no tensor data is downloaded to list a model.
* A shard is downloaded with `hf_hub_download` into the library's cache the first time one of its
  tensors is read; its tensors' absolute byte offsets are then taken from the local file header.
* Cache policy `keep` (default) leaves downloaded shards in the cache. `evict` deletes a shard this
  process downloaded (snapshot link and blob) once every tensor of it was read (or once the source
  is closed / the process exits), so disk use stays at about one shard per open source.
* `HF_HUB_OFFLINE=1`: revisions resolve from the cache's refs, listings and reads come from cached
  files only; a miss is an `InputError` naming the file.
* Authentication is huggingface_hub's own (HF_TOKEN, or the token saved by `hf auth login`); the
  token is never read, printed or recorded here.

Run discovery on the Hub (`discover_hub_run`): branches matching a glob (step = trailing integer of
the name), step folders (`checkpoint-N/`, ...) of one revision, or commits whose message says "step N".
"""

from __future__ import annotations

import atexit
import fnmatch
import itertools
import os
import re
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import torch

from ..errors import InputError, Rank1Error, UsageError
from ..jsonutil import read_json_file
from .checkpoint import (INDEX_FILE, PICKLE_SUFFIXES, SINGLE_FILE, Checkpoint, _pickle_error, check_weight_map,
                         merge_shards, parse_weight_map, read_config)
from ..options import ascii_int
from .runs import _VERL_WEIGHT_DIRS, RunCheckpoint, _match, name_problem, one_of_step
from .safetensors_file import MAX_HEADER_BYTES, TensorEntry, entry_from_info, parse_header_bytes, read_header
from .sources import HUB_PREFIX

CACHE_POLICIES = ("keep", "evict")
CACHE_POLICY_ENV = "RANK1_HUB_CACHE_POLICY"
_cache_policy: str | None = None

_SPEC_RE = re.compile(r"^hf://(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.*))?$")
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# [0-9], not \d: \d and int() also take other scripts' digits
_TRAILING_INT = re.compile(r"([0-9]+)$")
_COMMIT_STEP = re.compile(r"step[ _-]?([0-9]+)", re.IGNORECASE)
_HEADER_THREADS = 8


# ---------------------------------------------------------------- settings

def set_cache_policy(policy: str | None) -> None:
    """Cache policy for Hub sources opened from now on: 'keep' or 'evict' (None: back to the default)."""
    if policy is not None and policy not in CACHE_POLICIES:
        raise UsageError(f"--hub-cache-policy {policy!r}: expected one of {', '.join(CACHE_POLICIES)}")
    global _cache_policy
    _cache_policy = policy


def cache_policy() -> str:
    """The policy in force: set_cache_policy(), else $RANK1_HUB_CACHE_POLICY, else 'keep'."""
    policy = _cache_policy or os.environ.get(CACHE_POLICY_ENV) or "keep"
    if policy not in CACHE_POLICIES:
        raise UsageError(f"{CACHE_POLICY_ENV}={policy!r}: expected one of {', '.join(CACHE_POLICIES)}")
    return policy


def _constants():
    from huggingface_hub import constants

    return constants


def _endpoint() -> str:
    return _constants().ENDPOINT.rstrip("/")


def _cache_dir() -> Path:
    return Path(_constants().HF_HUB_CACHE).expanduser()


def _offline() -> bool:
    return bool(_constants().is_offline_mode())


def _api():
    from huggingface_hub import HfApi

    return HfApi(endpoint=_endpoint())  # token: huggingface_hub's own lookup (HF_TOKEN / saved login)


def _storage_folder(repo_id: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return _cache_dir() / repo_folder_name(repo_id=repo_id, repo_type="model")


# ---------------------------------------------------------------- source syntax

@dataclass(frozen=True)
class HubSpec:
    """A parsed `hf://ORG/NAME[@REVISION][/SUBFOLDER]`."""

    repo_id: str
    revision: str | None  # None: the repo's default branch
    subfolder: str | None

    def address(self, revision: str | None = None, subfolder: str | None = ...) -> str:
        rev = revision if revision is not None else self.revision
        sub = self.subfolder if subfolder is ... else subfolder
        out = f"{HUB_PREFIX}{self.repo_id}"
        if rev is not None:
            out += "@" + rev.replace("/", "%2F")
        if sub:
            out += "/" + sub
        return out


def parse_hub_spec(spec: str) -> HubSpec:
    """Parse a Hub source. A revision containing '/' (e.g. refs/pr/1) is written with %2F."""
    m = _SPEC_RE.match(str(spec))
    if m is None:
        raise UsageError(f"{spec}: not a Hub source; expected hf://ORG/NAME, hf://ORG/NAME@REVISION "
                         "or hf://ORG/NAME@REVISION/SUBFOLDER")
    org, name = m["org"], m["name"]
    if org in ("datasets", "spaces"):
        raise UsageError(f"{spec}: only model repos are supported (hf://ORG/NAME)")
    rev = unquote(m["rev"]) if m["rev"] is not None else None
    if rev == "":
        raise UsageError(f"{spec}: empty revision after '@'")
    sub = (m["sub"] or "").strip("/") or None
    if sub is not None and any(part in ("", ".", "..") for part in sub.split("/")):
        raise UsageError(f"{spec}: subfolder {sub!r} must be a plain path inside the repo")
    return HubSpec(f"{org}/{name}", rev, sub)


# ---------------------------------------------------------------- errors

def _scrub(text: str) -> str:
    """One line, without the token should a server ever echo it."""
    text = " ".join(str(text).split())
    try:
        from huggingface_hub import get_token

        token = get_token()
    except Exception:  # noqa: BLE001 (a broken token setup must not hide the real error)
        token = None
    if token:
        text = text.replace(token, "***")
    return text[:300]


def _transport_errors() -> tuple[type[BaseException], ...]:
    out: list[type[BaseException]] = []
    for mod in ("httpx2", "httpx"):
        try:
            out.append(__import__(mod).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(out)


class _Never(Exception):
    """Stands in for an exception class this huggingface_hub version lacks."""


class _HubErrors:
    def __getattr__(self, name: str) -> type[BaseException]:
        from huggingface_hub import errors

        return getattr(errors, name, _Never)


def _map_error(e: BaseException, label: str, repo_id: str, revision: str | None, what: str | None) -> Rank1Error | None:
    E = _HubErrors()

    rev = revision or "the default branch"
    thing = what or f"revision {rev}"
    if isinstance(e, E.GatedRepoError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = "no token was sent" if status == 401 else "the token sent has no access"
        return InputError(f"{label}: repository {repo_id} is gated and {why} (HTTP {status}); accept its terms on the "
                          "Hub, then log in with `hf auth login` or set HF_TOKEN")
    if isinstance(e, E.DisabledRepoError):
        return InputError(f"{label}: repository {repo_id} is disabled on the Hub")
    if isinstance(e, E.RepositoryNotFoundError):
        return InputError(f"{label}: repository {repo_id} not found on {_endpoint()} (or it is private and no valid "
                          "token is set: `hf auth login` or HF_TOKEN)")
    if isinstance(e, E.RevisionNotFoundError):
        return InputError(f"{label}: revision {rev!r} not found in repository {repo_id}")
    if isinstance(e, E.RemoteEntryNotFoundError):
        return InputError(f"{label}: {thing} not found in repository {repo_id} at revision {rev}")
    offline_kinds = (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled, E.RevisionResolutionError)
    if isinstance(e, offline_kinds):
        if _offline():
            return InputError(f"{label}: {thing} of {repo_id} is not in the local cache and HF_HUB_OFFLINE=1 is set "
                              "(run once online to fill the cache, with --hub-cache-policy keep)")
        cause = e.__cause__ or e.__context__ or e
        return InputError(f"{label}: cannot reach the Hub at {_endpoint()} for {thing} of {repo_id} "
                          f"({type(cause).__name__}: {_scrub(cause)}) and it is not in the local cache")
    if isinstance(e, E.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        server = getattr(e, "server_message", None)
        return InputError(f"{label}: the Hub answered HTTP {status} for {thing} of {repo_id}"
                          + (f": {_scrub(server)}" if server else ""))
    if isinstance(e, E.SafetensorsParsingError):
        return InputError(f"{label}: corrupt safetensors header in {thing} ({_scrub(e)})")
    if isinstance(e, E.HFValidationError):
        return UsageError(f"{label}: invalid repository id or revision ({_scrub(e)})")
    if isinstance(e, _transport_errors()) or (isinstance(e, OSError) and "Consistency check failed" in str(e)):
        return InputError(f"{label}: network failure while fetching {thing} of {repo_id} ({type(e).__name__}: "
                          f"{_scrub(e)}); nothing partial was kept, rerun to resume (files already downloaded stay "
                          "in the cache)")
    return None


@contextmanager
def _hub_errors(label: str, repo_id: str, revision: str | None, what: str | None = None):
    try:
        yield
    except Rank1Error:
        raise
    except Exception as e:  # noqa: BLE001 (mapped to one line, or re-raised untouched)
        mapped = _map_error(e, label, repo_id, revision, what)
        if mapped is None:
            raise
        raise mapped from None


# ---------------------------------------------------------------- revision resolution

def resolve_revision(spec: HubSpec, label: str | None = None) -> str:
    """The commit sha of `spec.revision` (a sha is returned as is, without a request)."""
    label = label or spec.address()
    if spec.revision is not None and _SHA_RE.match(spec.revision):
        return spec.revision
    api = _api()
    with _hub_errors(label, spec.repo_id, spec.revision):
        if hasattr(api, "resolve_revision"):  # huggingface_hub >= 1.x: caches refs, falls back to them offline
            return str(api.resolve_revision(spec.repo_id, revision=spec.revision, cache_dir=str(_cache_dir()),
                                            local_files_only=_offline()).resolved)
        ref = _storage_folder(spec.repo_id) / "refs" / (spec.revision or "main")
        if _offline():
            if ref.is_file():
                return ref.read_text().strip()
            raise InputError(f"{label}: revision {spec.revision or 'main'} of {spec.repo_id} is not in the local cache "
                             "and HF_HUB_OFFLINE=1 is set")
        sha = api.model_info(spec.repo_id, revision=spec.revision).sha
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(sha)
        return sha


# ---------------------------------------------------------------- cache bookkeeping (evict)

_registry_lock = threading.RLock()
_users: dict[str, set[int]] = {}  # snapshot path of a shard -> ids of open sources reading it
_downloaded_here: set[str] = set()  # snapshot paths this process downloaded (only those are ever evicted)
_evicting_sources: "weakref.WeakSet[HubCheckpoint]" = weakref.WeakSet()
_source_ids = itertools.count(1)


def _delete_cached(pointer: Path) -> None:
    """Remove a file from huggingface_hub's cache: its snapshot link and its blob, unless another
    snapshot still links to the blob."""
    if pointer.is_symlink():
        blob = Path(os.path.realpath(pointer))
        pointer.unlink(missing_ok=True)
        snapshots = pointer
        while snapshots.name != "snapshots" and snapshots.parent != snapshots:
            snapshots = snapshots.parent
        if snapshots.name == "snapshots":
            for link in snapshots.rglob("*"):
                if link.is_symlink() and Path(os.path.realpath(link)) == blob:
                    return
        blob.unlink(missing_ok=True)
    else:  # cache without symlinks: the snapshot file is the data
        pointer.unlink(missing_ok=True)


@atexit.register
def _close_all() -> None:
    for src in list(_evicting_sources):
        try:
            src.close()
        except Exception:  # noqa: BLE001 (best effort at exit)
            pass


# ---------------------------------------------------------------- the checkpoint

class HubCheckpoint(Checkpoint):
    """A model in a Hub repo at one commit: listed from remote headers, read shard by shard.

    `entries` offsets are placeholders (-1) until a shard is downloaded; `locate()` (base class)
    calls `shard_path()` first, which downloads the shard and puts the real offsets in `entries`.
    `root` (config/tokenizer files, for writers to copy) is downloaded on first access.
    """

    def __init__(self, spec: HubSpec, label: str, sha: str, entries: dict[str, TensorEntry], config: dict | None,
                 *, aux_files: list[str], local: dict[str, Path] | None = None, root: Path | None = None,
                 policy: str = "keep"):
        self.spec = spec
        self.repo_id = spec.repo_id
        self.subfolder = spec.subfolder
        self.cache_policy = policy
        self._aux_files = list(aux_files)  # not yet downloaded
        self._lock = threading.RLock()
        self._uid = next(_source_ids)
        self._local: dict[str, Path] = {}  # shard -> local path (downloaded, offsets refined)
        self._covered: dict[str, list[tuple[int, int]]] = {}  # tensor -> element ranges read
        self._done: set[str] = set()  # tensors read in full
        self._needed: set[str] | None = None  # tensors the consumer will read (None: all)
        weight_dir = self._snapshot_dir(sha)
        super().__init__(label, weight_dir, entries, config, root, revision=sha)
        for shard, path in (local or {}).items():
            self._adopt(shard, path)
        if policy == "evict":
            _evicting_sources.add(self)

    def __repr__(self) -> str:
        return f"HubCheckpoint({self.label!r} @ {self.revision[:12]}, {len(self.entries)} tensors)"

    # ---- paths
    def _snapshot_dir(self, sha: str) -> Path:
        d = _storage_folder(self.repo_id) / "snapshots" / sha
        return d / self.subfolder if self.subfolder else d

    # ---- auxiliary files, on demand
    @property
    def root(self) -> Path | None:
        with self._lock:
            if self._aux_files:
                for f in list(self._aux_files):
                    _download(self, f)
                    self._aux_files.remove(f)
                self._root = self.weight_dir
            return self._root

    @root.setter
    def root(self, value: Path | None) -> None:
        self._root = value

    # ---- shards
    def shard_path(self, shard: str) -> Path:
        """Download the shard (if not cached) and refine its entries' byte offsets from its header."""
        with self._lock:
            path = self._local.get(shard)
            if path is not None and path.exists():
                return path
            self._local.pop(shard, None)
            if shard not in self.shards:
                raise InputError(f"{self.label}: has no weight file {shard!r}")
            pointer = self.weight_dir / shard
            existed = pointer.exists()
            path = Path(_download(self, shard))
            if not existed and self.cache_policy == "evict":  # only evict-policy downloads are ever deleted
                with _registry_lock:
                    _downloaded_here.add(str(path))
            self._adopt(shard, path)
            return path

    def _adopt(self, shard: str, path: Path) -> None:
        """Take byte offsets from the local header, checking it matches the remote listing."""
        local, _ = read_header(path, shard)
        listed = {n for n, e in self.entries.items() if e.shard == shard}
        if set(local) != listed:
            extra = sorted(set(local) ^ listed)[0]
            raise InputError(f"{self.label}: downloaded {shard} does not hold the tensors its header listed "
                             f"(e.g. {extra!r}); the cache entry may be corrupt, delete it and retry")
        for name, e in local.items():
            old = self.entries[name]
            if (old.dtype, old.shape, old.nbytes) != (e.dtype, e.shape, e.nbytes):
                raise InputError(f"{self.label}: downloaded {shard} stores {name!r} as {e.dtype}{list(e.shape)} but its "
                                 f"header listed {old.dtype}{list(old.shape)}; the cache entry may be corrupt")
        self.entries.update(local)  # same keys: order kept
        self._local[shard] = path
        with _registry_lock:
            _users.setdefault(str(path), set()).add(self._uid)

    # ---- reads, tracked for the evict policy
    def read_raw(self, name: str) -> torch.Tensor:
        t = super().read_raw(name)
        self._mark(name, 0, None)
        return t

    def read(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = super().read(name, device=device, dtype=dtype, rows=rows)
        if rows is None:
            self._mark(name, 0, None)
        else:
            e = self.entry(name)
            per_row = e.numel // e.shape[0] if e.shape and e.shape[0] else 0
            self._mark(name, rows[0] * per_row, rows[1] * per_row)
        return t

    def read_flat(self, name: str, start: int, stop: int, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = super().read_flat(name, start, stop, device=device, dtype=dtype)
        self._mark(name, start, stop)
        return t

    def expect(self, names) -> None:
        """Declare the tensors the consumer will read (evict: a shard goes once those of it are read)."""
        with self._lock:
            self._needed = {self.entry(n).name for n in names}

    def _mark(self, name: str, start: int, stop: int | None) -> None:
        e = self.entry(name)
        stop = e.numel if stop is None else stop
        with self._lock:
            if e.name not in self._done:
                spans = sorted(self._covered.get(e.name, []) + [(start, stop)])
                merged: list[tuple[int, int]] = []
                for a, b in spans:
                    if merged and a <= merged[-1][1]:
                        merged[-1] = (merged[-1][0], max(merged[-1][1], b))
                    else:
                        merged.append((a, b))
                if merged and merged[0][0] <= 0 and merged[0][1] >= e.numel or e.numel == 0:
                    self._done.add(e.name)
                    self._covered.pop(e.name, None)
                else:
                    self._covered[e.name] = merged
            if self.cache_policy == "evict" and e.shard in self._local:
                wanted = [n for n, x in self.entries.items() if x.shard == e.shard
                          and (self._needed is None or n in self._needed)]
                if all(n in self._done for n in wanted):
                    self._evict(e.shard)

    def _evict(self, shard: str) -> None:
        path = self._local.pop(shard, None)
        if path is None:
            return
        key = str(path)
        with _registry_lock:
            users = _users.get(key, set())
            users.discard(self._uid)
            if users:
                return
            _users.pop(key, None)
            if key not in _downloaded_here:
                return  # was in the cache before: never deleted by us
            _downloaded_here.discard(key)
            _delete_cached(path)

    def close(self) -> None:
        """Release this source's shards; with the evict policy, delete those it downloaded."""
        with self._lock:
            for shard in list(self._local):
                if self.cache_policy == "evict":
                    self._evict(shard)
                else:
                    path = self._local.pop(shard)
                    with _registry_lock:
                        _users.get(str(path), set()).discard(self._uid)

    def __enter__(self) -> "HubCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _download(ckpt_or_spec, filename: str, *, sha: str | None = None, label: str | None = None) -> str:
    """hf_hub_download of one file of the source's folder at its sha, errors mapped."""
    from huggingface_hub import hf_hub_download

    if isinstance(ckpt_or_spec, HubCheckpoint):
        spec, sha, label = ckpt_or_spec.spec, ckpt_or_spec.revision, ckpt_or_spec.label
    else:
        spec = ckpt_or_spec
    where = f"{spec.subfolder}/{filename}" if spec.subfolder else filename
    with _hub_errors(label, spec.repo_id, sha, f"file {where}"):
        return hf_hub_download(spec.repo_id, filename, subfolder=spec.subfolder, revision=sha,
                               cache_dir=str(_cache_dir()), endpoint=_endpoint())


# ---------------------------------------------------------------- opening

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
        if isinstance(it, RepoFile) and it.path.startswith(prefix) and "/" not in it.path[len(prefix):]:
            files[it.path[len(prefix):]] = it.size
    if not items and hs.subfolder:
        raise InputError(f"{label}: folder {hs.subfolder!r} not found in repository {hs.repo_id} at {sha[:12]}")
    return files


def _weight_files(label: str, files: dict[str, int] | list[str], read_index,
                  complete: bool = True) -> tuple[list[str], dict[str, str] | None]:
    """Which safetensors files form the model (like a local folder), and the index's weight map.
    `complete`: `files` is the repo folder's listing (not just what the cache holds)."""
    names = set(files)
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
        raise InputError(f"{where}: corrupt safetensors header (header of {n} bytes, more than the "
                         f"{MAX_HEADER_BYTES} safetensors allows)")
    if 8 + n <= len(head):
        raw = head[8:8 + n]
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


def _check_weight_map(label: str, weight_map: dict[str, str] | None, entries: dict[str, TensorEntry],
                      shards: list[str]) -> None:
    """Index and headers agree (as for a local folder); a lone weight file must hold some tensor."""
    if weight_map is not None:
        check_weight_map(f"{label}: {INDEX_FILE}", weight_map, entries)
    elif not entries:
        raise InputError(f"{label}: {shards[0]} holds no tensors")


def _aux_names(names) -> list[str]:
    from .writer import AUX_PATTERNS

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
    entries = merge_shards(label, [(shard, _entries_from_header(label, shard, tensors))
                                   for shard, tensors in zip(shards, infos)])
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
    return ckpt


def _open_offline(hs: HubSpec, label: str, sha: str, policy: str) -> HubCheckpoint:
    folder = _storage_folder(hs.repo_id) / "snapshots" / sha
    if hs.subfolder:
        folder = folder / hs.subfolder
    if not folder.is_dir():
        raise InputError(f"{label}: {hs.repo_id} at {sha[:12]} is not in the local cache and HF_HUB_OFFLINE=1 is set "
                         "(run once online to fill the cache, with --hub-cache-policy keep)")
    present = [p.name for p in folder.iterdir() if p.is_file()]
    if not any(n.endswith(".safetensors") or n == INDEX_FILE for n in present):
        raise InputError(f"{label}: the weights of {hs.repo_id} at {sha[:12]} are not in the local cache and "
                         "HF_HUB_OFFLINE=1 is set (run once online to fill the cache, with --hub-cache-policy keep)")
    shards, weight_map = _weight_files(label, present, lambda: folder / INDEX_FILE, complete=False)
    per_shard = []
    local: dict[str, Path] = {}
    for shard in shards:
        path = folder / shard
        if not path.is_file():
            raise InputError(f"{label}: shard {shard} is not in the local cache and HF_HUB_OFFLINE=1 is set "
                             "(run once online to fill the cache, with --hub-cache-policy keep)")
        per_shard.append((shard, read_header(path, shard)[0]))
        local[shard] = path
    entries = merge_shards(label, per_shard)
    _check_weight_map(label, weight_map, entries, shards)
    config = read_config(folder, f"{label}: config.json")
    root = folder if _aux_names(present) else None
    return HubCheckpoint(hs, label, sha, entries, config, aux_files=[], local=local, root=root, policy=policy)


# ---------------------------------------------------------------- run discovery

def step_from_name(name: str) -> int | None:
    """Step number of a branch or folder name: its trailing integer (step_50, main-step-000000050, checkpoint-50)."""
    m = _TRAILING_INT.search(name)
    return ascii_int(m.group(1)) if m else None


def step_from_commit(title: str, message: str = "") -> int | None:
    """Step number of a commit: 'step N' (also step_N, step-N, stepN) in its title, else its message."""
    for text in (title, message):
        m = _COMMIT_STEP.search(text or "")
        if m and ascii_int(m.group(1)) is not None:
            return ascii_int(m.group(1))
    return None


def discover_hub_run(spec: str, *, revisions: str | None = None, subfolders: bool = False,
                     commits: bool = False) -> list[RunCheckpoint]:
    """A Hub run's checkpoints, ordered by step; each `weights` is an `hf://ORG/NAME@<sha>[/SUB]` source.

    revisions: glob over branch names (`step_*`), step = trailing integer of the name;
    subfolders: step folders (checkpoint-N/, global_step_N/, global_stepN_hf/) at one revision;
    commits: commits of one revision's history whose message says "step N" (newest wins on repeats).
    """
    chosen = [m for m, on in (("--revisions", revisions is not None), ("--subfolders", subfolders),
                              ("--commits", commits)) if on]
    if len(chosen) != 1:
        raise UsageError(f"{spec}: choose one Hub discovery mode: --revisions GLOB, --subfolders or --commits"
                         + (f" (got {', '.join(chosen)})" if chosen else ""))
    hs = parse_hub_spec(spec)
    label = str(spec)
    if _offline() and not revisions:
        raise InputError(f"{label}: {chosen[0]} lists the repo on the Hub, which HF_HUB_OFFLINE=1 forbids "
                         "(--revisions works offline from the cached branch refs)")
    if revisions is not None:
        return _discover_branches(hs, label, revisions)
    if subfolders:
        return _discover_subfolders(hs, label)
    return _discover_commits(hs, label)


def _discover_branches(hs: HubSpec, label: str, pattern: str) -> list[RunCheckpoint]:
    if hs.revision is not None:
        raise UsageError(f"{label}: --revisions picks the revisions; give the repo without @REVISION")
    if _offline():
        refs_dir = _storage_folder(hs.repo_id) / "refs"
        branches = {p.name: p.read_text().strip() for p in refs_dir.iterdir() if p.is_file()} if refs_dir.is_dir() else {}
    else:
        with _hub_errors(label, hs.repo_id, None, "the list of branches"):
            refs = _api().list_repo_refs(hs.repo_id)
        branches = {b.name: b.target_commit for b in refs.branches}
    matched = sorted(b for b in branches if fnmatch.fnmatchcase(b, pattern))
    found: dict[int, RunCheckpoint] = {}
    for b in matched:
        step = step_from_name(b)
        if step is None:
            continue
        if step in found:
            raise InputError(f"{label}: step {step} appears twice (branches {found[step].path.split('@')[-1]}, {b})")
        sha = branches[b]
        found[step] = RunCheckpoint(step, hs.address(revision=b), "hub-branch", hs.address(revision=sha))
    if not found:
        where = " in the local cache" if _offline() else ""
        raise InputError(f"{label}: no branch matching {pattern!r} ends in a step number{where} "
                         f"(branches: {', '.join(sorted(branches)[:12]) or 'none'})")
    return [found[s] for s in sorted(found)]


def _discover_subfolders(hs: HubSpec, label: str) -> list[RunCheckpoint]:
    from huggingface_hub.hf_api import RepoFile

    sha = resolve_revision(hs, label)
    base = f"{hs.subfolder}/" if hs.subfolder else ""
    with _hub_errors(label, hs.repo_id, sha, f"folder {hs.subfolder}" if hs.subfolder else None):
        items = list(_api().list_repo_tree(hs.repo_id, path_in_repo=hs.subfolder, revision=sha, recursive=True))
    files = [it.path[len(base):] for it in items if isinstance(it, RepoFile) and it.path.startswith(base)]
    by_folder: dict[str, list[str]] = {}
    for f in files:
        top, _, rest = f.partition("/")
        if rest:
            by_folder.setdefault(top, []).append(rest)
    found: dict[int, RunCheckpoint] = {}
    unnamed: list[RunCheckpoint] = []
    for folder in sorted(by_folder):
        m = _match(folder)
        if m is None:
            continue
        layout, step = m
        inner = by_folder[folder]
        path = hs.address(revision=hs.revision, subfolder=base + folder)
        if step is None:  # named like a step folder, no usable step: listed, not skipped
            unnamed.append(RunCheckpoint(None, path, f"hub-subfolder/{layout}", None, name_problem(folder)))
            continue
        rc = None
        for cand in (_VERL_WEIGHT_DIRS if layout == "verl" else (".",)):
            prefix = "" if cand == "." else cand + "/"
            names = [r[len(prefix):] for r in inner if r.startswith(prefix) and "/" not in r[len(prefix):]]
            if any(n.endswith(".safetensors") or n == INDEX_FILE for n in names):
                sub = base + folder + ("" if cand == "." else "/" + cand)
                rc = RunCheckpoint(step, path, f"hub-subfolder/{layout}", hs.address(revision=sha, subfolder=sub))
                break
        if rc is None:
            pickles = sorted(r for r in inner if r.endswith(PICKLE_SUFFIXES))
            problem = (f"unsupported: only pickle/trainer shards ({pickles[0]}{', ...' if len(pickles) > 1 else ''}); "
                       "convert to safetensors first") if pickles else "unsupported: no safetensors weights in this folder"
            rc = RunCheckpoint(step, path, f"hub-subfolder/{layout}", None, problem)
        found[step] = one_of_step(found[step], rc, label) if step in found else rc
    if not found and not unnamed:
        raise InputError(f"{label}: no checkpoint folders (checkpoint-N, global_step_N, global_stepN_hf) at revision "
                         f"{sha[:12]}")
    return [found[s] for s in sorted(found)] + unnamed


def _discover_commits(hs: HubSpec, label: str) -> list[RunCheckpoint]:
    with _hub_errors(label, hs.repo_id, hs.revision, "the commit history"):
        history = _api().list_repo_commits(hs.repo_id, revision=hs.revision)
    found: dict[int, RunCheckpoint] = {}
    for c in history:  # newest first: a step pushed twice keeps its latest commit
        step = step_from_commit(c.title, c.message)
        if step is None or step in found:
            continue
        title = " ".join((c.title or "").split())[:60]
        found[step] = RunCheckpoint(step, f"{hs.address(revision=c.commit_id[:12])} ({title})", "hub-commit",
                                    hs.address(revision=c.commit_id))
    if not found:
        raise InputError(f"{label}: no commit message with a step number (like 'Training in progress, step 50') in "
                         f"the history of {hs.revision or 'the default branch'} ({len(history)} commits)")
    return [found[s] for s in sorted(found)]
