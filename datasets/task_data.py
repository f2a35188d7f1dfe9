"""The data of a fine-tuning run, whatever the setup: splits of (stored images, labels), the images uint8,
or uint16 in the volumes setup; the task, class names, the input grid and what a checkpoint must remember
to preprocess the same way.

  medmnist / vitmednet  MedMNIST files as published (3D or 2D)
  slivit               a meta CSV of volumes (pid, path, label columns, optional split), or a MedMNIST3D
                       flag (the SLIViT NoduleMNIST3D case study), as stacks of N slices of S x S
  slivit_backbone      a meta CSV of 2D images with one-hot pathology columns (the Kermany format)
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..util.atomic import atomic_write
from ..util.errors import DataError
from ..util.metrics import MULTI_LABEL, REGRESSION
from ..volumes.preprocess import PreprocessConfig
from ..volumes.reading import VolumeReadError, listed_source
from ..volumes.stored import to_unit_float
from .medmnist_data import MedMNISTSpec, load_split
from .slices import load_stack, stack_input, to_uint8

TASKS = {"binary": "binary-class", "multiclass": "multi-class", "multilabel": MULTI_LABEL, "reg": REGRESSION}
SPLITS = ("train", "val", "test")


class TaskDataError(DataError):
    """The meta CSV or split file cannot be used; the message names the file, row and reason."""


@dataclass
class TaskData:
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # name -> (uint8 or uint16 (N, C, *grid), labels (N, k))
    task: str  # medmnist's vocabulary, or "regression"
    class_names: list[str]  # one per model output
    input_size: tuple[int, ...]
    in_chans: int
    data: dict  # stored in checkpoints: how inputs were made
    medmnist: MedMNISTSpec | None = None  # when the splits are MedMNIST's own (Evaluator CSVs)
    preprocess: PreprocessConfig | None = None  # volume files: how prediction must preprocess them
    groups: dict[str, np.ndarray] | None = None  # split -> the patient of each sample (label-fraction subsets)
    sources: dict[str, np.ndarray] | None = None  # split -> the file of each sample, when samples are files
    report: dict = field(default_factory=dict)  # what results.json records about the data (excluded rows, ...)


def medmnist_task(spec: MedMNISTSpec, download: bool) -> TaskData:
    splits = {split: load_split(spec, split, download) for split in SPLITS}
    return TaskData(splits, spec.task, spec.class_names, spec.input_size, spec.in_chans, spec.to_dict(), spec)


def _resize_stack(volumes: np.ndarray, slices: int, sparsing: str, size: int) -> np.ndarray:
    """MedMNIST (N, 1, D, H, W) uint8 -> (N, 1, slices, size, size) uint8."""
    out = [stack_input(to_unit_float(v[0]), slices, sparsing, size) for v in volumes]
    return np.stack(out)


def read_split_file(path: Path, total: int) -> pd.DataFrame:
    """MedMNIST's `split,index,image_id` format: `index` is the position in train+val+test concatenated."""
    table = pd.read_csv(path)
    missing = {"split", "index"} - set(table.columns)
    if missing:
        raise TaskDataError(f"{path}: missing column(s) {', '.join(sorted(missing))} (expected split,index,image_id)")
    for row, (split, index) in enumerate(zip(table["split"], table["index"]), start=2):
        if split not in SPLITS:
            raise TaskDataError(f"{path}, row {row}: split {split!r} is not one of {', '.join(SPLITS)}")
        if not 0 <= int(index) < total:
            raise TaskDataError(f"{path}, row {row}: index {index} outside 0..{total - 1}")
    return table


def slivit_medmnist_task(spec: MedMNISTSpec, slices: int, sparsing: str, size: int, download: bool,
                         split_file: str | None = None) -> TaskData:
    if not spec.is_3d:
        raise TaskDataError(f"the SLIViT setup takes 3D sets; {spec.flag} is 2D")
    base = medmnist_task(spec, download)
    splits = {name: (_resize_stack(images, slices, sparsing, size), labels)
              for name, (images, labels) in tqdm(base.splits.items(), desc="slicing", leave=False)}
    if split_file:
        images = np.concatenate([splits[s][0] for s in SPLITS])
        labels = np.concatenate([splits[s][1] for s in SPLITS])
        table = read_split_file(Path(split_file), len(images))
        splits = {s: (images[table["index"][table["split"] == s].to_numpy()],
                      labels[table["index"][table["split"] == s].to_numpy()]) for s in SPLITS}
    data = {**spec.to_dict(), "slices": slices, "sparsing": sparsing, "slice_size": size,
            "input_size": [slices, size, size]}
    return TaskData(splits, spec.task, spec.class_names, (slices, size, size), 1, data,
                    spec if not split_file else None)


def infer_task(table: pd.DataFrame, labels: list[str], requested: str) -> str:
    if requested != "auto":
        return TASKS[requested]
    if len(labels) > 1:
        return MULTI_LABEL
    values = pd.to_numeric(table[labels[0]], errors="coerce")
    if values.isna().any() or (values % 1 != 0).any():
        return REGRESSION if not values.isna().any() else "multi-class"
    return "binary-class" if set(values.unique()) <= {0, 1} else "multi-class"


def label_arrays(table: pd.DataFrame, labels: list[str], task: str, csv: Path) -> tuple[np.ndarray, list[str]]:
    """(labels (N, k), output names) with the CSV row of the first bad value in any error."""
    for column in labels:
        if column not in table.columns:
            raise TaskDataError(f"{csv}: no label column {column!r} (columns: {', '.join(table.columns)})")
    if task == "multi-class":
        raw = table[labels[0]].astype(str)
        numeric = pd.to_numeric(raw, errors="coerce")
        names = [str(int(v)) for v in sorted(numeric.unique())] if not numeric.isna().any() else sorted(raw.unique())
        index = {name: i for i, name in enumerate(names)}
        keys = [str(int(v)) for v in numeric] if not numeric.isna().any() else list(raw)
        return np.array([[index[k]] for k in keys], dtype=np.int64), names
    values = table[labels].apply(pd.to_numeric, errors="coerce")
    bad = values.isna().any(axis=1)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
        raise TaskDataError(f"{csv}, row {row}: a label in {', '.join(labels)} is not a number")
    if task == REGRESSION:
        return values.to_numpy(np.float32), list(labels)
    if not values.isin([0, 1]).all().all():
        raise TaskDataError(f"{csv}: {task} labels must be 0 or 1")
    names = [f"{labels[0]}=0", f"{labels[0]}=1"] if task == "binary-class" else list(labels)
    return values.to_numpy(np.int64), names


MISSING_VALUES = {"", "nan", "na", "n/a", "none", "null"}  # what a spreadsheet or pandas writes for "no value"


def missing_rows(values: pd.Series) -> np.ndarray:
    """Positions of empty or NaN-like values (`NaN`, `None`, `n/a`, ...)."""
    return np.flatnonzero(values.astype(str).str.strip().str.lower().isin(MISSING_VALUES).to_numpy())


def assign_splits(table: pd.DataFrame, ratio: tuple[float, float, float], seed: int, csv: Path,
                  group: str = "pid", strata: pd.Series | None = None) -> pd.Series:
    """The CSV's `split` column, or a split by patient (the `group` column: all rows of a patient land in one
    split) in the given train/val/test ratio; with `strata` (a class per row) stratified by it, so that every
    split holds each class in about the ratio (split_groups)."""
    if "split" in table.columns:
        bad = ~table["split"].isin(SPLITS)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
            raise TaskDataError(f"{csv}, row {row}: split {table['split'].iloc[row - 2]!r} is not train, val or test")
        return table["split"]
    if group not in table.columns:
        raise TaskDataError(f"{csv}: needs a '{group}' column to split by patient (name it with --group), or a "
                            f"'split' column")
    missing = missing_rows(table[group])
    if len(missing):
        rows = ", ".join(str(i + 2) for i in missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
        raise TaskDataError(f"{csv}, rows {rows}: no patient in '{group}' (empty or {table[group].iloc[missing[0]]!r}); "
                            f"each row needs its patient, or those rows would be taken for one patient")
    if len(ratio) != 3 or min(ratio) < 0 or sum(ratio) <= 0:
        raise TaskDataError(f"--split_ratio must be three non-negative shares (train,val,test), got {ratio}")
    groups = table[group].astype(str).str.strip()
    assignment = split_groups(groups.to_numpy(), None if strata is None else strata.to_numpy(), ratio, seed)
    return pd.Series([SPLITS[i] for i in assignment], index=table.index)


def group_strata(groups: np.ndarray, strata: np.ndarray) -> dict[str, str]:
    """Each patient's stratum: the rarest class among its rows (a patient with a malignant and a benign nodule
    counts as malignant, the rarer class, whose share in small splits is the one at risk)."""
    counts = pd.Series(strata).value_counts()
    table = pd.DataFrame({"group": groups, "rarity": [counts[s] for s in strata], "stratum": strata})
    chosen = table.sort_values(["rarity", "stratum"], kind="stable").drop_duplicates("group")
    return dict(zip(chosen["group"], chosen["stratum"]))


def split_groups(groups: np.ndarray, strata: np.ndarray | None, shares: tuple[float, ...], seed: int) -> np.ndarray:
    """For each row, the index of its part (train, val, test; or fold 0..k-1): all rows of a patient in one part,
    the patients of each stratum dealt out in proportion to `shares`. Within a stratum the quotas are floored
    and the remaining patients go where the running total is furthest below its share, so parts stay in
    proportion overall as well as per stratum."""
    rng = np.random.default_rng(seed)
    unique = list(dict.fromkeys(groups))
    stratum_of = group_strata(groups, strata) if strata is not None else dict.fromkeys(unique, "")
    weights = np.array(shares, dtype=float) / sum(shares)
    dealt, seen, part_of = np.zeros(len(weights)), 0, {}
    for stratum in sorted(set(stratum_of.values()), key=str):
        patients = rng.permutation(sorted(p for p in unique if stratum_of[p] == stratum))
        seen += len(patients)
        counts = np.floor(weights * len(patients)).astype(int)
        for _ in range(len(patients) - counts.sum()):
            deficit = np.where(weights > 0, weights * seen - dealt - counts, -np.inf)
            counts[int(np.argmax(deficit))] += 1
        dealt += counts
        for part, members in enumerate(np.split(patients, np.cumsum(counts)[:-1])):
            part_of.update(dict.fromkeys(members, part))
    return np.array([part_of[g] for g in groups])


def _resolve_paths(table: pd.DataFrame, column: str, csv: Path) -> None:
    """Paths relative to the meta CSV made absolute, so the split CSV written elsewhere still points at them."""
    table[column] = [listed_source(csv.parent, path, canonical=True) if path else path for path in table[column]]


def meta_volume_task(csv: Path, labels: list[str], requested_task: str, ratio: tuple[float, float, float],
                     slices: int, sparsing: str, size: int, seed: int, output_dir: Path) -> TaskData:
    """SLIViT's meta CSV: each row's volume (file, DICOM folder or slice folder) as a slice stack."""
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    if "path" not in table.columns or table.empty:
        raise TaskDataError(f"{csv}: needs a 'path' column and at least one row")
    task = infer_task(table, labels, requested_task)
    targets, names = label_arrays(table, labels, task, csv)
    table["split"] = assign_splits(table, ratio, seed, csv)
    _resolve_paths(table, "path", csv)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "meta_split.csv", lambda tmp: table.to_csv(tmp, index=False))
    stacks = []
    for row, path in enumerate(tqdm(table["path"], desc="reading volumes", leave=False), start=2):
        try:
            stacks.append(stack_input(load_stack(Path(path)), slices, sparsing, size))
        except (VolumeReadError, OSError, RuntimeError) as err:
            raise TaskDataError(f"{csv}, row {row} ({path}): {err}") from None
    images = np.stack(stacks)
    splits = {s: (images[(table["split"] == s).to_numpy()], targets[(table["split"] == s).to_numpy()]) for s in SPLITS}
    empty = [s for s in ("train", "val") if not len(splits[s][0])]
    if empty:
        raise TaskDataError(f"{csv}: the {' and '.join(empty)} split(s) would be empty; give more rows or a split column")
    data = {"source": "meta_csv", "meta": str(csv), "labels": labels, "slices": slices, "sparsing": sparsing,
            "slice_size": size, "input_size": [slices, size, size], "in_chans": 1, "raw_scale": 1 / 255}
    return TaskData(splits, task, names, (slices, size, size), 1, data)


def meta_image_task(csv: Path, labels: list[str], ratio: tuple[float, float, float], size: int, seed: int,
                    output_dir: Path) -> TaskData:
    """2D images with one-hot pathology columns (SLIViT's backbone pretraining), as 3-channel S x S."""
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    path_column = "path" if "path" in table.columns else "Path" if "Path" in table.columns else None
    if path_column is None or table.empty:
        raise TaskDataError(f"{csv}: needs a 'path' (or 'Path') column and at least one row")
    onehot, _ = label_arrays(table, labels, MULTI_LABEL, csv)
    if not (onehot.sum(axis=1) == 1).all():
        row = int(np.flatnonzero(onehot.sum(axis=1) != 1)[0]) + 2
        raise TaskDataError(f"{csv}, row {row}: exactly one of {', '.join(labels)} must be 1")
    targets = onehot.argmax(axis=1)[:, None]
    table["split"] = assign_splits(table, ratio, seed, csv) if "pid" in table.columns or "split" in table.columns \
        else assign_splits(table.assign(pid=table[path_column]), ratio, seed, csv)
    _resolve_paths(table, path_column, csv)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / "meta_split.csv", lambda tmp: table.to_csv(tmp, index=False))
    images = []
    for row, path in enumerate(table[path_column], start=2):
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.float32)
        except RuntimeError:
            raise TaskDataError(f"{csv}, row {row}: cannot read {path}") from None
        gray = array.mean(axis=-1) if array.ndim == 3 and array.shape[-1] in (3, 4) else array.reshape(array.shape[-2:])
        low, high = np.percentile(gray, [0.5, 99.5])
        gray = np.clip((gray - low) / max(high - low, 1e-6), 0, 1)
        resized = F.interpolate(torch.from_numpy(gray)[None, None], size=(size, size), mode="bilinear",
                                antialias=True, align_corners=False)[0].expand(3, -1, -1).numpy()
        images.append(to_uint8(resized))
    images = np.stack(images)
    splits = {s: (images[(table["split"] == s).to_numpy()], targets[(table["split"] == s).to_numpy()]) for s in SPLITS}
    data = {"source": "meta_images", "meta": str(csv), "labels": labels, "input_size": [size, size], "in_chans": 3,
            "raw_scale": 1 / 255}
    return TaskData(splits, "multi-class", list(labels), (size, size), 3, data)
