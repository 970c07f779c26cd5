"""A local HTTP server that serves a folder and injects network faults into the transfers of its files: the
flaky object store that `distill train --shards http://...` must survive (tests/test_remote_shards.py,
pipelines/faults_streamed.py).

    with FaultServer(folder, plan=scripted({"shard-000001.tar": ["drop", "503"]})) as server:
        train(TrainConfig(shards=server.url + "/", ...))
    server.injected     # Counter: fault kind -> how many were served

Fault kinds, each answering one GET of a file:
  drop       200 with the full Content-Length, half the body, then the connection is closed
  truncate   200 without a Content-Length, half the body, then closed (the client sees a short, "complete" body)
  503        HTTP 503 Service Unavailable (Retry-After: 1)
  stall      200 with the full Content-Length, a quarter of the body, then nothing for `stall_s` seconds
  reset      the connection is closed before any answer
  changed    the whole file with one byte flipped (another sha256: never retried into success)

A plan says which request gets which fault: plan(name, n) -> kind or None, n counting the GETs of that file
from 1. `scripted` gives listed kinds to a file's first requests; `random_plan` draws them.
"""
from __future__ import annotations

import collections
import functools
import http.server
import os
import random
import threading
import time
from pathlib import Path
from typing import Callable

KINDS = ("drop", "truncate", "503", "stall", "reset", "changed")
TRANSIENT_KINDS = ("drop", "truncate", "503", "stall", "reset")
Plan = Callable[[str, int], "str | None"]


def scripted(faults: dict[str, list[str]]) -> Plan:
    """The n-th GET of file `name` gets faults[name][n - 1] (none once the list is used up)."""
    return lambda name, n: faults.get(name, [])[n - 1] if n <= len(faults.get(name, [])) else None


def random_plan(seed: int, rate: float, kinds: tuple[str, ...] = TRANSIENT_KINDS, most_in_a_row: int = 2,
                only: Callable[[str], bool] = lambda name: name.endswith(".tar")) -> Plan:
    """Each GET of a file `only` accepts gets a fault with probability `rate`, its kind drawn from `kinds`;
    never more than `most_in_a_row` faults in a row for one file (so that retries get through)."""
    rng, lock, in_a_row = random.Random(seed), threading.Lock(), collections.Counter()

    def plan(name: str, n: int) -> str | None:
        if not only(name):
            return None
        with lock:
            if in_a_row[name] < most_in_a_row and rng.random() < rate:
                in_a_row[name] += 1
                return rng.choice(kinds)
            in_a_row[name] = 0
            return None
    return plan


class FaultServer:
    """Serves `root` on 127.0.0.1 (a free port) in a thread, with the faults `plan` chooses."""

    def __init__(self, root: str | os.PathLike, plan: Plan | None = None, stall_s: float = 3.0):
        self.root, self.plan, self.stall_s = Path(root), plan or (lambda name, n: None), stall_s
        self.requests: collections.Counter = collections.Counter()   # file name -> GETs
        self.injected: collections.Counter = collections.Counter()   # fault kind -> times served
        self.log: list[tuple[str, int, str]] = []                     # (file, n, kind) of each fault
        self._lock = threading.Lock()
        handler = functools.partial(_Handler, server_state=self)
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> "FaultServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, name: str) -> str | None:
        with self._lock:
            self.requests[name] += 1
            n = self.requests[name]
        kind = self.plan(name, n)
        if kind is not None:
            with self._lock:
                self.injected[kind] += 1
                self.log.append((name, n, kind))
        return kind


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def __init__(self, *args, server_state: FaultServer, **kwargs):
        self.state = server_state
        super().__init__(*args, **kwargs)

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        relative = self.path.split("?", 1)[0].lstrip("/")
        path = (self.state.root / relative).resolve()
        if self.state.root.resolve() not in path.parents or not path.is_file():
            self._answer(404, b"not found")
            return
        data = path.read_bytes()
        kind = self.state._next(path.name)
        if kind == "reset":
            self.close_connection = True
            return
        if kind == "503":
            self._answer(503, b"busy", {"Retry-After": "1"})
            return
        if kind == "changed":
            data = bytearray(data)
            data[len(data) // 2] ^= 0x01
            data = bytes(data)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if kind == "truncate":
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind in ("drop", "truncate"):
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
        elif kind == "stall":
            self.wfile.write(data[:len(data) // 4])
            self.wfile.flush()
            time.sleep(self.state.stall_s)
            self.close_connection = True
        else:
            self.wfile.write(data)

    def _answer(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
