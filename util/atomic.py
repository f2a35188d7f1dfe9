"""Write a file so that a crash at any moment leaves the old file or the new one, never half of one.

The content goes to a hidden temporary beside the destination (same folder, so the rename is atomic;
same suffix, so writers that choose a format from it, like SimpleITK's, still can), is flushed to disk and
renamed over the destination. A killed writer leaves only a temporary, which `remove_stale_temporaries`
deletes. A full, read-only or forbidden disk is reported as such (DiskWriteError), naming the file.
"""
import errno
import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_GLOB = ".tmp-*"
DISK_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


class DiskWriteError(OSError):
    """A write that the disk refused; the message names the file and the cause, in one line."""


def disk_fault(err: OSError, path: Path) -> DiskWriteError | None:
    """The disk-level cause of `err` as one line about `path`, or None when it is not one."""
    if err.errno not in DISK_FAULTS:
        return None
    return DiskWriteError(f"cannot write {path}: {DISK_FAULTS[err.errno]}; an existing file there is unchanged")


def temporary_for(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(temporary)` writes the content; then it replaces `path`. Nothing is left behind on failure, and
    cleaning up never hides the error that stopped the write."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        fault = disk_fault(err, path)
        if fault is None:
            raise
        raise fault from err
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # e.g. the folder turned read-only: the temporary stays for remove_stale_temporaries


def make_output_folder(path: str | os.PathLike) -> Path:
    """Create an output folder, or say in one line why the disk will not have it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        cause = DISK_FAULTS.get(err.errno, err.strerror or type(err).__name__)
        raise DiskWriteError(f"cannot create the output folder {path}: {cause}") from None
    return path


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in `folder`; call before this run writes there."""
    stale = sorted(Path(folder).glob(TEMPORARY_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
