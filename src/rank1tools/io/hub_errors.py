"""Hub failures as one-line rank1tools errors: `_hub_errors(...)` wraps a huggingface_hub call and
maps its exceptions (gated, missing repo/revision/file, offline cache miss, HTTP error, network
failure, ...) to InputError / UsageError, with any token scrubbed from quoted messages.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..errors import InputError, Rank1Error, UsageError
from .hub_spec import _endpoint, _offline


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
        return InputError(
            f"{label}: repository {repo_id} is gated and {why} (HTTP {status}); accept its terms on the "
            "Hub, then log in with `hf auth login` or set HF_TOKEN"
        )
    if isinstance(e, E.DisabledRepoError):
        return InputError(f"{label}: repository {repo_id} is disabled on the Hub")
    if isinstance(e, E.RepositoryNotFoundError):
        return InputError(
            f"{label}: repository {repo_id} not found on {_endpoint()} (or it is private and no valid "
            "token is set: `hf auth login` or HF_TOKEN)"
        )
    if isinstance(e, E.RevisionNotFoundError):
        return InputError(f"{label}: revision {rev!r} not found in repository {repo_id}")
    if isinstance(e, E.RemoteEntryNotFoundError):
        return InputError(f"{label}: {thing} not found in repository {repo_id} at revision {rev}")
    offline_kinds = (E.LocalEntryNotFoundError, E.OfflineModeIsEnabled, E.RevisionResolutionError)
    if isinstance(e, offline_kinds):
        if _offline():
            return InputError(
                f"{label}: {thing} of {repo_id} is not in the local cache and HF_HUB_OFFLINE=1 is set "
                "(run once online to fill the cache, with --hub-cache-policy keep)"
            )
        cause = e.__cause__ or e.__context__ or e
        return InputError(
            f"{label}: cannot reach the Hub at {_endpoint()} for {thing} of {repo_id} "
            f"({type(cause).__name__}: {_scrub(cause)}) and it is not in the local cache"
        )
    if isinstance(e, E.HfHubHTTPError):
        status = getattr(getattr(e, "response", None), "status_code", None)
        server = getattr(e, "server_message", None)
        return InputError(
            f"{label}: the Hub answered HTTP {status} for {thing} of {repo_id}"
            + (f": {_scrub(server)}" if server else "")
        )
    if isinstance(e, E.SafetensorsParsingError):
        return InputError(f"{label}: corrupt safetensors header in {thing} ({_scrub(e)})")
    if isinstance(e, E.HFValidationError):
        return UsageError(f"{label}: invalid repository id or revision ({_scrub(e)})")
    if isinstance(e, _transport_errors()) or (isinstance(e, OSError) and "Consistency check failed" in str(e)):
        return InputError(
            f"{label}: network failure while fetching {thing} of {repo_id} ({type(e).__name__}: "
            f"{_scrub(e)}); nothing partial was kept, rerun to resume (files already downloaded stay "
            "in the cache)"
        )
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
