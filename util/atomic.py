"""Write a file so that a crash at any moment leaves the old file or the new one, never half of one.

The content goes to a hidden temporary beside the destination (same folder, so the rename is atomic;
same suffix, so writers that choose a format from it, like SimpleITK's, still can), is flushed to disk and
renamed over the destination. A killed writer leaves only a temporary, which `remove_stale_temporaries`
deletes. A full, read-only or forbidden disk is reported as such (DiskWriteError), naming the file.
"""
import errno
import os
import re
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from .errors import VolMAEError

TEMPORARY_GLOB = ".tmp-*"


def _file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _file_mode()
DISK_FAULTS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)
HDF5_ERRNO = re.compile(r"errno = (\d+)")


class DiskWriteError(VolMAEError, OSError):
    """A write that the disk refused; the message names the file and the cause, in one line."""


def disk_fault(err: BaseException, path: Path, kept: str = "an existing file there is unchanged"
               ) -> DiskWriteError | None:
    """The disk-level cause of `err` as one line about `path` and what it still holds (`kept`), or None when
    it is not one. HDF5 reports a failed write as a RuntimeError whose text carries the errno."""
    code = fault_errno(err)
    if code not in DISK_FAULTS:
        return None
    return DiskWriteError(f"cannot write {path}: {DISK_FAULTS[code]}{free_space(path)}; {kept}")


def fault_errno(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    found = HDF5_ERRNO.search(str(err)) if isinstance(err, (OSError, RuntimeError)) else None
    return int(found.group(1)) if found else None


def ensure_room(path: Path, needed: int, kept: str = "an existing file there is unchanged") -> None:
    """Refuse, as a disk fault, a write of up to `needed` bytes that the file system holding `path` has no room
    for: HDF5 reports a full disk late, from deep inside its own cleanup, with a traceback per freed object."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return
    if free < needed:
        raise DiskWriteError(f"cannot write {path}: no space left on the device ({free / 2**20:,.2f} MB free "
                             f"there, the next volume needs up to {needed / 2**20:,.2f} MB); {kept}")


@contextmanager
def disk_writes(path: str | os.PathLike, kept: str):
    """Writes in place (appends, logs, locks): a disk fault becomes one DiskWriteError naming `path` and what
    it still holds."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        fault = disk_fault(err, Path(path), kept)
        if fault is None:
            raise
        raise fault from err


def free_space(path: Path) -> str:
    """', N MB free' on the file system that holds `path`, or '' when it cannot be asked."""
    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    except OSError:
        return ""
    return f" ({free / 2**20:,.2f} MB free there)"


def temporary_for(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


class OutputAppearedError(VolMAEError, FileExistsError):
    """A file that must not be replaced appeared while this run worked; the message names where this run's
    output went instead."""


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None], replace: bool = True) -> None:
    """`write(temporary)` writes the content; then it replaces `path`, or with `replace=False` takes its place
    only if nothing is there (a hard link: atomic, and it never clobbers a file another run wrote meanwhile;
    this run's output then goes beside it, OutputAppearedError naming both). Nothing is left behind on failure,
    and cleaning up never hides the error that stopped the write."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)  # some writers (safetensors) create 0600: every output gets one mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            _publish_beside(tmp, path)
    except OutputAppearedError:
        raise
    except (OSError, RuntimeError) as err:
        _discard(tmp)  # first, so that the free space reported is what the disk has without it
        fault = disk_fault(err, path)
        if fault is None:
            raise
        raise fault from err
    finally:
        _discard(tmp)


def _publish_beside(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)
        return
    except FileExistsError:
        pass
    except OSError as err:  # a file system without hard links: check, then rename (a narrow race remains)
        if err.errno not in NO_HARD_LINKS or path.exists():
            raise
        os.replace(tmp, path)
        return
    kept = path.with_name(f"{path.stem}.{os.getpid()}{path.suffix}")
    os.link(tmp, kept)
    raise OutputAppearedError(f"{path} appeared while this run was working (another run wrote it?); it is left "
                              f"as it is, and this run's output is {kept}")


def _discard(tmp: Path) -> None:
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
