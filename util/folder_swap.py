"""A folder of outputs replaced whole: built beside the old one and swapped in only once it is complete.

Writing a new export into the folder of the old one deletes the old one first, so a refused or killed export
leaves nothing. Here the new folder is built as a hidden sibling (`.NAME.building-PID`) and, once complete,
takes the old one's place by two renames: the old folder becomes `.NAME.replaced-PID`, the new one NAME,
then the old one is removed. A process killed at any moment (`kill -9` included) leaves the old folder or the
new one; the one moment between the two renames leaves the old one under its hidden name, which the next
command that writes there (`recover`) puts back. The caller decides, before anything is built, whether the
folder may be replaced at all (only a folder of files VolMAE wrote may; `inference.exported.refuse_folder`).
"""
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .atomic import make_output_folder

BUILDING = "building"
REPLACED = "replaced"


def _sibling(target: Path, state: str, pid: int) -> Path:
    return target.parent / f".{target.name}.{state}-{pid}"


def _siblings(target: Path, state: str) -> list[tuple[Path, int]]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{state}-(\d+)")
    if not target.parent.is_dir():
        return []
    return [(entry, int(m.group(1))) for entry in target.parent.iterdir() if (m := pattern.fullmatch(entry.name))]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid != os.getpid()


def recover(target: Path) -> list[str]:
    """Undo what a killed swap of `target` left: an old folder set aside before its replacement arrived goes
    back; a finished swap's old folder and a dead build's half folder are removed. What was done, for the log."""
    notes = []
    for backup, pid in _siblings(target, REPLACED):
        if _alive(pid):
            continue
        if not target.exists():
            os.rename(backup, target)
            notes.append(f"restored {target} from {backup.name}, left by a replacement that was stopped")
        else:
            shutil.rmtree(backup, ignore_errors=True)
    for half, pid in _siblings(target, BUILDING):
        if not _alive(pid):
            shutil.rmtree(half, ignore_errors=True)
            notes.append(f"removed {half.name}, the unfinished output of a stopped run")
    return notes


@contextmanager
def building(target: Path) -> Iterator[Path]:
    """The folder to build `target`'s new content in; when the block ends without an error it replaces `target`
    (created if absent), and on any error or signal it is removed and `target` is left as it was."""
    make_output_folder(target.parent)
    staging = _sibling(target, BUILDING, os.getpid())
    shutil.rmtree(staging, ignore_errors=True)
    make_output_folder(staging)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    swap_in(staging, target)


def swap_in(staging: Path, target: Path) -> None:
    """Put the complete folder `staging` where `target` is, by renames only."""
    if not target.exists():
        os.rename(staging, target)
        return
    backup = _sibling(target, REPLACED, os.getpid())
    os.rename(target, backup)
    os.rename(staging, target)
    shutil.rmtree(backup, ignore_errors=True)
