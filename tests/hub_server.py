"""A loopback Hugging Face hub for tests and benchmarks: real HTTP on 127.0.0.1.

:class:`HubServer` serves the parts of the hub's HTTP API that zooscan and the real
``huggingface_hub`` client use, from real files on disk:

- ``HEAD``/``GET /{repo}/resolve/{revision}/{path}``: ``X-Repo-Commit``, ``ETag``,
  ``Content-Length``, ``Accept-Ranges``; ``Range`` requests answered with 206 and
  ``Content-Range`` (416 out of range). Large binary files (safetensors, ``.bin``,
  ``.pth``...: git-LFS on the hub) answer with a 302 to a *CDN* — a second listener on
  another port, so a different origin as on the real hub — carrying ``X-Linked-Size``
  and ``X-Linked-Etag`` (the sha256). ``expire_cdn_urls()`` makes the issued CDN URLs
  answer 403, like expired signed URLs.
- ``GET /api/models``: ``search``, ``author``, ``filter`` (tags, repeated),
  ``pipeline_tag``, ``library``, ``sort`` (+ ``direction``), ``limit``, ``full``,
  ``config``; pagination by ``Link: <...>; rel="next"`` with a cursor.
- ``GET /api/models/{repo}[/revision/{rev}]`` (``blobs=true`` adds sizes and LFS
  info) and ``/api/models/{repo}/tree/{rev}``.
- The hub's errors: 401 + ``X-Error-Code: RepoNotFound`` for an unknown or private repo
  without a token (404 with one), ``RevisionNotFound``, ``EntryNotFound``, and
  ``GatedRepo`` (401 without a token, 403 with a token that has no access).

Plain URLs (torchvision/timm style) are served with :meth:`HubServer.add_url`.

Every request is logged (:attr:`HubServer.log`) with the body and header bytes
actually written, so tests and benchmarks assert on bytes transferred.

Faults are programmed with :meth:`HubServer.inject` (per path pattern, method, count,
probability): ``status`` (any code, optional ``Retry-After`` and ``RateLimit``
headers), ``reset`` (TCP RST after some body bytes), ``truncate`` (close after some
body bytes), ``wrong_length`` (a ``Content-Length`` that lies), ``delay`` (slow
response), ``stall`` (part of the body, then silence), ``corrupt`` (one flipped byte)
and ``headers`` (extra headers on a normal response, e.g. ``RateLimit``).

Tests import it by module name (pytest puts ``tests/`` on ``sys.path``): either a
local fixture ``with HubServer() as server: yield server``, or the ready-made
:func:`hub` fixture (``from hub_server import hub``). :func:`write_checkpoint` and
:func:`random_state_dict` write real checkpoint files to serve; :func:`free_env`
isolates a test from the user's token, cache and offline settings;
:meth:`HubServer.use_as_hf_endpoint` points the real ``huggingface_hub`` at it.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz", ".h5", ".msgpack", ".tar")
_CHUNK = 256 * 1024


# ----------------------------------------------------------------------------- records


@dataclass
class HostedFile:
    """One file a repository (or a plain URL) serves."""

    name: str
    source: Path | bytes

    def __post_init__(self) -> None:
        self.size = (
            len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size
        )
        self._digests: tuple[str, str] | None = None
        self._lock = threading.Lock()

    @property
    def sha256(self) -> str:
        """sha256 of the content (the hub's LFS etag), computed once when first asked."""
        return self._hashes()[0]

    @property
    def git_oid(self) -> str:
        """The git blob id of the content (the hub's etag for non-LFS files)."""
        return self._hashes()[1]

    def _hashes(self) -> tuple[str, str]:
        with self._lock:
            if self._digests is None:
                digest, blob = hashlib.sha256(), hashlib.sha1(f"blob {self.size}\0".encode())
                for chunk in self.chunks(0, self.size):
                    digest.update(chunk)
                    blob.update(chunk)
                self._digests = digest.hexdigest(), blob.hexdigest()
            return self._digests

    @property
    def lfs(self) -> bool:
        """Stored in git-LFS on a real hub (served through the CDN redirect)."""
        return self.name.endswith(LFS_SUFFIXES)

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """The bytes ``[start, end)`` in chunks."""
        if isinstance(self.source, bytes):
            for pos in range(start, end, _CHUNK):
                yield self.source[pos : min(end, pos + _CHUNK)]
            return
        with open(self.source, "rb") as fh:
            fh.seek(start)
            pos = start
            while pos < end:
                chunk = fh.read(min(_CHUNK, end - pos))
                if not chunk:
                    return
                pos += len(chunk)
                yield chunk


@dataclass
class Repo:
    """A model repository on the loopback hub."""

    repo_id: str
    files: dict[str, HostedFile]
    sha: str
    revisions: dict[str, str]
    """Revision name (branch/tag) -> commit sha (the sha itself also resolves)."""
    info: dict[str, Any]
    private: bool = False
    gated: bool = False
    tokens: frozenset[str] = frozenset()
    """Tokens granted access to a private or gated repo."""

    def commit(self, revision: str) -> str | None:
        """The commit sha ``revision`` names, or ``None``."""
        if revision == self.sha or revision in self.revisions.values():
            return revision
        return self.revisions.get(revision)


@dataclass
class Fault:
    """A programmed failure; see :meth:`HubServer.inject`."""

    kind: str
    path: str = "*"
    method: str | None = None
    count: int | None = 1
    probability: float = 1.0
    status: int = 500
    retry_after: float | str | None = None
    ratelimit: tuple[int, int] | None = None
    after_bytes: int | None = None
    length_delta: int = 0
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        """Whether this fault applies to a request (before the probability draw)."""
        if self.count is not None and self.hits >= self.count:
            return False
        if self.method and self.method != method:
            return False
        return fnmatch.fnmatchcase(path, self.path)


@dataclass
class LoggedRequest:
    """One request the server answered."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int = 0
    body_bytes: int = 0
    header_bytes: int = 0
    repo: str | None = None
    fault: str | None = None
    port: int = 0
    time: float = 0.0


# ------------------------------------------------------------------------------ server


class HubServer:
    """The loopback hub (see the module docstring). ``token`` is the one token the
    server accepts for private and gated repos (in addition to per-repo tokens);
    ``page_size`` is the listing page size; ``seed`` drives probabilistic faults;
    ``bandwidth`` (bytes/s per response) and ``latency`` (s per request) emulate a
    real network for benchmarks."""

    def __init__(
        self,
        *,
        token: str = "hf_loopback_token",
        page_size: int = 50,
        seed: int = 0,
        bandwidth: float | None = None,
        latency: float = 0.0,
    ):
        self.token = token
        self.bandwidth = bandwidth
        """Bytes per second each response body is paced to (``None``: as fast as possible)."""
        self.latency = latency
        """Seconds every request waits before it is answered (a network round trip)."""
        self.page_size = page_size
        self.repos: dict[str, Repo] = {}
        self.urls: dict[str, HostedFile] = {}
        self.faults: list[Fault] = []
        self.log: list[LoggedRequest] = []
        self.cdn_generation = 0
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self._sockets: set[socket.socket] = set()
        self.stopped = threading.Event()
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)

    # ------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Listen on two loopback ports (hub and CDN) in background threads."""
        for _ in range(2):
            httpd = _Server(("127.0.0.1", 0), _Handler)
            httpd.hub = self
            thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
            thread.daemon = True
            thread.start()
            self._servers.append(httpd)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a hub going away mid-scan)."""
        if self.stopped.is_set():
            return
        self.stopped.set()
        for httpd in self._servers:
            httpd.shutdown()
            httpd.server_close()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            with _suppress_oserror():
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The hub's port."""
        return self._servers[0].server_address[1]

    @property
    def cdn_port(self) -> int:
        """The CDN's port (LFS files are redirected there)."""
        return self._servers[1].server_address[1]

    @property
    def endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: what ``HF_ENDPOINT`` should be."""
        return f"http://127.0.0.1:{self.port}"

    def use_as_hf_endpoint(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Point ``HF_ENDPOINT`` and the already-imported ``huggingface_hub`` at this
        server for one test (``huggingface_hub`` reads ``HF_ENDPOINT`` at import)."""
        monkeypatch.setenv("HF_ENDPOINT", self.endpoint)
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        )

    # ------------------------------------------------------------ content

    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, Path | str | bytes],
        *,
        sha: str | None = None,
        revisions: Mapping[str, str] | None = None,
        private: bool = False,
        gated: bool = False,
        tokens: tuple[str, ...] = (),
        **info: Any,
    ) -> Repo:
        """Serve a repository of real files (``{path in repo: file path or bytes}``).

        ``sha`` is its commit (default: derived from the id); ``revisions`` maps extra
        branch/tag names to commits (``main`` always names ``sha``). Other keyword
        arguments go into the API's model info (``pipeline_tag``, ``library_name``,
        ``tags``, ``downloads``, ``likes``, ``createdAt``, ``config``...).
        """
        sha = sha or hashlib.sha1(f"commit:{repo_id}".encode()).hexdigest()
        hosted = {
            name: HostedFile(name, src if isinstance(src, bytes) else Path(src))
            for name, src in files.items()
        }
        repo = Repo(
            repo_id=repo_id,
            files=hosted,
            sha=sha,
            revisions={"main": sha, **dict(revisions or {})},
            info=dict(info),
            private=private,
            gated=gated,
            tokens=frozenset(tokens),
        )
        with self._lock:
            self.repos[repo_id] = repo
        return repo

    def add_url(self, path: str, source: Path | str | bytes) -> str:
        """Serve a file at a plain URL path (e.g. ``/models/resnet18-f37072fd.pth``);
        returns the full URL."""
        path = "/" + path.lstrip("/")
        name = path.rsplit("/", 1)[-1]
        src = source if isinstance(source, bytes) else Path(source)
        with self._lock:
            self.urls[path] = HostedFile(name, src)
        return f"{self.endpoint}{path}"

    def expire_cdn_urls(self) -> None:
        """Make every CDN URL issued so far answer 403 (expired signature)."""
        with self._lock:
            self.cdn_generation += 1

    # ------------------------------------------------------------ faults

    def inject(
        self,
        kind: str,
        *,
        path: str = "*",
        method: str | None = None,
        count: int | None = 1,
        probability: float = 1.0,
        **params: Any,
    ) -> Fault:
        """Program a fault for requests whose URL path matches ``path`` (fnmatch).

        ``kind``: ``status`` (``status=``, ``retry_after=``, ``ratelimit=(remaining,
        reset_s)``), ``reset``/``truncate`` (``after_bytes=`` of the body first, default
        half), ``wrong_length`` (``length_delta=``), ``delay`` (``delay=`` seconds,
        then normal), ``stall`` (``after_bytes=``, then ``delay=`` seconds of silence),
        ``headers`` (``headers=`` added to a normal response), ``corrupt`` (the body
        byte at offset ``after_bytes`` flipped, length intact). ``count=None`` means
        every matching request; faults apply in the order injected.
        """
        kinds = {
            "status",
            "reset",
            "truncate",
            "wrong_length",
            "delay",
            "stall",
            "headers",
            "corrupt",
        }
        if kind not in kinds:
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(
            kind, path=path, method=method, count=count, probability=probability, **params
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        """Remove every programmed fault."""
        with self._lock:
            self.faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    if fault.probability < 1.0 and self._rng.random() >= fault.probability:
                        continue
                    fault.hits += 1
                    return fault
        return None

    # ------------------------------------------------------------ counters

    def bytes_sent(self, *, repo: str | None = None, path: str | None = None) -> int:
        """Bytes written (status line, headers and body) for matching requests."""
        return sum(r.body_bytes + r.header_bytes for r in self._select(repo, path))

    def body_bytes_sent(self, *, repo: str | None = None, path: str | None = None) -> int:
        """Body bytes written for matching requests."""
        return sum(r.body_bytes for r in self._select(repo, path))

    def requests(self, *, repo: str | None = None, path: str | None = None) -> list[LoggedRequest]:
        """Logged requests, optionally for one repo or a path pattern."""
        return self._select(repo, path)

    def reset_log(self) -> None:
        """Forget the logged requests (after the ones in flight are logged)."""
        self.settle()
        with self._lock:
            self.log.clear()

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until every request being answered has been logged (a client can have
        its response before the server logs it)."""
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=timeout)

    def _select(self, repo: str | None, path: str | None) -> list[LoggedRequest]:
        self.settle()
        with self._lock:
            rows = list(self.log)
        if repo is not None:
            rows = [r for r in rows if r.repo == repo]
        if path is not None:
            rows = [r for r in rows if fnmatch.fnmatchcase(r.path, path)]
        return rows

    def _begin(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _record(self, entry: LoggedRequest) -> None:
        with self._lock:
            self.log.append(entry)
            self._in_flight -= 1
            self._idle.notify_all()

    # ------------------------------------------------------------ access control

    def check_access(
        self, repo: Repo | None, token: str | None, repo_id: str
    ) -> tuple[int, str, str] | None:
        """``(status, X-Error-Code, message)`` when access is refused, else ``None``."""
        known = token is not None and (token == self.token or (repo and token in repo.tokens))
        if repo is None or (repo.private and not known):
            status = 404 if token else 401
            return status, "RepoNotFound", "Repository not found"
        if repo.gated and not known:
            message = (
                f"Access to model {repo_id} is restricted and you are not in the authorized list."
            )
            return (403 if token else 401), "GatedRepo", message
        return None

    # ------------------------------------------------------------ API data

    def model_item(self, repo: Repo, *, full: bool, config: bool, blobs: bool = False) -> dict:
        """The JSON the hub's API gives for one model."""
        info = repo.info
        item: dict[str, Any] = {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "likes": info.get("likes", 0),
            "downloads": info.get("downloads", 0),
            "trendingScore": info.get("trendingScore", 0),
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "tags": list(self.tags(repo)),
            "pipeline_tag": info.get("pipeline_tag"),
            "library_name": info.get("library_name"),
            "createdAt": info.get("createdAt", "2024-01-01T00:00:00.000Z"),
        }
        if full or config or blobs:
            item.update(
                sha=repo.sha,
                lastModified=info.get("lastModified", "2024-06-01T00:00:00.000Z"),
                disabled=False,
                siblings=[_sibling(f, blobs) for f in repo.files.values()],
            )
        if config:
            item["config"] = self.config_of(repo)
        return item

    @staticmethod
    def tags(repo: Repo) -> list[str]:
        """Tags as the hub derives them: explicit ones, library, pipeline tag."""
        tags = list(repo.info.get("tags", []))
        for extra in (repo.info.get("library_name"), repo.info.get("pipeline_tag")):
            if extra and extra not in tags:
                tags.append(extra)
        if any(name.endswith(".safetensors") for name in repo.files) and "safetensors" not in tags:
            tags.append("safetensors")
        return tags

    @staticmethod
    def config_of(repo: Repo) -> dict | None:
        """The ``config`` the API shows: explicit, else parsed from ``config.json``."""
        if "config" in repo.info:
            return repo.info["config"]
        hosted = repo.files.get("config.json")
        if hosted is None:
            return None
        try:
            return json.loads(b"".join(hosted.chunks(0, hosted.size)))
        except ValueError:
            return None

    def listing(self, query: Mapping[str, list[str]]) -> list[Repo]:
        """The repos ``/api/models`` returns for ``query``, sorted (no pagination)."""
        with self._lock:
            repos = [r for r in self.repos.values() if not r.private]
        first = {k: v[0] for k, v in query.items() if v}
        if "search" in first:
            needle = first["search"].lower()
            repos = [r for r in repos if needle in r.repo_id.lower()]
        if "author" in first:
            repos = [r for r in repos if r.repo_id.split("/")[0] == first["author"]]
        for tag in query.get("filter", []):
            repos = [r for r in repos if tag in self.tags(r) or r.repo_id == tag]
        if "pipeline_tag" in first:
            repos = [r for r in repos if r.info.get("pipeline_tag") == first["pipeline_tag"]]
        if "library" in first:
            repos = [r for r in repos if r.info.get("library_name") == first["library"]]
        sort = first.get("sort")
        if sort:
            descending = first.get("direction", "-1") != "1"
            repos.sort(key=lambda r: _sort_key(r, sort), reverse=descending)
        return repos


# ----------------------------------------------------------------------------- handler


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    hub: HubServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    # -------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.hub._lock:
            self.hub._sockets.add(self.connection)

    def finish(self) -> None:
        with _suppress_oserror():
            super().finish()
        with self.hub._lock:
            self.hub._sockets.discard(self.connection)

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        """Silence the default stderr access log (the hub keeps its own log)."""

    def flush_headers(self) -> None:
        if hasattr(self, "_headers_buffer") and hasattr(self, "entry"):
            self.entry.header_bytes += sum(len(b) for b in self._headers_buffer)
        super().flush_headers()

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        self._dispatch("GET")

    def _dispatch(self, method: str) -> None:
        self.hub._begin()
        parts = urlsplit(self.path)
        self.entry = LoggedRequest(
            method=method,
            path=parts.path,
            query=parts.query,
            headers=dict(self.headers.items()),
            port=self.server.server_address[1],
            time=time.time(),
        )
        self.query = parse_qs(parts.query)
        if self.hub.latency:
            time.sleep(self.hub.latency)
        self.fault = self.hub._take_fault(method, parts.path)
        self.entry.fault = self.fault.kind if self.fault else None
        try:
            if self.fault is not None and self._early_fault():
                return
            self._route(method, parts.path)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub._record(self.entry)

    def _early_fault(self) -> bool:
        """Apply faults that replace or precede the normal answer; True if answered."""
        fault = self.fault
        if fault.kind == "delay":
            time.sleep(fault.delay)
            return False
        if fault.kind in ("reset", "truncate") and self.command == "HEAD":
            # No body to cut: drop the connection before answering.
            self._after_body(fault, 0, 0)
            return True
        if fault.kind != "status":
            return False
        headers = dict(fault.headers)
        if fault.retry_after is not None:
            headers["Retry-After"] = str(fault.retry_after)
        if fault.ratelimit is not None:
            remaining, reset = fault.ratelimit
            headers["RateLimit"] = f'"api";r={remaining};t={reset}'
            headers["RateLimit-Policy"] = '"fixed window";"api";q=500;w=300'
        self._error(fault.status, body=f"injected {fault.status}", headers=headers)
        return True

    # -------------------------------------------------------------- routing

    def _route(self, method: str, path: str) -> None:
        if path.startswith("/_cdn/"):
            return self._cdn(method, path)
        if path in self.hub.urls:
            return self._serve_file(method, self.hub.urls[path], {})
        if path == "/api/models":
            return self._list_models()
        if path.startswith("/api/models/"):
            return self._model_api(path[len("/api/models/") :])
        if "/resolve/" in path:
            return self._resolve(method, path)
        self._error(404, body="Not Found")

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[len("Bearer ") :].strip() or None if auth.startswith("Bearer ") else None

    def _repo(self, repo_id: str) -> Repo | None:
        self.entry.repo = repo_id
        return self.hub.repos.get(repo_id)

    # -------------------------------------------------------------- resolve

    def _resolve(self, method: str, path: str) -> None:
        repo_part, _, rest = path.lstrip("/").partition("/resolve/")
        repo_id = unquote(repo_part)
        revision_raw, _, file_raw = rest.partition("/")
        revision, filename = unquote(revision_raw), unquote(file_raw)
        repo = self._repo(repo_id)
        refused = self.hub.check_access(repo, self._token(), repo_id)
        if refused:
            status, code, message = refused
            return self._error(status, code=code, body=message)
        commit = repo.commit(revision)
        if commit is None:
            return self._error(404, code="RevisionNotFound", body=f"Invalid rev id: {revision}")
        hosted = repo.files.get(filename)
        if hosted is None:
            return self._error(404, code="EntryNotFound", body=f"{filename} does not exist")
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hosted.git_oid}"'}
        if hosted.lfs:
            location = (
                f"http://127.0.0.1:{self.hub.cdn_port}/_cdn/{quote(repo_id)}/{hosted.sha256}/"
                f"{quote(filename)}?gen={self.hub.cdn_generation}"
            )
            headers.update(
                {
                    "Location": location,
                    "X-Linked-Size": str(hosted.size),
                    "X-Linked-Etag": f'"{hosted.sha256}"',
                    "ETag": f'"{hosted.sha256}"',
                }
            )
            return self._send(302, b"Found. Redirecting", headers, method)
        self._serve_file(method, hosted, headers)

    def _cdn(self, method: str, path: str) -> None:
        _, _, rest = path.partition("/_cdn/")
        repo_part, sha, file_part = _split_cdn(rest)
        repo = self._repo(unquote(repo_part))
        generation = self.query.get("gen", ["-1"])[0]
        if generation != str(self.hub.cdn_generation):
            return self._error(403, body="Request has expired")
        hosted = repo.files.get(unquote(file_part)) if repo else None
        if hosted is None or hosted.sha256 != sha:
            return self._error(404, body="NoSuchKey")
        self._serve_file(method, hosted, {})

    # -------------------------------------------------------------- files

    def _serve_file(self, method: str, hosted: HostedFile, headers: dict[str, str]) -> None:
        headers = {"ETag": f'"{hosted.sha256}"', **headers, "Accept-Ranges": "bytes"}
        start, end, status = 0, hosted.size, 200
        spec = self.headers.get("Range")
        if spec:
            parsed = _parse_range(spec, hosted.size)
            if parsed is None:
                headers["Content-Range"] = f"bytes */{hosted.size}"
                return self._error(416, body="Range Not Satisfiable", headers=headers)
            start, end = parsed
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{hosted.size}"
        self._send_stream(status, hosted, start, end, headers, method)

    def _send_stream(self, status, hosted: HostedFile, start, end, headers, method) -> None:
        fault = self.fault
        length = end - start
        announced = length + (fault.length_delta if fault and fault.kind == "wrong_length" else 0)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if fault and fault.kind == "headers":
            for key, value in fault.headers.items():
                self.send_header(key, value)
        self.send_header("Content-Length", str(announced))
        self.end_headers()
        self.entry.status = status
        if method == "HEAD":
            return
        limit = length
        if fault and fault.kind in ("reset", "truncate", "stall"):
            limit = fault.after_bytes if fault.after_bytes is not None else length // 2
        sent = 0
        for chunk in hosted.chunks(start, end):
            chunk = chunk[: max(0, limit - sent)]
            if not chunk:
                break
            if fault and fault.kind == "corrupt":
                chunk = _flip(chunk, (fault.after_bytes or 0) - sent)
            self.wfile.write(chunk)
            sent += len(chunk)
            self.entry.body_bytes += len(chunk)
            if self.hub.bandwidth:
                time.sleep(len(chunk) / self.hub.bandwidth)
        self._after_body(fault, sent, length)

    def _after_body(self, fault: Fault | None, sent: int, length: int) -> None:
        if fault is None or fault.kind in ("delay", "headers", "corrupt"):
            return
        if fault.kind == "stall":
            time.sleep(fault.delay)
        if fault.kind == "reset":
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        if fault.kind in ("reset", "truncate", "stall", "wrong_length"):
            with _suppress_oserror():
                self.connection.close()

    # -------------------------------------------------------------- API

    def _list_models(self) -> None:
        repos = self.hub.listing(self.query)
        cursor = int(self.query.get("cursor", ["0"])[0])
        limit = self.query.get("limit", [None])[0]
        page = self.hub.page_size if limit is None else min(int(limit), self.hub.page_size)
        chunk = repos[cursor : cursor + page]
        full = _truthy(self.query.get("full"))
        config = _truthy(self.query.get("config"))
        items = [self.hub.model_item(r, full=full, config=config) for r in chunk]
        headers = {}
        if cursor + page < len(repos):
            params = [(k, v) for k, values in self.query.items() if k != "cursor" for v in values]
            params.append(("cursor", str(cursor + page)))
            headers["Link"] = f'<{self.hub.endpoint}/api/models?{urlencode(params)}>; rel="next"'
        self._json(items, headers)

    def _model_api(self, rest: str) -> None:
        repo_id, tail = _split_repo(rest, self.hub.repos)
        repo = self._repo(repo_id)
        token = self._token()
        refused = self.hub.check_access(repo, token, repo_id)
        if refused and refused[1] != "GatedRepo":  # gated repos' metadata is public
            status, code, message = refused
            return self._error(status, code=code, body=message)
        revision = "main"
        if tail.startswith("revision/"):
            revision = unquote(tail[len("revision/") :])
        elif tail.startswith("tree/"):
            revision = unquote(tail[len("tree/") :].split("/", 1)[0])
        elif tail:
            return self._error(404, body="Not Found")
        commit = repo.commit(revision)
        if commit is None:
            return self._error(404, code="RevisionNotFound", body=f"Invalid rev id: {revision}")
        if tail.startswith("tree/"):
            return self._json([_tree_entry(f) for f in repo.files.values()], {})
        item = self.hub.model_item(
            repo, full=True, config=True, blobs=_truthy(self.query.get("blobs"))
        )
        item["sha"] = commit
        self._json(item, {})

    # -------------------------------------------------------------- responses

    def _json(self, data: Any, headers: dict[str, str]) -> None:
        body = json.dumps(data).encode()
        hosted = HostedFile("response.json", body)
        self._send_stream(
            200,
            hosted,
            0,
            len(body),
            {"Content-Type": "application/json", **headers},
            self.command,
        )

    def _error(self, status: int, *, code: str | None = None, body: str = "", headers=None) -> None:
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
            headers["X-Error-Message"] = body
        payload = json.dumps({"error": body}).encode()
        self._send(status, payload, {"Content-Type": "application/json", **headers}, self.command)

    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.entry.status = status
        if method != "HEAD":
            self.wfile.write(body)
            self.entry.body_bytes += len(body)


# ----------------------------------------------------------------------------- helpers


class _suppress_oserror:  # noqa: N801 - used like contextlib.suppress
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def _flip(chunk: bytes, at: int) -> bytes:
    if not 0 <= at < len(chunk):
        return chunk
    return chunk[:at] + bytes([chunk[at] ^ 0xFF]) + chunk[at + 1 :]


def _parse_range(spec: str, size: int) -> tuple[int, int] | None:
    """``[start, end)`` for a single ``bytes=`` range, ``None`` if unsatisfiable."""
    unit, _, ranges = spec.partition("=")
    if unit.strip() != "bytes" or "," in ranges:
        return None
    first, _, last = ranges.strip().partition("-")
    if first == "":
        n = int(last)
        return (max(0, size - n), size) if n > 0 and size else None
    start = int(first)
    end = size if last == "" else min(size, int(last) + 1)
    if start >= size or end <= start:
        return None
    return start, end


def _split_cdn(rest: str) -> tuple[str, str, str]:
    """``repo/.../<sha256>/<file>`` -> (repo, sha256, file)."""
    segments = rest.split("/")
    for i, segment in enumerate(segments):
        if len(segment) == 64 and all(c in "0123456789abcdef" for c in segment):
            return "/".join(segments[:i]), segment, "/".join(segments[i + 1 :])
    return rest, "", ""


def _split_repo(rest: str, repos: Mapping[str, Repo]) -> tuple[str, str]:
    """Split ``org/name/revision/x`` into the repo id and the rest (known ids first)."""
    segments = rest.split("/")
    for n in (2, 1):
        candidate = "/".join(segments[:n])
        if unquote(candidate) in repos:
            return unquote(candidate), "/".join(segments[n:])
    n = 2 if len(segments) >= 2 and segments[1] not in ("revision", "tree") else 1
    return unquote("/".join(segments[:n])), "/".join(segments[n:])


def _sibling(f: HostedFile, blobs: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rfilename": f.name}
    if blobs:
        entry.update(size=f.size, blobId=f.git_oid)
        if f.lfs:
            entry["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


def _tree_entry(f: HostedFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"type": "file", "oid": f.git_oid, "size": f.size, "path": f.name}
    if f.lfs:
        entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": 134}
    return entry


def _sort_key(repo: Repo, sort: str) -> Any:
    if sort in ("id", "modelId"):
        return repo.repo_id
    value = repo.info.get(sort, 0)
    return value if value is not None else 0


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[0].lower() in ("1", "true", "yes")


# ----------------------------------------------------------------------------- fixture


@pytest.fixture
def hub() -> Iterator[HubServer]:
    """A started :class:`HubServer`, stopped after the test."""
    server = HubServer().start()
    try:
        yield server
    finally:
        server.stop()


def free_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Isolate a test from the user's hub environment: empty cache, no token, online."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    os.makedirs(tmp_path / "hf_home" / "hub", exist_ok=True)


# ------------------------------------------------------------------------ checkpoints


CHECKPOINT_FORMATS = ("safetensors", "torch-zip", "torch-legacy", "npz")


def write_checkpoint(path: Path, state_dict: Mapping[str, Any], fmt: str) -> Path:
    """Write ``state_dict`` (tensors, possibly nested for torch) with the real library
    of ``fmt``: ``safetensors.torch.save_file``, ``torch.save`` (zip or legacy) or
    ``numpy.savez``."""
    import numpy as np
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif fmt == "torch-zip":
        torch.save(state_dict, path)
    elif fmt == "torch-legacy":
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    elif fmt == "npz":
        np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})
        written = path.with_name(path.name + ".npz")
        if not path.exists() and written.exists():
            written.rename(path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    return path


def random_state_dict(model: Any, seed: int = 0) -> dict[str, Any]:
    """A real model's state-dict keys, shapes and dtypes with random values (works
    for models built on the ``meta`` device, which is fast and weight-free)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            out[key] = torch.randn(value.shape, generator=generator, dtype=torch.float32).to(
                value.dtype
            )
        else:
            out[key] = torch.zeros(value.shape, dtype=value.dtype)
    return out
