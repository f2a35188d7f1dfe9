"""Checks of a labels table before anything trains on it: tables that leak or lie are refused or cleaned here,
each finding naming the CSV rows, because a model trained on them reports a score that means nothing (the
same scan in train and val scores AUC 1.0; an empty label becomes a class of its own)."""
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

from .task_data import SPLITS, TaskDataError

CSV_FIRST_ROW = 2  # the line of the first data row: the header is line 1
MISSING = {"", "nan", "na", "n/a", "none", "null"}


def missing_labels(table: pd.DataFrame, labels: list[str]) -> np.ndarray:
    """Rows with an empty or NaN-like value in any label column: they are left out, never made a class."""
    present = [column for column in labels if column in table.columns]
    if not present:
        return np.zeros(len(table), dtype=bool)
    return table[present].apply(lambda column: column.astype(str).str.strip().str.lower().isin(MISSING)).any(
        axis=1).to_numpy()


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
