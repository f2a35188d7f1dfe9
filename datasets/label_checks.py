"""Checks of a labels table before anything trains on it: tables that leak or lie are refused or cleaned here,
each finding naming the CSV rows, because a model trained on them reports a score that means nothing (the
same scan in train and val scores AUC 1.0; an empty label becomes a class of its own)."""
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from .task_data import MISSING_VALUES, SPLITS, TaskDataError

CSV_FIRST_ROW = 2  # the line of the first data row: the header is line 1


def missing_labels(table: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Rows with an empty or NaN-like value in any label column: they are left out, never made a class."""
    present = [column for column in labels if column in table.columns]
    if not present:
        return np.zeros(len(table), dtype=bool)
    return table[present].apply(lambda column: column.astype(str).str.strip().str.lower().isin(MISSING_VALUES)).any(
        axis=1).to_numpy()


def lines(positions, limit: int = 6) -> str:
    """CSV line numbers of table positions, the first `limit` of them and a count of the rest."""
    shown = [str(int(i) + CSV_FIRST_ROW) for i in list(positions)[:limit]]
    rest = len(positions) - limit
    return ", ".join(shown) + (f" and {rest} more" if rest > 0 else "")


def strip_labels(table: pd.DataFrame, columns: list[str]) -> None:
    """Spaces around a label are never part of it: `yes ` and `yes` are one class."""
    for column in columns:
        if column in table.columns:
            table[column] = table[column].astype(str).str.strip()


def refuse_case_variants(table: pd.DataFrame, columns: list[str], csv: Path) -> None:
    """Class names that differ only by case (Yes, yes, YES) are one class typed three ways far more often than
    three classes: a binary task would silently become a multi-class one. Refused, naming them."""
    for column in columns:
        if column not in table.columns:
            continue
        values = table[column][~table[column].str.lower().isin(MISSING_VALUES)]
        spellings = values.groupby(values.str.lower()).unique()
        clash = spellings[spellings.map(len) > 1]
        if len(clash):
            names = "; ".join(", ".join(repr(v) for v in sorted(group)) for group in clash)
            rows = lines(np.flatnonzero(table[column].str.lower().isin(clash.index).to_numpy()))
            raise TaskDataError(f"{csv}, rows {rows}: labels in '{column}' that differ only by case ({names}); write "
                                f"each one way, or add --label_case sensitive to keep them as separate classes")


def duplicate_rows(table: pd.DataFrame, labels: list[str], group: str, csv: Path) -> list[dict]:
    """Rows that repeat an earlier row's file, labels and patient: each would train twice and count twice in the
    scores. Returned as excluded rows (the first copy is kept); the same file with other labels is refused."""
    keys = [column for column in ["path", group, *labels] if column in table.columns]
    listed = table[table["path"] != ""]
    excluded = []
    for _, rows in listed.groupby("path", sort=False):
        if len(rows) < 2:
            continue
        labelled = rows[[c for c in labels if c in rows.columns]].drop_duplicates()
        if len(labelled) > 1:
            raise TaskDataError(f"{csv}, rows {lines(rows.index)}: the file {rows['path'].iloc[0]} is listed with "
                                f"different labels; one scan has one label")
        first = rows.drop_duplicates(keys).index
        for i in rows.index.difference(first):
            excluded.append({"row": int(i) + CSV_FIRST_ROW, "path": table["path"].loc[i],
                             "reason": f"duplicate of line {int(first[0]) + CSV_FIRST_ROW} (same file and labels)"})
    return excluded


def refuse_missing_classes(splits: dict[str, tuple[np.ndarray, np.ndarray]], task: str, names: list[str],
                           csv: Path) -> None:
    """Validation and test must hold every class, or their AUC is undefined: the epoch would be chosen on an
    undefined score, and the test score would be missing. Refused before training, with the counts."""
    if task not in ("binary-class", "multi-class"):
        return
    counts = {split: np.bincount(splits[split][1][:, 0], minlength=len(names)) for split in SPLITS}
    for split in ("val", "test"):
        if not len(splits[split][1]):
            continue
        absent = [names[c] for c in range(len(names)) if counts[split][c] == 0]
        if absent:
            shown = "; ".join(f"{s} " + ", ".join(f"{names[c]}: {int(n)}" for c, n in enumerate(counts[s])) for s in SPLITS)
            raise TaskDataError(f"{csv}: the {split} split would hold no row of class {', '.join(absent)} (usable "
                                f"rows per class: {shown}), so its AUC is undefined. Add rows of that class, give "
                                f"{split} a larger --split_ratio share, merge classes, or give a split column")


def refuse_shared_files(table: pd.DataFrame, group: str, csv: Path) -> None:
    """The same file under two patients would put one scan on both sides of the split."""
    if group not in table.columns:
        return
    files = pd.Series([str(Path(p).resolve()) if p else "" for p in table["path"]], index=table.index)
    for file, rows in table[files != ""].groupby(files[files != ""]):
        patients = rows[group].astype(str).unique()
        if len(patients) > 1:
            lines = ", ".join(str(i + CSV_FIRST_ROW) for i in rows.index[:4])
            raise TaskDataError(f"{csv}, rows {lines}: the same file {file} is listed under patients "
                                f"{', '.join(map(repr, patients[:4]))}; one scan must belong to one patient")


def refuse_patients_in_two_splits(split_groups: dict[str, np.ndarray], csv: Path) -> None:
    """A patient (or, without a patient column, a file) in two splits (train and val, train and test, or val
    and test) leaks between them."""
    for first, second in combinations(SPLITS, 2):
        shared = sorted(set(split_groups[first]) & set(split_groups[second]))
        if shared:
            raise TaskDataError(f"{csv}: the split column puts patient(s) {', '.join(shared[:5])} in both {first} "
                                f"and {second}")


def refuse_one_class(targets: np.ndarray, task: str, names: list[str], csv: Path, where: str = "usable row") -> None:
    """A classifier needs at least two classes among the rows it can use, and among those it trains on."""
    if task not in ("binary-class", "multi-class"):
        return
    present = np.unique(targets[:, 0])
    if len(present) < 2:
        only = names[int(present[0])] if len(present) else "none"
        raise TaskDataError(f"{csv}: every {where} has the same label ({only}); a classifier needs two classes")
