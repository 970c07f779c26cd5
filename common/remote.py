"""Shard folders that are not local: anything webdataset's `gopen` reads (http(s):// through curl, `pipe:`
commands such as an object-store client, gs://, sftp:// ...).

A location is a URL of the folder (`http://host/shards/`), or a template with `{name}` where the file
name goes (`pipe:aws s3 cp s3://bucket/shards/{name} -`). The manifest is read from it like any other
file; each shard is streamed into a spooled temporary file (memory up to SPOOL_IN_MEMORY bytes, then
disk) while its sha256 and size are computed, and checked against the manifest before any of its samples
is used: a damaged shard is never trained on.

A shard whose transfer fails (a connection dropped mid-body, a refused or reset connection, HTTP 408,
429 or 5xx, no byte for `Retry.timeout` seconds, fewer bytes than the manifest records, a `pipe:`
command that exits non-zero) is fetched again from its first byte after a wait that doubles from
FIRST_WAIT (with jitter, at most MAX_WAIT, longer when the server sends Retry-After), up to
`Retry.attempts` times and for at most `Retry.seconds`. No sample of a shard is used before all of it
has arrived and matched, so a retry never repeats or loses a sample. Not retried: bytes that arrive
complete but differ from the manifest (another sha256, more bytes: the stored file changed; asking
again returns it again), and HTTP statuses that will not change (404, 403, ...). http(s) is read with
urllib (its read timeout and status codes are ours); other schemes through webdataset's `gopen`.
"""
from __future__ import annotations

import hashlib
import http.client
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import BinaryIO, Callable

from .errors import UserError

CHUNK = 1 << 20
SPOOL_IN_MEMORY = 256 << 20
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")
REMOTE_SCHEMES = ("http", "https", "pipe", "gs", "sftp", "ftps", "scp", "ais", "hf", "s3")
FIRST_WAIT, MAX_WAIT = 1.0, 60.0      # seconds between attempts: doubling from FIRST_WAIT, at most MAX_WAIT
TRANSIENT_STATUS = (408, 425, 429, 500, 502, 503, 504)


@dataclass(frozen=True)
class Retry:
    """How a remote shard's failed transfer is retried: at most `attempts` tries (the first included),
    no new one after `seconds` since the first began; an http(s) read that gets no byte for `timeout`
    seconds fails (and is retried)."""

    attempts: int = 6
    seconds: float = 600.0
    timeout: float = 60.0


def is_remote(location) -> bool:
    match = _SCHEME.match(str(location))
    return bool(match) and match.group(1) in REMOTE_SCHEMES


def join(location: str, name: str) -> str:
    """The address of file `name` of a remote shard folder."""
    if "{name}" in location:
        return location.replace("{name}", name)
    return location.rstrip("/") + "/" + name


def _open(url: str) -> BinaryIO:
    import webdataset as wds

    return wds.gopen(url, "rb")


def http_reason(error: Exception) -> str:
    """An HTTP request's failure in words, from urllib's errors: `HTTP 404 Not Found`, `connection refused`,
    `timed out`; else the error's type and first line."""
    import urllib.error

    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}".strip()
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror[:1].lower() + reason.strerror[1:]
    if isinstance(reason, TimeoutError):
        return "timed out"
    if isinstance(reason, str):
        return reason
    return f"{type(reason).__name__}: {(str(reason).strip().splitlines() or [''])[0][:160]}"


def _http_status(url: str, timeout: float = 30.0) -> str | None:
    """Why a GET of `url` fails now (`HTTP 404 Not Found`, `connection refused`), or None when it succeeds."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return None
    except Exception as e:  # noqa: BLE001 (described, not raised)
        return http_reason(e)


def _why(url: str, error: Exception) -> str:
    """Why reading `url` failed, for a message: for http(s) the HTTP status and reason or the connection
    error, for a `pipe:` command its exit status, never the internal call that failed (webdataset runs
    curl and pipes as subprocesses and reports their argument lists)."""
    text = str(error)
    status = re.search(r": exit (-?\d+) \(read\)", text)
    if status is not None and url.startswith(("http://", "https://")):
        now = _http_status(url)
        return now or f"curl exit status {status.group(1)}; the server answers now, so try again"
    if status is not None and url.startswith("pipe:"):
        return f"the command exited with status {status.group(1)}"
    if status is not None:
        return f"the reader ({url.split(':', 1)[0]}) exited with status {status.group(1)}"
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:160]}"


def read_bytes(url: str, limit: int, what: str) -> bytes:
    """All bytes at `url` (UserError if it cannot be read, or holds more than `limit` bytes)."""
    try:
        stream = _open(url)
        try:
            data = stream.read(limit + 1)
        finally:
            stream.close()  # a pipe's (curl's) non-zero exit status raises here
    except Exception as e:
        raise UserError(f"cannot read {what} at {url} ({_why(url, e)}); check the address (a folder URL, or a "
                        "`pipe:` command with {name} where the file name goes) and that it is reachable") from None
    if len(data) > limit:
        raise UserError(f"{what} at {url} is over the {limit}-byte limit")
    return data


class StreamError(OSError):
    """A remote shard could not be read, or its bytes do not match the manifest."""


class _Transient(Exception):
    """A failed transfer that another attempt may get through (`wait`: the server's Retry-After)."""

    def __init__(self, reason: str, wait: float | None = None):
        super().__init__(reason)
        self.reason, self.wait = reason, wait


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fetch_verified(url: str, sha256: str | None, size: int | None, level: str = "full", retry: Retry = Retry(),
                   warn: Callable[[str], None] = _warn) -> BinaryIO:
    """The shard at `url` as a readable temporary file, positioned at 0, after checking its byte count
    (`level` size or full, when the manifest records it) and its sha256 (`level` full) while it streamed.
    A failed transfer is retried from the start (`retry`; each failure is reported through `warn`).
    StreamError naming what is wrong otherwise: the address, and for a transfer that kept failing the
    attempts, the time and the last reason."""
    started, jitter = time.monotonic(), random.Random()  # its own generator: the run's random state is untouched
    name = url.rstrip("/").rsplit("/", 1)[-1]
    for attempt in range(1, retry.attempts + 1):
        try:
            return _fetch_once(url, sha256, size, level, retry.timeout)
        except _Transient as e:
            wait = min(FIRST_WAIT * 2 ** (attempt - 1), MAX_WAIT) * (0.5 + 0.5 * jitter.random())
            wait = max(wait, min(e.wait or 0.0, MAX_WAIT))
            elapsed = time.monotonic() - started
            if attempt == retry.attempts or elapsed + wait > retry.seconds:
                raise StreamError(f"cannot be streamed from {url}: {attempt} attempt(s) in {elapsed:.0f} s failed "
                                  f"(last: {e.reason})") from None
            warn(f"{name}: attempt {attempt} of {retry.attempts} failed ({e.reason}); retrying from its start "
                 f"in {wait:.1f} s")
            time.sleep(wait)
    raise AssertionError("unreachable")


def _fetch_once(url: str, sha256: str | None, size: int | None, level: str, timeout: float) -> BinaryIO:
    """One attempt of `fetch_verified`: _Transient for a transfer worth repeating, StreamError for bytes or
    a status that another attempt would get again."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    digest, count = hashlib.sha256(), 0
    try:
        for chunk in (_http_chunks(url, timeout) if url.startswith(("http://", "https://")) else _gopen_chunks(url)):
            digest.update(chunk)
            spool.write(chunk)
            count += len(chunk)
    except BaseException as e:
        spool.close()
        if isinstance(e, _Transient) and count:
            e.reason += f" after {count} of {size if size is not None else '?'} bytes"
        raise
    problem, transient = None, False
    if level in ("size", "full") and size is not None and count != size:
        transient = count < size  # a transfer cut short; more bytes than recorded is another file
        problem = (f"streamed {count} bytes, the manifest says {size} (truncated in transfer)" if transient else
                   f"streamed {count} bytes, the manifest says {size} (the stored file was modified)")
    elif level == "full" and sha256 is not None and digest.hexdigest() != sha256:
        problem = "sha256 of the streamed bytes differs from the manifest (damaged in storage or in transfer)"
    if problem:
        spool.close()
        raise _Transient(problem) if transient else StreamError(problem)
    spool.seek(0)
    return spool


def _http_chunks(url: str, timeout: float):
    """The body at an http(s) `url`, CHUNK bytes at a time (urllib: proxies from the environment)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "dfkd"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read(CHUNK):
                yield chunk
            if response.length:  # fewer bytes than its Content-Length: the connection closed early
                raise _Transient("the connection closed before the end of the body")
    except urllib.error.HTTPError as e:
        if e.code in TRANSIENT_STATUS:
            after = e.headers.get("Retry-After", "") if e.headers else ""
            raise _Transient(http_reason(e), float(after) if after.strip().isdigit() else None) from None
        raise StreamError(f"cannot be streamed from {url} ({http_reason(e)})") from None
    except http.client.IncompleteRead:
        raise _Transient("the connection closed in the middle of the body") from None
    except http.client.RemoteDisconnected:
        raise _Transient("the server closed the connection without an answer") from None
    except TimeoutError:
        raise _Transient(f"no data for {timeout:g} s (read timeout)") from None
    except (OSError, http.client.HTTPException) as e:  # refused, reset, a bad status line, TLS, DNS
        if isinstance(e, urllib.error.URLError) and isinstance(e.reason, TimeoutError):
            raise _Transient(f"no data for {timeout:g} s (read timeout)") from None
        raise _Transient(http_reason(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}") from None


def _gopen_chunks(url: str):
    """The bytes of a `pipe:` command or another webdataset scheme; its failure is worth another attempt
    (a command's exit status does not say whether it would fail again)."""
    try:
        stream = _open(url)
        try:
            while chunk := stream.read(CHUNK):
                yield chunk
        finally:
            stream.close()  # a pipe's non-zero exit status raises here
    except Exception as e:
        raise _Transient(_why(url, e)) from None
