"""Labelled train and validation images for the pretraining probes (`main_pretrain.py --probe_*`).

Either a MedMNIST flag (its official train and val splits), or a CSV of the user's own volumes with
columns `path`, `label` and `split` (train or val), preprocessed exactly as the pretraining data.
Images come back as float32 in [0, 1] on the model's grid.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..util.errors import DataError
from ..volumes.preprocess import PreprocessConfig, load_volume
from ..volumes.reading import VolumeReadError, listed_source
from ..volumes.stored import to_unit_float
from .medmnist_data import MedMNISTNotFound, MedMNISTSpec, load_split
from .pretrain_augment import crop_box

PROBE_SPLITS = ("train", "val")


class ProbeDataError(DataError):
    """The probe's labelled data cannot be used; the message names the file, row and reason."""


@dataclass
class ProbeSet:
    name: str
    task: str  # medmnist's vocabulary
    num_classes: int
    splits: dict[str, tuple[np.ndarray, np.ndarray]]  # split -> (float32 (N, C, *grid) in [0, 1], labels (N, k))

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(self.splits["train"][0].shape[2:])

    def describe(self) -> str:
        return f"{self.name}: " + ", ".join(f"{s} {len(v[0])}" for s, v in self.splits.items())


def medmnist_probe_set(flag: str, size: int, root: str) -> ProbeSet:
    try:
        spec = MedMNISTSpec(flag, size, root)
        splits = {}
        for split in PROBE_SPLITS:
            images, labels = load_split(spec, split)
            splits[split] = (to_unit_float(images), labels)
    except (MedMNISTNotFound, ValueError) as err:
        raise ProbeDataError(str(err)) from None
    return ProbeSet(f"{flag} ({size})", spec.task, len(spec.class_names), splits)


def csv_probe_set(csv: Path, config: PreprocessConfig, grid: tuple[int, ...]) -> ProbeSet:
    """Volumes listed in `csv` (path, label, split), preprocessed with `config` and centre-cropped to `grid`
    (the model's input, smaller than a cache's grid when pretraining crops)."""
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ProbeDataError(f"{csv}: not a readable CSV ({err})") from None
    missing = {"path", "label", "split"} - set(table.columns)
    if missing:
        raise ProbeDataError(f"{csv}: missing column(s) {', '.join(sorted(missing))} (need path, label, split)")
    names = sorted(table["label"].unique())
    index = {name: i for i, name in enumerate(names)}
    splits: dict[str, tuple[list, list]] = {split: ([], []) for split in PROBE_SPLITS}
    rows = list(table.itertuples(index=False))
    for row, record in enumerate(tqdm(rows, desc="probe volumes", leave=False), start=2):
        if record.split not in PROBE_SPLITS:
            raise ProbeDataError(f"{csv}, row {row}: split {record.split!r} is not train or val")
        if not record.path.strip() or not record.label.strip():
            raise ProbeDataError(f"{csv}, row {row}: empty path or label")
        try:
            volume = load_volume(listed_source(csv.parent, record.path), config)
            volume = volume[(slice(None), *crop_box(volume.shape[1:], grid, None))]
        except (VolumeReadError, RuntimeError, OSError) as err:
            raise ProbeDataError(f"{csv}, row {row}: {record.path}: {err}") from None
        splits[record.split][0].append(volume)
        splits[record.split][1].append([index[record.label]])
    for split, (_, labels) in splits.items():
        if len({label[0] for label in labels}) < (2 if split == "train" else 1):
            raise ProbeDataError(f"{csv}: the {split} split needs {'two classes' if split == 'train' else 'a row'}")
    task = "binary-class" if len(names) == 2 else "multi-class"
    arrays = {split: (np.stack(images).astype(np.float32), np.asarray(labels, dtype=np.int64))
              for split, (images, labels) in splits.items()}
    return ProbeSet(str(csv), task, len(names), arrays)
