"""The rows of a prediction CSV: validated up front, each loaded the way the model's training data was.

A row's path may be
  - a NIfTI/MHA/NRRD file or a DICOM series folder: the checkpoint's volume preprocessing (that of
    the cache or volumes it was trained on, the project defaults otherwise) onto its input grid;
  - an .npy/.npz array in the training data's raw form (a MedMNIST volume as stored in its npz:
    uint8, D x H x W; 2D: H x W or H x W x 3), given the training normalisation; `file.npz::name`
    picks one array of several;
  - `<cache folder>::<key>`, an entry of a VolMAE HDF5 cache.
A model trained on slice stacks (the SLIViT setup) takes volume files, DICOM folders and folders of
2D slices, and MedMNIST arrays, all through the same slice selection and quantisation as in training.
A row that cannot be loaded carries its reason instead of an input; the others go on.
"""
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from ..util.errors import DataError
from ..volumes.cache import CacheError, CacheReadError, VolumeCache, encode, is_cache
from ..volumes.preprocess import PreprocessConfig, load_volume
from ..volumes.reading import VolumeReadError, listed_path
from ..volumes.stored import to_unit_float
from .medmnist_data import to_channels_first
from .pretrain_augment import crop_box
from .slices import load_stack, stack_input

ARRAY_SUFFIXES = (".npy", ".npz")


class CasesError(DataError):
    """The CSV itself cannot be used (missing, empty, no path column); nothing is predicted."""


class CaseError(DataError):
    """One row cannot be used; the message is its `error` column."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects, from its checkpoint."""
    input_size: tuple[int, ...]
    in_chans: int
    raw_scale: float | None  # arrays in the training data's raw form are multiplied by this
    preprocess: PreprocessConfig | None  # for volume files
    slice_stack: tuple[int, str, int] | None = None  # (slices, sparsing, slice size) of the SLIViT setup
    stored_dtype: str | None = None  # volumes trained on went through a cache in this dtype: so do these

    @classmethod
    def from_meta(cls, meta: dict, external_data: bool = False) -> "InputSpec":
        """The checkpoint's preprocessing; whether a detached header may name an outside data file is the
        predicting user's choice (`external_data`), not the training run's."""
        data = meta.get("data") or {}
        input_size = tuple(meta["input_size"])
        preprocess = meta.get("preprocess")
        config = PreprocessConfig.from_dict({**preprocess, "external_data": external_data}) if preprocess else \
            PreprocessConfig(size=input_size, external_data=external_data) if len(input_size) == 3 else None
        in_chans = int(data.get("in_chans", meta.get("model_config", {}).get("in_chans", 1)))
        stack = (int(data["slices"]), str(data["sparsing"]), int(data["slice_size"])) if "sparsing" in data else None
        return cls(input_size, in_chans, data.get("raw_scale"), config, stack, data.get("stored_dtype"))


def read_cases(csv_path: str | Path, path_col: str = "path", id_col: str = "id",
               path_flag: str | None = "--path_col") -> pd.DataFrame:
    """The CSV as strings (so every other column passes through unchanged), validated; `path_flag` is the flag of
    the calling command that names the path column, for the advice when it is missing (None: it has none)."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CasesError(f"{csv_path}: no such file")
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CasesError(f"{csv_path}: empty file") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise CasesError(f"{csv_path}: not a readable CSV ({err})") from None
    if path_col not in table.columns:
        advice = f"name the path column with {path_flag}" if path_flag else f"the column must be called '{path_col}'"
        raise CasesError(f"{csv_path}: no '{path_col}' column (columns: {', '.join(table.columns) or 'none'}); {advice}")
    if table.empty:
        raise CasesError(f"{csv_path}: no rows to predict")
    if id_col in table.columns and not table[id_col].is_unique:
        duplicated = table[id_col][table[id_col].duplicated()].iloc[0]
        raise CasesError(f"{csv_path}: '{id_col}' {duplicated!r} appears more than once")
    return table


@lru_cache(maxsize=8)
def _open_cache(folder: str) -> VolumeCache:
    return VolumeCache(folder)


def _fit_grid(volume: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Centre crop to the model's grid; a smaller grid cannot be used."""
    grid = volume.shape[1:]
    if grid == tuple(size):
        return volume
    if any(g < s for g, s in zip(grid, size)):
        raise CaseError(f"grid {grid} is smaller than the model's input {tuple(size)}")
    return volume[(slice(None), *crop_box(grid, size, None))]


def _raw_array(path: Path, key: str, spec: InputSpec) -> np.ndarray:
    try:
        loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise CaseError(f"cannot read the array: {err}") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        names = loaded.files
        if key:
            if key not in names:
                raise CaseError(f"no array {key!r} in the npz (it holds {', '.join(names)})")
            loaded = loaded[key]
        elif len(names) == 1:
            loaded = loaded[names[0]]
        else:
            raise CaseError(f"the npz holds {len(names)} arrays ({', '.join(names)}); name one as file.npz::name")
    array = np.asarray(loaded)
    if spec.slice_stack and array.dtype == np.uint8 and array.ndim == 3 and array.shape != spec.input_size:
        array = stack_input(to_unit_float(array), *spec.slice_stack)[0]
    dims = len(spec.input_size)
    if dims == 3 and array.ndim == 4 and array.shape[0] == spec.in_chans:
        array = array[0] if spec.in_chans == 1 else array
    if dims == 3 and array.ndim == 3:
        array = array[None]
    elif dims == 2 and array.ndim == 2:
        array = array[None]
    elif dims == 2 and array.ndim == 3 and array.shape[-1] == spec.in_chans:
        array = to_channels_first(array[None], is_3d=False)[0]
    if array.ndim != dims + 1 or array.shape[0] != spec.in_chans or tuple(array.shape[1:]) != spec.input_size:
        raise CaseError(f"array of shape {tuple(np.asarray(loaded).shape)} does not match the model's input "
                        f"({spec.in_chans} channel(s), {'x'.join(map(str, spec.input_size))})")
    if spec.raw_scale is not None:
        if array.dtype != np.uint8:
            raise CaseError(f"expected raw uint8 values as in the training data, got {array.dtype}")
        return array.astype(np.float32) * np.float32(spec.raw_scale)
    if not np.issubdtype(array.dtype, np.floating) or array.min() < 0 or array.max() > 1:
        raise CaseError("expected a preprocessed float volume in [0, 1] (the model was trained on volumes)")
    return array.astype(np.float32)


def load_case(text: str, base: Path, spec: InputSpec) -> np.ndarray:
    """One row's model input: float32 (C, *input_size), every value finite."""
    array = _load_case(text, base, spec)
    if not np.isfinite(array).all():
        raise CaseError(f"{int((~np.isfinite(array)).sum())} non-finite values (NaN/Inf)")
    return array


def _load_case(text: str, base: Path, spec: InputSpec) -> np.ndarray:
    if not text.strip():
        raise CaseError("empty path")
    path, key = listed_path(base, text)
    if not path.exists():
        raise CaseError(f"no such file or folder: {path}")
    if path.is_dir() and is_cache(path):
        try:  # the same checks as training: a crafted or damaged cache costs its rows, named
            cache = _open_cache(str(path))
            matches = cache.manifest.index[cache.manifest["key"] == key]
            if not len(matches):
                raise CaseError(f"no volume {key!r} in the cache {path} (or it was left out as unreadable)")
            return _fit_grid(cache.read(int(matches[0])), spec.input_size)
        except (CacheError, CacheReadError) as err:
            raise CaseError(str(err)) from None
    if path.suffix.lower() in ARRAY_SUFFIXES:
        return _raw_array(path, key, spec)
    if spec.slice_stack:
        try:
            return stack_input(load_stack(path), *spec.slice_stack).astype(np.float32) * np.float32(spec.raw_scale)
        except VolumeReadError as err:
            raise CaseError(str(err)) from None
    if len(spec.input_size) != 3 or spec.preprocess is None:
        raise CaseError("a 2D model takes arrays (.npy/.npz), not volume files")
    try:
        volume = load_volume(f"{path}{'::' + key if key else ''}", spec.preprocess, frames="refuse")
    except VolumeReadError as err:
        raise CaseError(str(err)) from None
    if spec.stored_dtype:  # the same rounding the training volumes had in their cache
        volume = to_unit_float(encode(volume, spec.stored_dtype))
    return _fit_grid(volume, spec.input_size)


class CaseDataset(Dataset):
    def __init__(self, paths: list[str], base: Path, spec: InputSpec):
        self.paths, self.base, self.spec = paths, base, spec

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, row: int) -> dict:
        """Any failure reading or preprocessing this row is the row's error, never the run's: a CaseError
        carries its own reason; anything else (a truncated .npy, a file that only looks like a zip, a
        decoder bug) is reported by its type and message."""
        try:
            return {"row": row, "input": torch.from_numpy(load_case(self.paths[row], self.base, self.spec)), "error": ""}
        except CaseError as err:
            return {"row": row, "input": None, "error": str(err)}
        except Exception as err:  # noqa: BLE001 - one unreadable row must not lose the others
            return {"row": row, "input": None, "error": f"{type(err).__name__}: {err}".rstrip(": ")}


def collate_cases(items: list[dict]) -> dict:
    loaded = [item for item in items if item["input"] is not None]
    return {"rows": [item["row"] for item in loaded],
            "input": torch.stack([item["input"] for item in loaded]) if loaded else None,
            "failed": [(item["row"], item["error"]) for item in items if item["input"] is None]}
