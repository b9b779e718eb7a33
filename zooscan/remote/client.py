"""HTTP access to a Hugging Face compatible hub (or any plain URL), built for scans.

One :class:`HubClient` serves a whole scan and is shared by its worker threads. Its
requests go through ``huggingface_hub``'s shared HTTP client
(``huggingface_hub.get_session()``: connection pooling, proxies from the environment,
TLS trust store, the library's request hooks); the client streams each body itself,
so every byte received is counted, and keeps every failure mode under zooscan's
control:

- **Retries with back-off.** HTTP 408/429/500/502/503/504, connection errors and
  resets, timeouts and bodies that end early (fewer bytes than ``Content-Length``, or
  than the requested range) are retried with exponential back-off and jitter, at most
  ``max_retries`` times and never beyond ``max_elapsed`` seconds per call. Whatever a
  caller receives has been length-checked; when retries run out the call raises
  :class:`HubUnavailable` (a :class:`~zooscan.errors.CheckpointError`), never returns
  partial data. When the retries of a call run out because no server answered at all
  (connection refused, reset before a response), the origin is marked down for
  ``backoff_max`` seconds: calls in that time try once, so a scan whose hub went away
  records its failures quickly instead of every model waiting out the back-off.
- **Rate limits.** A ``Retry-After`` (seconds or HTTP date) on 429/503 is honoured as
  given, and a 429 pauses *every* worker talking to that origin (the hub, or its CDN)
  for that long. The
  hub's ``RateLimit: "api";r=R;t=T`` header is read on every response: with ``R = 0``
  the origin is paused for ``T`` seconds; with few requests left the client spaces its
  requests evenly over the rest of the window, so a scan paces itself.
- **Hub conventions.** ``resolve`` issues a ``HEAD`` on ``/{repo}/resolve/{rev}/{file}``
  and reads ``X-Repo-Commit``, ``X-Linked-Size`` and ``X-Linked-Etag`` like
  ``huggingface_hub`` does, following redirects on the hub and stopping at the first
  redirect that leaves it (a CDN URL). The token goes only to the hub's own origin,
  never to a CDN. Errors carry the hub's ``X-Error-Code`` meaning (repository not
  found, file not found, revision not found, gated).
- **Environment.** ``HF_ENDPOINT`` (read when the client is made, not when a library
  was imported), ``HF_TOKEN`` / the token file (through ``huggingface_hub.get_token``),
  ``HF_HUB_OFFLINE`` (no request is ever made; cached files are used), the hub cache
  (``HF_HUB_CACHE`` / ``HF_HOME``), and ``HTTP(S)_PROXY`` / ``NO_PROXY`` (through
  ``huggingface_hub``'s client).
- **Cache first.** A file present in the Hugging Face cache for the wanted commit is
  returned as a :class:`RemoteFile` with ``local_path`` set; readers then read it from
  disk and nothing crosses the network.
"""

from __future__ import annotations

import email.utils
import errno
import hashlib
import json as jsonlib
import os
import random
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, urlencode, urljoin, urlsplit

import zooscan
from zooscan.errors import CheckpointError
from zooscan.remote.cache import cached_file, hub_cache_dir

__all__ = [
    "DEFAULT_ENDPOINT",
    "HubAccessDenied",
    "HubClient",
    "HubNotFound",
    "HubOffline",
    "HubUnavailable",
    "RemoteFile",
]

DEFAULT_ENDPOINT = "https://huggingface.co"
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_MAX_REDIRECTS = 8
_RATELIMIT = re.compile(r'"?(?P<kind>[\w-]+)"?\s*;\s*r\s*=\s*(?P<r>\d+)\s*;\s*t\s*=\s*(?P<t>\d+)')
_RATELIMIT_POLICY = re.compile(r"q\s*=\s*(?P<q>\d+).*?w\s*=\s*(?P<w>\d+)")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_PACE_BELOW = 10
"""Start spacing requests out when a rate-limit window has fewer requests left."""


# ------------------------------------------------------------------------------ errors


def is_repo_path(name: str) -> bool:
    """True for a relative path inside a repository: no ``..`` part, not absolute, no
    backslash or drive, no control character."""
    parts = name.split("/")
    return bool(name) and not (
        name.startswith("/")
        or "\\" in name
        or ":" in parts[0]
        or any(part in ("", ".", "..") for part in parts)
        or any(ord(ch) < 32 for ch in name)
    )


class _HubError(CheckpointError):
    """A refusal from the hub, with its ``X-Error-Code`` when it sent one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        """The hub's ``X-Error-Code`` (``RepoNotFound``, ``EntryNotFound``,
        ``RevisionNotFound``, ``GatedRepo``...), or ``None`` when it sent none."""

    def __reduce__(self) -> tuple[Any, ...]:  # keep ``code`` across processes
        return (type(self), (str(self), self.code))


class HubNotFound(_HubError):
    """The repository, revision or file does not exist (or is private and no token
    grants access). :attr:`code` is the hub's ``X-Error-Code`` (``RepoNotFound``,
    ``EntryNotFound``, ``RevisionNotFound``), ``None`` when absent."""


class HubAccessDenied(_HubError):
    """The hub refuses access: a gated repository, a bad token, or no permission.
    :attr:`code` is the hub's ``X-Error-Code`` (``GatedRepo``...), ``None`` when absent."""


class HubUnavailable(CheckpointError):
    """The server kept failing (5xx, resets, rate limits, timeouts) until the retry
    budget ran out; the same request may succeed later."""


class HubOffline(CheckpointError):
    """Offline mode (``HF_HUB_OFFLINE``) and the file is not in the local cache."""


class _Transient(Exception):
    """A failure worth retrying (network error, short body, 5xx...)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class _Unreachable(_Transient):
    """No response at all: the connection could not be made or broke before one."""


class _NoConnection(_Unreachable):
    """The connection was refused or the host not found: the network said no at once
    (offline, wrong endpoint), so only :data:`CONNECT_ATTEMPTS` tries are made."""


CONNECT_ATTEMPTS = 3
"""Tries when the connection itself fails (refused, unknown host, no route)."""


def _refused_at_once(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionRefusedError, socket.gaierror)) or getattr(
        exc, "errno", None
    ) in (errno.ENETUNREACH, errno.EHOSTUNREACH)


class _Truncated(_Transient):
    """A body that ended early; ``response`` holds what arrived."""

    def __init__(self, reason: str, response: _Response) -> None:
        super().__init__(reason)
        self.response = response


# ----------------------------------------------------------------------------- records


@dataclass
class RemoteFile:
    """A file on the hub (or at a plain URL), located but not downloaded."""

    url: str
    """Where the bytes are read: the hub's resolve URL or the CDN URL it redirected to."""
    repo: str | None
    """Repository id (``org/name``); ``None`` for a plain URL."""
    revision: str | None
    """Commit sha the hub resolved (``X-Repo-Commit``), else the requested revision."""
    filename: str
    """Path of the file in the repository (the last URL segment for a plain URL)."""
    size: int | None
    """Size in bytes (``X-Linked-Size`` / ``Content-Length``), ``None`` when unknown."""
    etag: str | None
    """Entity tag without quotes; for LFS files the hub's etag is the sha256 of the file."""
    resolve_url: str | None = None
    """The URL that was resolved (used to locate the file again when a CDN URL expires)."""
    local_path: str | None = None
    """A complete local copy (the Hugging Face cache): readers use it, no network."""
    repo_type: str = "model"
    content_etag: str | None = field(default=None, compare=False)
    """The ``ETag`` the server that sends the bytes gave on the first read; later reads
    must carry the same one (the file did not change between reads)."""

    @property
    def sha256(self) -> str | None:
        """The file's sha256 when the etag is one (LFS files), else ``None``."""
        return self.etag if self.etag and _SHA256.match(self.etag) else None

    @property
    def display(self) -> str:
        """``repo/filename@revision`` or the URL, for messages."""
        if self.repo:
            rev = f"@{self.revision[:12]}" if self.revision else ""
            return f"{self.repo}/{self.filename}{rev}"
        return self.url


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str
    incomplete: bool = False
    """The body ended early (only for resumable requests; the caller resumes)."""

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


@dataclass
class _Meter:
    bytes: int = 0
    requests: int = 0
    retries: int = 0


@dataclass
class _OriginState:
    pause_until: float = 0.0
    next_slot: float = 0.0
    interval: float = 0.0
    interval_until: float = 0.0
    down_until: float = 0.0
    """Until then the origin is taken to be down: calls try once instead of retrying."""


# ------------------------------------------------------------------------------ client


class HubClient:
    """Thread-safe HTTP client for hub files and API calls (see the module docstring).

    ``endpoint`` defaults to ``$HF_ENDPOINT`` or ``https://huggingface.co``; ``token``
    to ``huggingface_hub``'s own resolution (``HF_TOKEN``, the token file; pass
    ``False`` for none); ``offline`` to ``HF_HUB_OFFLINE``; ``cache_dir`` to the hub
    cache (``HF_HUB_CACHE``, ``$HF_HOME/hub``). ``max_retries`` bounds the retries of
    one call and ``max_elapsed`` its total time (seconds, waits included).
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        token: str | bool | None = None,
        max_retries: int = 8,
        timeout: float = 30.0,
        offline: bool | None = None,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        max_elapsed: float = 900.0,
        cache_dir: str | os.PathLike | None = None,
        user_agent: str | None = None,
    ) -> None:
        self.endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.token = _resolve_token(token)
        self.max_retries = max(0, int(max_retries))
        self.timeout = float(timeout)
        self.offline = _env_offline() if offline is None else bool(offline)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.max_elapsed = float(max_elapsed)
        self.cache_dir = str(cache_dir) if cache_dir is not None else hub_cache_dir()
        self.user_agent = user_agent or f"zooscan/{zooscan.__version__}; httpx2"
        self.bytes_fetched = 0
        self.requests = 0
        self.retries = 0
        self._lock = threading.Lock()
        self._origins: dict[tuple[str, str, int], _OriginState] = {}
        self._local = threading.local()
        self._closed = threading.Event()
        self._hub_origin = _origin(self.endpoint)

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Make waiting or future calls fail at once. The connections belong to
        ``huggingface_hub``'s shared client and stay open for its other users."""
        self._closed.set()

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def meter(self) -> Iterator[_Meter]:
        """Count the bytes, requests and retries of the calls made by *this thread*
        inside the block (other workers sharing the client are not counted)."""
        meters = self._meters()
        meter = _Meter()
        meters.append(meter)
        try:
            yield meter
        finally:
            meters.remove(meter)

    # -------------------------------------------------------------- public API

    def file_url(
        self, repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model"
    ) -> str:
        """The hub's resolve URL of ``filename`` in ``repo_id`` at ``revision``."""
        prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}.get(repo_type)
        if prefix is None:
            raise CheckpointError(f"unknown repo type {repo_type!r} (model, dataset or space)")
        rev = quote(revision or "main", safe="")
        return f"{self.endpoint}/{prefix}{repo_id}/resolve/{rev}/{quote(filename)}"

    def cached(
        self, repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model"
    ) -> str | None:
        """Path of ``filename`` in the local hub cache for ``revision`` (a branch, tag
        or commit sha; ``main`` by default), or ``None``. Makes no request."""
        return cached_file(self.cache_dir, repo_id, filename, revision or "main", repo_type)

    def resolve(
        self, repo_id: str, filename: str, revision: str | None = None, repo_type: str = "model"
    ) -> RemoteFile:
        """Locate ``filename`` in ``repo_id``: commit sha, size, etag and the URL to read.

        Cache first: a file cached for an exact commit sha (or, offline, for the
        revision's cached ref) is returned with ``local_path`` and no request. Online,
        one ``HEAD`` finds the commit; if that commit's file is cached it is used.
        Raises :class:`HubNotFound`, :class:`HubAccessDenied`, :class:`HubOffline` or
        :class:`HubUnavailable`.
        """
        if not is_repo_path(filename):
            raise CheckpointError(
                f"{repo_id}: refusing file name {filename!r}: not a path inside the repository"
            )
        rev = revision or "main"
        if _SHA1.match(rev) or self.offline:
            local = self.cached(repo_id, filename, rev, repo_type)
            if local:
                return self._local_file(repo_id, filename, rev, repo_type, local)
        url = self.file_url(repo_id, filename, rev, repo_type)
        if self.offline:
            raise HubOffline(
                f"offline (HF_HUB_OFFLINE is set) and {repo_id}/{filename}@{rev} is not in the "
                f"Hugging Face cache ({self.cache_dir})"
            )
        context = {"repo": repo_id, "filename": filename, "revision": rev}
        found = self._locate(url, context)
        commit = found.revision or rev
        local = self.cached(repo_id, filename, commit, repo_type) if found.revision else None
        return RemoteFile(
            url=found.url,
            repo=repo_id,
            revision=commit,
            filename=filename,
            size=found.size,
            etag=found.etag,
            resolve_url=url,
            local_path=local,
            repo_type=repo_type,
        )

    def url_file(self, url: str) -> RemoteFile:
        """Locate a plain URL (timm's URL-only weights, torchvision): size and etag
        from a ``HEAD`` (redirects followed; a server refusing ``HEAD`` is asked for
        its first byte instead)."""
        if self.offline:
            raise HubOffline(f"offline (HF_HUB_OFFLINE is set): cannot reach {url}")
        found = self._locate(url, {"url": url}, follow_all=True)
        name = urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1] or url
        return RemoteFile(
            url=found.url,
            repo=None,
            revision=None,
            filename=name,
            size=found.size,
            etag=found.etag,
            resolve_url=url,
        )

    def read_range(self, f: RemoteFile, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``f`` (end exclusive), exactly ``end - start`` of them.

        A local copy is read from disk. Over the network the response must be a 206
        whose ``Content-Range`` matches the request and whose body has the requested
        length (anything else is retried). Raises :class:`CheckpointError` for a range
        outside the file.
        """
        if start < 0 or end < start:
            raise CheckpointError(f"{f.display}: bad byte range [{start}, {end})")
        if f.size is not None and end > f.size:
            raise CheckpointError(
                f"{f.display}: byte range [{start}, {end}) is outside the file ({f.size} bytes)"
            )
        if end == start:
            return b""
        if f.local_path:
            return _read_local(f.local_path, start, end)
        headers = {"Range": f"bytes={start}-{end - 1}"}

        def check(resp: _Response) -> None:
            _check_range(resp, f, start, end)

        what = f"bytes {start}-{end - 1} of {f.display}"
        resp = self._file_get(f, headers, check, what, body_limit=end)
        return resp.body

    def read_all(self, f: RemoteFile) -> bytes:
        """The whole file (legacy formats that cannot be read by ranges).

        Verified against ``Content-Length``, the size found by :meth:`resolve` and,
        for LFS files, the sha256 etag. A download cut short resumes with a range
        request from where it stopped instead of starting over.
        """
        if f.local_path:
            with open(f.local_path, "rb") as fh:
                return fh.read()
        buf = bytearray()
        for _ in range(self.max_retries + 1):
            offset = len(buf)
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            what = f.display + (f" from byte {offset}" if offset else "")
            accept = frozenset({416}) if offset else frozenset()
            resp = self._file_get(f, headers, None, what, accept=accept, resumable=True)
            if resp.status == 416:  # nothing after `offset`: a Content-Length said more
                if _content_range_total(resp.header("Content-Range")) != offset:
                    raise HubUnavailable(
                        f"{f.display}: resuming at byte {offset} was refused "
                        f"({resp.header('Content-Range')!r})"
                    )
                break
            if resp.status == 206:
                _check_resume(resp, f, offset)
            else:
                buf.clear()  # a 200 (Range ignored or not sent) starts at byte 0
            buf += resp.body
            if not resp.incomplete and (f.size is None or len(buf) >= f.size):
                break
            self._count(retries=1)  # cut short (or a lying Content-Length): resume
        else:
            raise HubUnavailable(
                f"{f.display}: download still incomplete after {self.max_retries + 1} attempts "
                f"({len(buf)} bytes)"
            )
        self._confirm_size(f, len(buf))
        _check_whole(f, bytes(buf))
        return bytes(buf)

    def _confirm_size(self, f: RemoteFile, received: int) -> None:
        """When a whole download's size differs from the size :meth:`resolve` got from
        a ``HEAD`` for a file no sha256 vouches for, one of the ``Content-Length``
        headers lied: locate the file again for its size (``f.size`` updated; the
        caller then checks the download against it)."""
        if f.size in (None, received) or f.sha256 or not f.resolve_url:
            return
        context = _file_context(f) if f.repo else {"url": f.resolve_url}
        self._count(retries=1)
        f.size = self._locate(f.resolve_url, context, follow_all=f.repo is None).size

    def json(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """``GET {endpoint}{path}`` (``path`` like ``/api/models``; a full URL is used
        as is) with retries; the decoded JSON. List values in ``params`` repeat the
        key (``filter=a&filter=b``)."""
        return self._json_page(self._api_url(path, params))[0]

    def iter_json_pages(
        self, path: str, params: Mapping[str, Any] | None = None, max_pages: int = 1000
    ) -> Iterator[Any]:
        """Yield each page of a paginated listing, following ``Link: <...>; rel="next"``
        (at most ``max_pages`` pages)."""
        url: str | None = self._api_url(path, params)
        for _ in range(max_pages):
            if url is None:
                return
            data, url = self._json_page(url)
            yield data

    # ------------------------------------------------------------ file helpers

    def _local_file(self, repo_id, filename, rev, repo_type, local: str) -> RemoteFile:
        commit = _commit_from_snapshot_path(local) or rev
        return RemoteFile(
            url=self.file_url(repo_id, filename, commit, repo_type),
            repo=repo_id,
            revision=commit,
            filename=filename,
            size=os.path.getsize(local),
            etag=None,
            resolve_url=self.file_url(repo_id, filename, rev, repo_type),
            local_path=local,
            repo_type=repo_type,
        )

    def _locate(self, url: str, context: dict[str, str], follow_all: bool = False) -> RemoteFile:
        """Follow ``HEAD`` redirects from ``url``; gather the hub's file headers."""
        found = RemoteFile(url=url, repo=None, revision=None, filename="", size=None, etag=None)
        for _ in range(_MAX_REDIRECTS):
            resp = self._request("HEAD", url, {}, None, _describe(context))
            if resp.status == 405 or (resp.status == 403 and follow_all and not found.size):
                return self._locate_by_get(url, found, context)
            self._raise_for_status(resp, context)
            _gather_file_headers(found, resp)
            location = resp.header("Location")
            if resp.status // 100 != 3 or not location:
                found.url = url
                if found.size is None and resp.header("Content-Length"):
                    found.size = int(resp.header("Content-Length"))
                return found
            target = urljoin(url, location)
            found.url = target
            if not follow_all and _origin(target) != _origin(url):
                return found
            url = target
        raise CheckpointError(f"{_describe(context)}: more than {_MAX_REDIRECTS} redirects")

    def _locate_by_get(self, url: str, found: RemoteFile, context) -> RemoteFile:
        resp = self._follow("GET", url, {"Range": "bytes=0-0"}, None, _describe(context))
        self._raise_for_status(resp, context)
        total = _content_range_total(resp.header("Content-Range"))
        found.url = resp.url
        found.size = total if total is not None else found.size
        found.etag = found.etag or _normalize_etag(resp.header("ETag"))
        return found

    def _file_get(
        self, f: RemoteFile, headers, check, what: str, accept=frozenset(), **options
    ) -> _Response:
        """GET on ``f.url`` (redirects followed); an expired or moved CDN URL (403,
        404, 410 off the hub) is located again once through ``f.resolve_url``. An error
        status in ``accept`` is returned instead of raised."""
        resp = self._follow("GET", f.url, headers, check, what, file=f, **options)
        expired = resp.status in (403, 404, 410) and _origin(f.url) != self._hub_origin
        if expired and f.resolve_url and f.resolve_url != f.url:
            context = _file_context(f) if f.repo else {"url": f.resolve_url}
            fresh = self._locate(f.resolve_url, context, follow_all=f.repo is None)
            f.url = fresh.url
            resp = self._follow("GET", f.url, headers, check, what, file=f, **options)
        if resp.status not in accept:
            self._raise_for_status(resp, _file_context(f))
        return resp

    def _api_url(self, path: str, params: Mapping[str, Any] | None) -> str:
        url = path if "://" in path else f"{self.endpoint}/{path.lstrip('/')}"
        if params:
            items = []
            for key, value in params.items():
                if value is None:
                    continue
                values = value if isinstance(value, (list, tuple)) else [value]
                items += [(key, _param(v)) for v in values]
            url += ("&" if "?" in url else "?") + urlencode(items)
        return url

    def _json_page(self, url: str) -> tuple[Any, str | None]:
        if self.offline:
            raise HubOffline(f"offline (HF_HUB_OFFLINE is set): cannot query {url}")

        def check(resp: _Response) -> None:
            if resp.status == 200:
                try:
                    jsonlib.loads(resp.body)
                except ValueError as exc:
                    raise _Transient(f"invalid JSON from {url} ({exc})") from exc

        resp = self._follow("GET", url, {"Accept": "application/json"}, check, url)
        self._raise_for_status(resp, {"url": url})
        return jsonlib.loads(resp.body), _next_link(resp.header("Link"), url)

    # ------------------------------------------------------------ HTTP engine

    def _follow(self, method, url, headers, check, what, *, file=None, **options) -> _Response:
        """A request with redirects followed (the token is dropped off the hub)."""
        for _ in range(_MAX_REDIRECTS):
            resp = self._request(method, url, headers, check, what, **options)
            location = resp.header("Location")
            if resp.status // 100 != 3 or not location:
                return resp
            url = urljoin(url, location)
            if file is not None and _origin(url) != self._hub_origin:
                file.url = url
        raise CheckpointError(f"{what}: more than {_MAX_REDIRECTS} redirects")

    def _request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        check: Callable[[_Response], None] | None,
        what: str,
        *,
        resumable: bool = False,
        body_limit: int | None = None,
    ) -> _Response:
        """One logical request, retried on transient failures (see the module doc)."""
        if self.offline:
            raise HubOffline(f"offline (HF_HUB_OFFLINE is set): {what} needs the network")
        deadline = time.monotonic() + self.max_elapsed
        origin = _origin(url)
        allowed = 1 if self._is_down(origin) else self.max_retries + 1
        attempts = 0
        while True:
            self._wait_turn(origin, deadline, what)
            delay = None
            try:
                resp = self._attempt(method, url, headers, deadline, body_limit)
                self._note_rate_limit(origin, resp)
                self._set_down(origin, False)
                if resp.status in RETRY_STATUSES:
                    raise _Transient(_status_reason(resp), _retry_after(resp))
                if check is not None and resp.status // 100 == 2:
                    check(resp)
                return resp
            except _Truncated as exc:
                if resumable and exc.response.body and exc.response.status in (200, 206):
                    return exc.response
                reason, delay, unreachable = str(exc), exc.delay, False
            except _Transient as exc:
                reason, delay = str(exc), exc.delay
                unreachable = isinstance(exc, _Unreachable)
                if isinstance(exc, _NoConnection):
                    allowed = min(allowed, CONNECT_ATTEMPTS)
            attempts += 1
            wait = delay if delay is not None else self._backoff(attempts)
            if attempts >= allowed:
                if unreachable:
                    self._set_down(origin, True)
                down = " (the server seems down: later calls try once)" if unreachable else ""
                raise HubUnavailable(f"{what}: gave up after {attempts} attempts ({reason}){down}")
            if time.monotonic() + wait > deadline:
                raise HubUnavailable(
                    f"{what}: gave up ({reason}; the next try would pass the "
                    f"{self.max_elapsed:.0f} s limit)"
                )
            if _is_rate_limited(reason):
                self._pause(origin, wait)
            self._count(retries=1)
            self._sleep(wait)

    def _attempt(self, method, url, headers, deadline, body_limit) -> _Response:
        """Send once through ``huggingface_hub``'s shared HTTP client (redirects are
        not followed here: :meth:`_follow` and :meth:`_locate` do that) and read the
        whole body; network trouble becomes :class:`_Transient`."""
        httpx, session, offline_error = _transport()
        request = session.build_request(
            method, url, headers=self._headers(url, headers), timeout=self.timeout
        )
        try:
            raw = session.send(request, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            raise _connection_failure(exc) from exc
        except offline_error as exc:
            raise HubOffline(f"offline (HF_HUB_OFFLINE is set): {url} needs the network") from exc
        try:
            self._count(requests=1)
            resp = _Response(raw.status_code, raw.headers, b"", url)
            if method != "HEAD":
                limit = body_limit if raw.status_code == 200 else None
                resp.body = self._read_body(httpx, raw, resp, deadline, limit)
            return resp
        finally:
            raw.close()  # a body left unread closes the connection instead of reusing it

    def _read_body(self, httpx, raw, resp: _Response, deadline: float, limit: int | None) -> bytes:
        """The body, checked against ``Content-Length``; with ``limit`` only that many
        leading bytes are kept (the connection is then closed, not reused)."""
        expected = raw.headers.get("Content-Length")
        length = int(expected) if expected and expected.strip().isdigit() else None
        stop = length if limit is None or (length is not None and length <= limit) else limit
        chunks: list[bytes] = []
        got = 0
        try:
            for chunk in raw.iter_raw():
                self._count(nbytes=len(chunk))
                if stop is not None and got + len(chunk) > stop:
                    chunk = chunk[: stop - got]
                chunks.append(chunk)
                got += len(chunk)
                if stop is not None and got >= stop:
                    break
                if time.monotonic() > deadline:
                    raise _Transient(f"body too slow ({got} bytes in {self.max_elapsed:.0f} s)")
        except httpx.TransportError as exc:
            resp.body, resp.incomplete = b"".join(chunks), True
            if isinstance(exc, httpx.RemoteProtocolError) and stop is not None:
                # The server closed the connection before Content-Length was reached.
                raise _Truncated(f"truncated body: {got} of {stop} bytes", resp) from exc
            raise _Truncated(
                f"connection broke after {got} bytes ({type(exc).__name__})", resp
            ) from exc
        if stop is not None and got < stop:
            resp.body, resp.incomplete = b"".join(chunks), True
            raise _Truncated(f"truncated body: {got} of {stop} bytes", resp)
        return b"".join(chunks)

    def _headers(self, url: str, extra: Mapping[str, str]) -> dict[str, str]:
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        if self.token and _origin(url) == self._hub_origin:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra)
        return headers

    # ------------------------------------------------------------ origin state

    def _state(self, origin) -> _OriginState:
        state = self._origins.get(origin)
        if state is None:
            state = self._origins[origin] = _OriginState()
        return state

    # ------------------------------------------------------------ pacing

    def _wait_turn(self, origin, deadline: float, what: str) -> None:
        """Wait for a pause on ``origin`` to end and for this request's pacing slot."""
        if self._closed.is_set():
            raise HubUnavailable(f"{what}: the client was closed")
        with self._lock:
            state = self._state(origin)
            now = time.monotonic()
            start = max(now, state.pause_until)
            if state.interval and now < state.interval_until:
                start = max(start, state.next_slot)
                state.next_slot = start + state.interval
        if start > deadline:
            raise HubUnavailable(
                f"{what}: rate limited for {start - time.monotonic():.0f} s more, past the "
                f"{self.max_elapsed:.0f} s limit"
            )
        self._sleep(start - time.monotonic())
        if self._closed.is_set():
            raise HubUnavailable(f"{what}: the client was closed")

    def _is_down(self, origin) -> bool:
        with self._lock:
            return self._state(origin).down_until > time.monotonic()

    def _set_down(self, origin, down: bool) -> None:
        """Mark ``origin`` down for ``backoff_max`` seconds (or up again): while it is
        down each call makes one attempt, so a scan fails fast instead of every model
        waiting out the whole back-off."""
        with self._lock:
            state = self._state(origin)
            state.down_until = time.monotonic() + self.backoff_max if down else 0.0

    def _pause(self, origin, seconds: float) -> None:
        with self._lock:
            state = self._state(origin)
            state.pause_until = max(state.pause_until, time.monotonic() + seconds)

    def _note_rate_limit(self, origin, resp: _Response) -> None:
        """Pace by the ``RateLimit`` header: pause when the window is spent, space the
        requests out when it is nearly spent."""
        info = _parse_rate_limit(resp.header("RateLimit"), resp.header("RateLimit-Policy"))
        if info is None:
            return
        remaining, reset = info
        with self._lock:
            state = self._state(origin)
            now = time.monotonic()
            if remaining == 0 and resp.status != 429:
                state.pause_until = max(state.pause_until, now + reset)
            if remaining < _PACE_BELOW and reset > 0:
                state.interval = reset / (remaining + 1)
                state.interval_until = now + reset
                state.next_slot = max(state.next_slot, now)
            elif now >= state.interval_until:
                state.interval = 0.0

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._closed.wait(seconds)

    # ------------------------------------------------------------ counters

    def _meters(self) -> list[_Meter]:
        meters = getattr(self._local, "meters", None)
        if meters is None:
            meters = self._local.meters = []
        return meters

    def _count(self, nbytes: int = 0, requests: int = 0, retries: int = 0) -> None:
        with self._lock:
            self.bytes_fetched += nbytes
            self.requests += requests
            self.retries += retries
        for meter in self._meters():
            meter.bytes += nbytes
            meter.requests += requests
            meter.retries += retries

    # ------------------------------------------------------------ errors

    def _raise_for_status(self, resp: _Response, context: Mapping[str, str]) -> None:
        """Turn a final error response into one clear :class:`CheckpointError`."""
        if resp.status < 400:
            return
        code = resp.header("X-Error-Code") or None
        server_message = resp.header("X-Error-Message") or ""
        what = _describe(context)
        repo = context.get("repo")
        hint = "" if self.token else " (no token: set HF_TOKEN if it is private)"
        if code == "GatedRepo":
            raise HubAccessDenied(
                f"{what}: {repo or 'the repository'} is gated: accept its conditions on the hub "
                f"page and use a token with access (HF_TOKEN)",
                code,
            )
        if code == "EntryNotFound":
            raise HubNotFound(f"{what}: no such file in {repo or 'the repository'}", code)
        if code == "RevisionNotFound":
            raise HubNotFound(
                f"{what}: revision {context.get('revision')!r} not found in {repo}", code
            )
        if code == "RepoNotFound" or (resp.status == 401 and repo):
            name = f"repository {repo}" if repo else "repository"
            raise HubNotFound(f"{what}: {name} not found on {self.endpoint}{hint}", code)
        if resp.status in (401, 403):
            detail = f": {server_message}" if server_message else ""
            raise HubAccessDenied(f"{what}: access denied (HTTP {resp.status}){detail}{hint}", code)
        if resp.status == 404:
            raise HubNotFound(f"{what}: not found (HTTP 404)", code)
        if resp.status == 416:
            raise CheckpointError(
                f"{what}: range not satisfiable (file has {resp.header('Content-Range')})"
            )
        detail = f": {server_message}" if server_message else ""
        raise CheckpointError(f"{what}: HTTP {resp.status}{detail}")


# ----------------------------------------------------------------------------- helpers


def _resolve_token(token: str | bool | None) -> str | None:
    if token is False:
        return None
    if isinstance(token, str):
        return token or None
    env = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if env:
        return env.strip() or None
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - huggingface_hub is optional
        return None
    try:
        return get_token()
    except Exception:  # a broken token file or OIDC exchange must not break a scan
        return None


def _env_offline() -> bool:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    return False


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return scheme, (parts.hostname or "").lower(), port


def _transport() -> tuple[Any, Any, type[Exception]]:
    """``(httpx2 module, huggingface_hub's shared client, its offline error)``.

    The shared client (``huggingface_hub.get_session()``) carries the environment's
    proxies, TLS trust store and huggingface_hub's request hooks; it adds no token of
    its own (:meth:`HubClient._headers` sends it, to the hub's origin only).
    """
    try:
        import httpx2
        from huggingface_hub import get_session
        from huggingface_hub.errors import OfflineModeIsEnabled
    except ImportError as exc:
        raise CheckpointError(
            f"hub access needs huggingface_hub >= 2.4 (pip install 'zooscan[hub]'): {exc}"
        ) from exc
    return httpx2, get_session(), OfflineModeIsEnabled


def _connection_failure(exc: BaseException) -> _Unreachable:
    """A failure before any response: :class:`_NoConnection` when the network said no
    at once (refused, unknown host, no route), else :class:`_Unreachable`."""
    cause: BaseException | None = exc
    seen = 0
    while cause is not None and seen < 16:
        if _refused_at_once(cause):
            return _NoConnection(f"{type(exc).__name__}: {exc}")
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return _Unreachable(f"{type(exc).__name__}: {exc}")


def _describe(context: Mapping[str, str]) -> str:
    if "repo" in context:
        rev = context.get("revision") or "main"
        return f"{context['repo']}/{context.get('filename', '')}@{rev}"
    return context.get("url", "request")


def _file_context(f: RemoteFile) -> dict[str, str]:
    if f.repo:
        return {"repo": f.repo, "filename": f.filename, "revision": f.revision or "main"}
    return {"url": f.url}


def _gather_file_headers(found: RemoteFile, resp: _Response) -> None:
    """Keep the first value of each hub header seen along a redirect chain."""
    found.revision = found.revision or resp.header("X-Repo-Commit")
    linked_size = resp.header("X-Linked-Size")
    if found.size is None and linked_size and linked_size.isdigit():
        found.size = int(linked_size)
    etag = resp.header("X-Linked-Etag") or resp.header("ETag")
    found.etag = found.etag or _normalize_etag(etag)


def _normalize_etag(etag: str | None) -> str | None:
    if not etag:
        return None
    return etag.strip().removeprefix("W/").strip('"') or None


def _status_reason(resp: _Response) -> str:
    try:
        phrase = HTTPStatus(resp.status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP {resp.status} {phrase}".strip()


def _is_rate_limited(reason: str) -> bool:
    return reason.startswith("HTTP 429")


def _retry_after(resp: _Response) -> float | None:
    """Seconds to wait from ``Retry-After`` (seconds or HTTP date) or, on a 429, from
    an exhausted ``RateLimit`` window."""
    value = (resp.header("Retry-After") or "").strip()
    if value:
        if re.fullmatch(r"\d+(\.\d+)?", value):
            return float(value)
        with suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    if resp.status == 429:
        info = _parse_rate_limit(resp.header("RateLimit"), resp.header("RateLimit-Policy"))
        if info is not None and info[0] == 0:
            return float(info[1])
    return None


def _parse_rate_limit(value: str | None, policy: str | None) -> tuple[int, float] | None:
    """``(remaining, seconds to reset)`` from ``RateLimit: "api";r=R;t=T``."""
    if not value:
        return None
    match = _RATELIMIT.search(value)
    if not match:
        return None
    return int(match.group("r")), float(match.group("t"))


def _content_range_total(value: str | None) -> int | None:
    """The complete length in a ``Content-Range`` (``bytes 0-9/100``, or ``bytes */100``
    as a 416 gives it); ``None`` when absent or unknown."""
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+|\*)", (value or "").strip())
    if not match or match.group(1) == "*":
        return None
    return int(match.group(1))


def _check_content_range(resp: _Response, f: RemoteFile, start: int, end: int | None) -> None:
    match = re.fullmatch(
        r"bytes (\d+)-(\d+)/(\d+|\*)", (resp.header("Content-Range") or "").strip()
    )
    if not match:
        raise _Transient(f"206 without a valid Content-Range ({resp.header('Content-Range')!r})")
    first, last = int(match.group(1)), int(match.group(2))
    total = None if match.group(3) == "*" else int(match.group(3))
    if first != start or (end is not None and last != end - 1):
        raise _Transient(f"Content-Range {first}-{last} does not match the request")
    if total is not None and f.size is not None and total != f.size:
        raise CheckpointError(
            f"{f.display}: the file changed on the server ({total} bytes, expected {f.size})"
        )
    if len(resp.body) != last - first + 1:
        raise _Transient(f"body has {len(resp.body)} bytes, Content-Range says {last - first + 1}")
    etag = _normalize_etag(resp.header("ETag"))
    if etag and f.content_etag is None:
        f.content_etag = etag
    elif etag and etag != f.content_etag:
        raise CheckpointError(
            f"{f.display}: the file changed on the server between two reads (ETag "
            f"{f.content_etag} then {etag})"
        )


def _check_resume(resp: _Response, f: RemoteFile, offset: int) -> None:
    match = re.fullmatch(
        r"bytes (\d+)-(\d+)/(\d+|\*)", (resp.header("Content-Range") or "").strip()
    )
    if not match or int(match.group(1)) != offset:
        raise HubUnavailable(
            f"{f.display}: resumed download answered {resp.header('Content-Range')!r}, "
            f"not bytes from {offset}"
        )


def _check_range(resp: _Response, f: RemoteFile, start: int, end: int) -> None:
    if resp.status == 200:
        # The server ignored Range and sends the whole file: usable only from byte 0.
        if start != 0 or len(resp.body) < end:
            raise CheckpointError(f"{f.display}: the server does not support range requests")
        resp.body = resp.body[:end]
        return
    if resp.status != 206:
        raise _Transient(f"unexpected HTTP {resp.status} for a range request")
    _check_content_range(resp, f, start, end)


def _check_whole(f: RemoteFile, data: bytes) -> None:
    if f.size is not None and len(data) != f.size:
        raise HubUnavailable(f"{f.display}: got {len(data)} bytes, expected {f.size}")
    if f.sha256 and hashlib.sha256(data).hexdigest() != f.sha256:
        raise HubUnavailable(f"{f.display}: sha256 does not match the hub's etag")


def _read_local(path: str, start: int, end: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(start)
        data = fh.read(end - start)
    if len(data) != end - start:
        raise CheckpointError(f"{path}: file ends before byte {end}")
    return data


def _commit_from_snapshot_path(path: str) -> str | None:
    parts = os.path.normpath(path).split(os.sep)
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts) and _SHA1.match(parts[i + 1]):
            return parts[i + 1]
    return None


def _next_link(value: str | None, base: str) -> str | None:
    for part in (value or "").split(","):
        match = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', part)
        if match:
            return urljoin(base, match.group(1))
    return None


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
