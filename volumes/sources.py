"""Where a corpus is: a folder (searched recursively), a .txt of paths, or a .csv with a path column.

Relative paths in a list file are taken relative to the list file's folder. Every listing is
sorted, so all ranks of a distributed run see the same order.
"""
import os
from pathlib import Path

import pandas as pd

from ..util.errors import DataError
from .reading import DICOM_SUFFIXES, SERIES_SEPARATOR, dicom_series_ids, is_volume_file, listed_source


class SourceListError(DataError):
    """A corpus location that cannot be listed; the message names the file and row."""


def _looks_like_dicom(path: Path) -> bool:
    """A .dcm/.ima name, or the 'DICM' marker after the 128-byte preamble (names like CT.1.2.840...)."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _holds_dicom(folder: Path, files: list[str], probe_files: int = 3) -> bool:
    """Whether a folder has DICOM files, judged from its first few non-volume files."""
    others = [f for f in sorted(files) if not f.startswith(".") and not is_volume_file(folder / f)]
    return any(_looks_like_dicom(folder / f) for f in others[:probe_files])


def find_volumes(folder: Path) -> list[str]:
    """Volume files and DICOM series (one source per series) anywhere under `folder`."""
    sources = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        root_path = Path(root)
        sources += [str(root_path / f) for f in sorted(files) if is_volume_file(root_path / f)]
        if _holds_dicom(root_path, files):
            series = dicom_series_ids(root_path)
            if len(series) == 1:
                sources.append(str(root_path))
            else:
                sources += [f"{root_path}{SERIES_SEPARATOR}{uid}" for uid in sorted(series)]
    return sources


def read_path_column(csv_path: Path, column: str = "path") -> list[str]:
    """The `column` of a CSV, validated: present, no empty cells; relative paths resolved."""
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise SourceListError(f"{csv_path}: not a readable CSV ({err})") from None
    if column not in table.columns:
        raise SourceListError(f"{csv_path}: no '{column}' column (columns: {', '.join(table.columns)})")
    paths = []
    for row, value in enumerate(table[column], start=2):
        if not value.strip():
            raise SourceListError(f"{csv_path}, row {row}: empty '{column}'")
        paths.append(listed_source(csv_path.parent, value))
    return paths


def read_path_list(txt_path: Path) -> list[str]:
    """One path per line; blank lines and lines starting with # are ignored."""
    lines = txt_path.read_text().splitlines()
    return [listed_source(txt_path.parent, line) for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def list_sources(data_path: str | os.PathLike) -> list[str]:
    """All sources of a corpus location; fails with a clear message when there are none."""
    path = Path(data_path)
    if not path.exists():
        raise SourceListError(f"{path}: no such file or folder")
    if path.is_dir():
        sources = find_volumes(path)
    elif path.suffix.lower() == ".csv":
        sources = read_path_column(path)
    elif path.suffix.lower() == ".txt":
        sources = read_path_list(path)
    else:
        raise SourceListError(f"{path}: expected a folder, a .txt of paths or a .csv with a 'path' column")
    if not sources:
        raise SourceListError(f"{path}: no volumes found (looked for {', '.join(('NIfTI', 'MHA/MHD', 'NRRD', 'DICOM series'))})")
    return sources
