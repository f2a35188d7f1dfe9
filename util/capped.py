"""Long lists of problems (rows, files) shown in a readable length: the first few lines, then a count and where
the whole list is, so that a 100,000-row CSV with missing files does not print 100,000 warnings."""
import sys
from pathlib import Path
from typing import TextIO

SHOWN = 20


def print_capped(title: str, lines: list[str], full_list: Path | None = None, stream: TextIO | None = None,
                 shown: int = SHOWN) -> None:
    """`title`, then the first `shown` lines; past that a count, and with `full_list` every line written there
    (the caller's own record, e.g. a CSV column, can stand in: pass its path and write nothing)."""
    out = stream or sys.stdout
    print(title, file=out)
    for line in lines[:shown]:
        print(f"  {line}", file=out)
    if len(lines) > shown:
        where = f"; all {len(lines)} in {full_list}" if full_list is not None else ""
        print(f"  ... and {len(lines) - shown} more{where}", file=out, flush=True)


def write_list(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
