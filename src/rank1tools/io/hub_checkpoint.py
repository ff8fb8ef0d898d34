"""HubCheckpoint: a model in a Hub repo at one commit, listed from remote headers and read shard
by shard (io/hub_open.py builds it).

* A shard is downloaded with `hf_hub_download` into the library's cache the first time one of its
  tensors is read; its tensors' absolute byte offsets are then taken from the local file header.
* Cache policy `keep` (default) leaves downloaded shards in the cache. `evict` deletes a shard this
  process downloaded (snapshot link and blob) once every tensor of it was read (or once the source
  is closed / the process exits), so disk use stays at about one shard per open source. A source
  garbage-collected without close() leaves its files, and no longer keeps other sources from
  evicting them.
* Pickling (a Ray task's arguments) carries a recipe, not the live state: repo, the commit sha,
  subfolder, label, cache policy, the listed entries and config, the names of the config/tokenizer
  files and the declared reads (`expect`). The copy lists nothing again; it downloads what it reads
  into the unpickling process's HF cache from its HF_ENDPOINT, with a lock and evict bookkeeping of
  its own (a fresh source: the original's reads and downloads are not carried).
"""

from __future__ import annotations

import atexit
import fnmatch
import itertools
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from ..modules import split_expert_slice
from .checkpoint import AUX_PATTERNS, Checkpoint
from .hub_errors import _hub_errors
from .hub_spec import HubSpec, _cache_dir, _endpoint, _storage_folder
from .safetensors_file import TensorEntry, read_header

if TYPE_CHECKING:
    import torch  # annotations only: opening a checkpoint reads headers, without torch


# ---------------------------------------------------------------- cache bookkeeping (evict)

_registry_lock = threading.RLock()
_users: dict[str, set[int]] = {}  # snapshot path of a shard -> ids of open sources reading it
_downloaded_here: set[str] = set()  # snapshot paths this process downloaded (only those are ever evicted)
_evicting_sources: weakref.WeakSet[HubCheckpoint] = weakref.WeakSet()
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


def _forget(uid: int, paths: set[str]) -> None:
    """A source garbage-collected without close(): its id leaves the registry (its files stay), so it
    no longer keeps other sources of this process from evicting them (a long-lived process such as a
    Ray worker drops each task's copies of the sources)."""
    with _registry_lock:
        for key in list(paths):
            users = _users.get(key)
            if users is not None:
                users.discard(uid)
                if not users:
                    _users.pop(key, None)


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

    def __init__(
        self,
        spec: HubSpec,
        label: str,
        sha: str,
        entries: dict[str, TensorEntry],
        config: dict | None,
        *,
        aux_files: list[str],
        local: dict[str, Path] | None = None,
        root: Path | None = None,
        policy: str = "keep",
    ):
        self.spec = spec
        self.repo_id = spec.repo_id
        self.subfolder = spec.subfolder
        self.cache_policy = policy
        self._aux_files = list(aux_files)  # not yet downloaded
        self._lock = threading.RLock()
        self._uid = next(_source_ids)
        self._local: dict[str, Path] = {}  # shard -> local path (downloaded, offsets refined)
        self._registered: set[str] = set()  # snapshot paths in `_users` under this source's id
        weakref.finalize(self, _forget, self._uid, self._registered).atexit = False
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
            raise InputError(
                f"{self.label}: downloaded {shard} does not hold the tensors its header listed "
                f"(e.g. {extra!r}); the cache entry may be corrupt, delete it and retry"
            )
        for name, e in local.items():
            old = self.entries[name]
            if (old.dtype, old.shape, old.nbytes) != (e.dtype, e.shape, e.nbytes):
                raise InputError(
                    f"{self.label}: downloaded {shard} stores {name!r} as {e.dtype}{list(e.shape)} but its "
                    f"header listed {old.dtype}{list(old.shape)}; the cache entry may be corrupt"
                )
        self.entries.update(local)  # same keys: order kept
        self._local[shard] = path
        with _registry_lock:
            _users.setdefault(str(path), set()).add(self._uid)
            self._registered.add(str(path))

    # ---- reads, tracked for the evict policy
    def read_raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        t = super().read_raw(name, out)
        self._mark(name, 0, None)
        return t

    def read(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        rows: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        t = super().read(name, device=device, dtype=dtype, rows=rows)
        if rows is None:
            self._mark(name, 0, None)
        else:
            e = self.entry(name)
            per_row = e.numel // e.shape[0] if e.shape and e.shape[0] else 0
            self._mark(name, rows[0] * per_row, rows[1] * per_row)
        return t

    def read_flat(
        self, name: str, start: int, stop: int, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        t = super().read_flat(name, start, stop, device=device, dtype=dtype)
        self._mark(name, start, stop)
        return t

    def expect(self, names) -> None:
        """Declare the tensors the consumer will read (evict: a shard goes once those of it are read)."""
        with self._lock:
            self._needed = {self._stored(n)[0] for n in names}

    def _stored(self, name: str) -> tuple[str, int]:
        """(stored tensor, element offset) of a name: an expert `NAME[e]` of a fused tensor is a span
        of NAME (its shard is done once every expert is read), anything else its own entry."""
        sliced = None if name in self.entries else split_expert_slice(name)
        if sliced is None:
            return self.entry(name).name, 0
        return sliced[0], sliced[1] * self.entry(name).numel

    def _mark(self, name: str, start: int, stop: int | None) -> None:
        stop = self.entry(name).numel if stop is None else stop
        name, offset = self._stored(name)
        start, stop = start + offset, stop + offset
        e = self.entry(name)
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
                wanted = [
                    n
                    for n, x in self.entries.items()
                    if x.shard == e.shard and (self._needed is None or n in self._needed)
                ]
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
            self._registered.discard(key)
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
                        self._registered.discard(str(path))

    # ---- pickling: a portable recipe (see the module docstring)
    def __reduce__(self):
        with self._lock:
            recipe = {
                "repo_id": self.repo_id,
                "sha": self.revision,
                "subfolder": self.subfolder,
                "label": self.label,
                "policy": self.cache_policy,
                "entries": dict(self.entries),
                "config": self.config,
                "aux_files": self._root_files(),
                "needed": None if self._needed is None else sorted(self._needed),
            }
        return _from_recipe, (recipe,)

    def _root_files(self) -> list[str]:
        """The config/tokenizer files `root` offers: those still to download, and those in the
        folder it resolved to (the copy downloads them again where it runs, on first access)."""
        names = set(self._aux_files)
        if self._root is not None and self._root.is_dir():
            names.update(
                p.name
                for p in self._root.iterdir()
                if p.is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in AUX_PATTERNS)
            )
        return sorted(names)

    def __enter__(self) -> HubCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _from_recipe(recipe: dict) -> HubCheckpoint:
    """Unpickle a HubCheckpoint: the same source at the same sha, listed from the recipe."""
    spec = HubSpec(recipe["repo_id"], recipe["sha"], recipe["subfolder"])  # pinned: never a branch
    ckpt = HubCheckpoint(
        spec,
        recipe["label"],
        recipe["sha"],
        recipe["entries"],
        recipe["config"],
        aux_files=recipe["aux_files"],
        policy=recipe["policy"],
    )
    if recipe["needed"] is not None:
        ckpt._needed = set(recipe["needed"])
    return ckpt


def _download(ckpt_or_spec, filename: str, *, sha: str | None = None, label: str | None = None) -> str:
    """hf_hub_download of one file of the source's folder at its sha, errors mapped."""
    from huggingface_hub import hf_hub_download

    if isinstance(ckpt_or_spec, HubCheckpoint):
        spec, sha, label = ckpt_or_spec.spec, ckpt_or_spec.revision, ckpt_or_spec.label
    else:
        spec = ckpt_or_spec
    where = f"{spec.subfolder}/{filename}" if spec.subfolder else filename
    with _hub_errors(label, spec.repo_id, sha, f"file {where}"):
        return hf_hub_download(
            spec.repo_id,
            filename,
            subfolder=spec.subfolder,
            revision=sha,
            cache_dir=str(_cache_dir()),
            endpoint=_endpoint(),
        )
