"""Shard folders that are not local: anything webdataset's `gopen` reads (http(s):// through curl, `pipe:`
commands such as an object-store client, gs://, sftp:// ...).

A location is a URL of the folder (`http://host/shards/`), or a template with `{name}` where the file
name goes (`pipe:aws s3 cp s3://bucket/shards/{name} -`). The manifest is read from it like any other
file; each shard is streamed into a spooled temporary file (memory up to SPOOL_IN_MEMORY bytes, then
disk) while its sha256 and size are computed, and checked against the manifest before any of its samples
is used: a damaged shard is never trained on.
"""
from __future__ import annotations

import hashlib
import re
import tempfile
from typing import BinaryIO

from .errors import UserError

CHUNK = 1 << 20
SPOOL_IN_MEMORY = 256 << 20
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):")
REMOTE_SCHEMES = ("http", "https", "pipe", "gs", "sftp", "ftps", "scp", "ais", "hf", "s3")


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


def fetch_verified(url: str, sha256: str | None, size: int | None, level: str = "full") -> BinaryIO:
    """The shard at `url` as a readable temporary file, positioned at 0, after checking its byte count
    (`level` size or full, when the manifest records it) and its sha256 (`level` full) while it streamed.
    StreamError naming what is wrong otherwise."""
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
    digest, count = hashlib.sha256(), 0
    try:
        stream = _open(url)
        try:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                spool.write(chunk)
                count += len(chunk)
        finally:
            stream.close()
    except Exception as e:
        spool.close()
        raise StreamError(f"cannot be streamed from {url} ({_why(url, e)})") from None
    problem = None
    if level in ("size", "full") and size is not None and count != size:
        problem = f"streamed {count} bytes, the manifest says {size} (truncated or modified)"
    elif level == "full" and sha256 is not None and digest.hexdigest() != sha256:
        problem = "sha256 of the streamed bytes differs from the manifest (damaged in storage or in transfer)"
    if problem:
        spool.close()
        raise StreamError(problem)
    spool.seek(0)
    return spool
