"""A small fake Hugging Face Hub for tests: real files, real HTTP, on 127.0.0.1.

It answers the endpoints huggingface_hub calls for what rank1tools does:
  GET  /api/models/{org}/{name}[/revision/{rev}]   repo info with the resolved `sha`
  GET  /api/models/{org}/{name}/refs               branches and tags
  GET  /api/models/{org}/{name}/tree/{rev}[/{path}] folder listing (?recursive=True)
  GET  /api/models/{org}/{name}/commits/{rev}      history, newest first
  HEAD/GET /{org}/{name}/resolve/{rev}/{file}      file bytes with ETag, X-Repo-Commit, Content-Length, Range
Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo)
so huggingface_hub raises the same exception classes as against the real Hub.

Repos are git-like: commits hold a full snapshot {path: bytes}, branches and tags point at commits,
shas are deterministic. Switches for failure tests: `drop[path] = n` makes every download GET of that
file (no Range, or an open `bytes=N-` resume) stop after byte n of the file and close the connection.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Commit:
    sha: str
    message: str
    files: dict[str, bytes]
    parent: str | None
    date: str

    @property
    def title(self) -> str:
        return self.message.splitlines()[0] if self.message else ""


@dataclass
class Repo:
    repo_id: str
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    _n: int = 0

    def commit(
        self,
        message: str,
        files: dict[str, bytes] | None = None,
        *,
        branch: str = "main",
        delete: tuple[str, ...] = (),
        parent: str | None = None,
    ) -> str:
        """Add a commit on `branch` (created from `parent`, or empty, if new): parent's files + `files` - `delete`."""
        parent = parent if parent is not None else self.branches.get(branch)
        tree = dict(self.commits[parent].files) if parent else {}
        tree.update(files or {})
        for d in delete:
            tree.pop(d)
        self._n += 1
        h = hashlib.sha1(f"{self.repo_id}\n{parent}\n{message}\n{self._n}".encode())
        for path in sorted(tree):
            h.update(path.encode() + hashlib.sha256(tree[path]).digest())
        sha = h.hexdigest()
        self.commits[sha] = Commit(
            sha, message, tree, parent, f"2025-01-01T00:{self._n // 60:02d}:{self._n % 60:02d}.000Z"
        )
        self.branches[branch] = sha
        return sha

    def branch(self, name: str, rev: str) -> str:
        sha = self.resolve(rev)
        assert sha is not None, rev
        self.branches[name] = sha
        return sha

    def tag(self, name: str, rev: str) -> str:
        sha = self.resolve(rev)
        assert sha is not None, rev
        self.tags[name] = sha
        return sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None

    def history(self, sha: str) -> list[Commit]:
        out = []
        while sha is not None:
            c = self.commits[sha]
            out.append(c)
            sha = c.parent
        return out


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """All files under `folder` as {prefix + relative path: bytes}."""
    folder = Path(folder)
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass
class Logged:
    method: str
    kind: str  # info, refs, tree, commits, resolve
    repo_id: str
    rev: str | None
    path: str | None
    range: str | None
    authorization: bool


class FakeHub:
    def __init__(self, token: str = "hf_fake_good_token"):
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.log: list[Logged] = []
        self.drop: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def create_repo(self, repo_id: str, *, gated: bool = False) -> Repo:
        repo = Repo(repo_id, gated)
        self.repos[repo_id] = repo
        return repo

    def reset(self) -> None:
        with self._lock:
            self.log.clear()
            self.drop.clear()

    def downloads(self, repo_id: str | None = None) -> list[Logged]:
        """Data GETs of files (not header range reads): no Range, or an open-ended resume range."""
        return [
            r
            for r in self.log
            if r.kind == "resolve"
            and r.method == "GET"
            and (repo_id is None or r.repo_id == repo_id)
            and (r.range is None or r.range.endswith("-"))
        ]

    def start(self) -> str:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-hub", daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    fake: FakeHub

    def log_message(self, format, *args):  # noqa: A002 (quiet)
        pass

    # ---- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, *, content_length: int | None = None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, str(v))
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None):
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, headers: dict | None = None):
        self._send(
            status,
            json.dumps({"error": message}).encode(),
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message, **(headers or {})},
        )

    def do_HEAD(self):  # noqa: N802
        self._route()

    def do_GET(self):  # noqa: N802
        self._route()

    # ---- routing
    def _route(self):
        url = urlsplit(self.path)
        segs = [unquote(s) for s in url.path.split("/")[1:]]
        query = parse_qs(url.query)
        if len(segs) >= 4 and segs[0] == "api" and segs[1] == "models":
            repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
            kind = rest[0] if rest else "info"
            if kind == "revision":
                kind = "info"
            rev = rest[1] if len(rest) > 1 else None
            path = "/".join(rest[2:]) if kind == "tree" and len(rest) > 2 else None
        elif len(segs) >= 5 and segs[2] == "resolve":
            repo_id, kind, rev, path = f"{segs[0]}/{segs[1]}", "resolve", segs[3], "/".join(segs[4:])
        else:
            return self._error(404, "NotFound", f"no route for {url.path}")
        with self.fake._lock:
            self.fake.log.append(
                Logged(
                    self.command,
                    kind,
                    repo_id,
                    rev,
                    path,
                    self.headers.get("Range"),
                    self.headers.get("Authorization") is not None,
                )
            )
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound", "Repository not found")
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                return self._error(401, "GatedRepo", "Access to this model is restricted. You must be authenticated.")
            if auth != f"Bearer {self.fake.token}":
                return self._error(
                    403, "GatedRepo", "Access to this model is restricted and you are not in the authorized list."
                )
        if kind == "refs":
            return self._json(
                {
                    "branches": [
                        {"name": b, "ref": f"refs/heads/{b}", "targetCommit": s}
                        for b, s in sorted(repo.branches.items())
                    ],
                    "tags": [
                        {"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in sorted(repo.tags.items())
                    ],
                    "converts": [],
                    "pullRequests": [],
                }
            )
        sha = repo.resolve(rev if rev is not None else "main")
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        commit = repo.commits[sha]
        if kind == "info":
            return self._json(
                {
                    "id": repo_id,
                    "sha": sha,
                    "private": False,
                    "gated": "auto" if repo.gated else False,
                    "lastModified": commit.date,
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                }
            )
        if kind == "commits":
            return self._json(
                [
                    {
                        "id": c.sha,
                        "title": c.title,
                        "message": c.message,
                        "date": c.date,
                        "authors": [{"user": "trainer"}],
                    }
                    for c in repo.history(sha)
                ]
            )
        if kind == "tree":
            return self._tree(commit, path or "", query.get("recursive", ["False"])[0].lower() == "true")
        if kind == "resolve":
            return self._resolve(commit, path)
        return self._error(404, "NotFound", f"unknown endpoint {kind}")

    def _tree(self, commit: Commit, path: str, recursive: bool):
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        under = {p: b for p, b in commit.files.items() if p.startswith(prefix)}
        if prefix and not under:
            return self._error(
                404, "EntryNotFound", f"{path} does not exist on {commit.sha}", {"X-Repo-Commit": commit.sha}
            )
        items: dict[str, dict] = {}
        for p, data in under.items():
            rel = p[len(prefix) :]
            parts = rel.split("/")
            for i in range(1, len(parts)):  # folders on the way
                d = prefix + "/".join(parts[:i])
                if (recursive or i == 1) and d not in items:
                    items[d] = {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "path": d}
            if recursive or len(parts) == 1:
                blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
                items[p] = {"type": "file", "oid": blob, "size": len(data), "path": p}
        return self._json([items[k] for k in sorted(items)])

    def _resolve(self, commit: Commit, path: str):
        data = commit.files.get(path)
        if data is None:
            return self._error(
                404, "EntryNotFound", f"{path} does not exist on {commit.sha}", {"X-Repo-Commit": commit.sha}
            )
        headers = {
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        total = len(data)
        start, end = 0, total - 1
        rng = self.headers.get("Range")
        status = 200
        if rng:
            try:
                a, b = rng.strip().removeprefix("bytes=").split("-", 1)
                start = int(a)
                end = min(int(b), total - 1) if b else total - 1
            except ValueError:
                return self._error(400, "BadRequest", f"bad range {rng}")
            if start >= total or start > end:
                return self._send(416, b"", {"Content-Range": f"bytes */{total}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        limit = self.fake.drop.get(path)
        is_download = rng is None or rng.strip().endswith("-")
        if self.command == "GET" and limit is not None and is_download:
            self._send(status, b"", headers, content_length=len(body))  # promise the whole range...
            if start < limit:
                self.wfile.write(data[start:limit])  # ...deliver part of it, then hang up
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self._send(status, body, headers)
