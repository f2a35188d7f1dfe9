"""One run per output folder.

Two runs writing one folder (a requeued SLURM job beside a manual rerun, two array tasks given the same
OUTPUT_DIR) would resume each other's half-written state and interleave their logs. A run therefore holds an
exclusive `flock` on OUTPUT_DIR/.volmae-run.lock for as long as its process lives. The kernel drops the lock
when the process ends, however it ends (kill -9 included), so a lock left by a dead run is simply taken over;
its record (pid, host, start, command) is only there to name the holder. flock works across the nodes of a
cluster on NFSv4 and Lustre (with flock enabled), where a pid alone could not say whether a run is alive.
"""
import atexit
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import disk_writes
from .errors import FolderInUseError

LOCK_FILE = ".volmae-run.lock"


def describe(holder: dict) -> str:
    if not holder:
        return "another process"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"({holder.get('command', '?')})")


def _read(fd: int) -> dict:
    text = os.pread(fd, 65536, 0).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "host": "?", "started": "?", "command": text[:80]}


def _release(fd: int) -> None:
    """A run that ends normally leaves an empty record: the next one has nothing to take over."""
    os.ftruncate(fd, 0)
    os.close(fd)


def _acquire(folder: str | os.PathLike) -> int:
    path = Path(folder) / LOCK_FILE
    with disk_writes(path, "nothing else was written"):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read(fd)
        os.close(fd)
        raise FolderInUseError(f"{folder} is in use by {describe(holder)}; wait for that run, stop it, or choose "
                         f"another output folder (lock: {path})") from None
    previous = _read(fd)
    if previous:
        print(f"note: taking over {path} from {describe(previous)}, which is no longer running", flush=True)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    try:
        with disk_writes(path, "nothing else was written"):
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
    except OSError:
        os.close(fd)
        raise
    return fd


def live_holder(folder: str | os.PathLike) -> dict | None:
    """The record of the live run holding FOLDER's lock, or None when no live run holds it (a reader's check:
    nothing is written, the lock is not taken)."""
    path = Path(folder) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(fd)
    finally:
        os.close(fd)  # closing drops a shared lock taken above
    return None


def lock_output_folder(folder: str | os.PathLike) -> None:
    """Hold FOLDER's run lock until this process ends; stop in one line naming the holder when a live run has
    it. Call it before anything in the folder is read or cleaned."""
    atexit.register(_release, _acquire(folder))


@contextmanager
def output_folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """FOLDER's run lock for the duration of a `with` block (a library call, like building a cache)."""
    fd = _acquire(folder)
    try:
        yield
    finally:
        _release(fd)
