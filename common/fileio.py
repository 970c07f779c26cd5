"""Small file helpers: atomic writes (temp file, fsync, rename), checksums, safe loading, a folder lock."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Iterator

from .errors import DiskFullError, UserError
from .faults import fault_point

DISK_FULL_REASONS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                     errno.EFBIG: "file larger than the file-size limit (ulimit -f)"}
LOCK_NAME = ".lock"
_TEMP_NAME = re.compile(r"\..+\.tmp[0-9]+")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def make_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """`folder` and its parents, created where missing (the output folder of a command, given by `flag`);
    UserError naming `flag` and the fix when a file stands there or the folder cannot be made."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder} is a file; give a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {flag} {folder} ({e.strerror}); choose a writable folder") from None
    return folder


def temp_path_for(path: str | os.PathLike) -> Path:
    """Where an in-progress write of `path` goes: same folder (so rename is atomic), hidden name."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temp_file(path: str | os.PathLike) -> bool:
    """Whether `path` is the temp file of an atomic write (possibly left by a killed process)."""
    return bool(_TEMP_NAME.fullmatch(Path(path).name))


def remove_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Delete temp files that killed writers left in `folder` (call only while holding its lock)."""
    removed = []
    for p in Path(folder).iterdir():
        if is_temp_file(p) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p.name)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator:
    """Open a temp file next to `path`; on success fsync and rename it over `path`; on error remove it.

    A reader never sees a half-written file under the final name. Out of space (ENOSPC, EDQUOT,
    EFBIG) becomes DiskFullError naming `path`.
    """
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        f = open(tmp, mode)
    except OSError as e:
        raise _disk_full_or(e, path) from None
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        fault_point(f"commit:{path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            f.close()  # flushing the rest may fail again when the disk is full
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _disk_full_or(e, path) from None
        raise


def _disk_full_or(error: OSError, path: Path) -> OSError | DiskFullError:
    if error.errno in DISK_FULL_REASONS:
        return DiskFullError(path, DISK_FULL_REASONS[error.errno])
    return error


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Write `data` to `path` atomically (fault point `half-written:<name>` halfway, for the kill tests)."""
    view = memoryview(data)
    half = len(view) // 2
    with atomic_open(path, "wb") as f:
        f.write(view[:half])
        f.flush()
        fault_point(f"half-written:{Path(path).name}")
        f.write(view[half:])


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def save_torch_atomic(path: str | os.PathLike, obj) -> None:
    """torch.save `obj` (tensors, plain containers: loadable with weights_only=True) atomically. Serialised
    in memory first, so that a full disk surfaces as an OSError on the write, not inside torch."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes_atomic(path, buf.getbuffer())


def load_torch_safely(path: str | os.PathLike, fix: str):
    """torch.load(weights_only=True): tensors and plain containers only, never pickled code.
    UserError naming `path` and saying `fix` for a missing, damaged or unsafe file."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a file; {fix}")
    if not path.is_file():
        raise UserError(f"{path} does not exist; {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load {path}: damaged, or not a plain-tensor PyTorch file ({load_failure(e)}); "
                        f"{fix}") from None


def load_failure(error: Exception) -> str:
    """Why torch.load(weights_only=True) refused a file, in our words. torch's own text for a refused
    pickle advises loading it with weights_only=False, i.e. running the code of a file we just refused:
    it is never passed on."""
    import pickle

    text = str(error)
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        what = f"a pickled {found.group(1)}" if found else "pickled Python data"
        return (f"it holds {what}, not only tensors and plain containers; loading that could run code, so it "
                "is refused")
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"


def canonical_json(obj) -> str:
    """A JSON-able object as text that does not depend on key order, whitespace or tuple vs list (what
    a JSON round trip changes), so two values compare equal exactly when they are stored equal."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def canonical_json_sha256(obj) -> str:
    """Checksum of a JSON-able object that does not depend on key order or whitespace."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (its `.lock` file) while `command` writes there, so that a second
    writer (a job requeued while the old one still runs) is refused, naming the holder (pid and host, which
    the holder writes into the file). A POSIX record lock: the kernel drops it when the holder dies, however
    it dies, and forked children (DataLoader workers) do not inherit it, so a killed run's lingering workers
    do not block its rerun, and the pid a killed run left in the file is only a stale note that the next
    writer replaces (the lock, not the file's text, decides). It also works on NFS. File systems without
    locking are used unlocked."""
    folder = Path(folder)
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror}): choose a writable output folder") from None
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held by another process
            raise UserError(f"{folder} is being written by another running `{command}` ({lock_holder(fd)}): wait "
                            "for it to end or stop it, or choose another output folder") from None
        except OSError:
            pass  # no locking on this file system (ENOLCK)
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_holder(fd: int) -> str:
    """`pid 123 on host h`, from what the holder of a lock file wrote into it."""
    words = os.pread(fd, 300, 0).decode(errors="replace").split()
    pid = words[0] if words else "?"
    return f"pid {pid} on host {words[1]}" if len(words) > 1 else f"pid {pid}"
