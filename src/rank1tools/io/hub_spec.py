"""Hub source addresses and settings: `hf://ORG/NAME[@REVISION][/SUBFOLDER]` (HUB_PREFIX,
is_hub_source, HubSpec, parse_hub_spec), the cache policy (set_cache_policy / cache_policy), and
huggingface_hub's endpoint, cache folder, offline flag and API client, shared by every Hub module.

Light on purpose: neither torch nor huggingface_hub is imported until a Hub function is called, so
io/sources.py and the CLI can import this module for any source.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from ..errors import UsageError

HUB_PREFIX = "hf://"
CACHE_POLICIES = ("keep", "evict")
CACHE_POLICY_ENV = "RANK1_HUB_CACHE_POLICY"
_cache_policy: str | None = None

_SPEC_RE = re.compile(r"^hf://(?P<org>[^/@]+)/(?P<name>[^/@]+)(?:@(?P<rev>[^/]+))?(?:/(?P<sub>.*))?$")


def is_hub_source(spec: str) -> bool:
    return str(spec).startswith(HUB_PREFIX)


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
        raise UsageError(
            f"{spec}: not a Hub source; expected hf://ORG/NAME, hf://ORG/NAME@REVISION "
            "or hf://ORG/NAME@REVISION/SUBFOLDER"
        )
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
