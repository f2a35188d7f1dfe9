"""Write a file so that a crash at any moment leaves the old file or the new one, never half of one.

The content goes to a hidden temporary beside the destination (same folder, so the rename is atomic;
same suffix, so writers that choose a format from it, like SimpleITK's, still can), is flushed to disk and
renamed over the destination. A killed writer leaves only a temporary, which `remove_stale_temporaries`
deletes.
"""
import os
from collections.abc import Callable
from pathlib import Path

TEMPORARY_GLOB = ".tmp-*"


def temporary_for(path: Path) -> Path:
    return path.with_name(f".tmp-{os.getpid()}-{path.name}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """`write(temporary)` writes the content; then it replaces `path`. Nothing is left behind on failure."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete what killed writers left in `folder`; call before this run writes there."""
    stale = sorted(Path(folder).glob(TEMPORARY_GLOB))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
