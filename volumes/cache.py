"""The sharded HDF5 volume cache: its on-disk format and its read API.

Layout of a cache folder:
    cache.json        format version, storage dtype, the PreprocessConfig every volume went through
    manifest.csv      one row per input: source, status (ok/skipped), reason, shard, key, ...
    shard-00000.h5 …  one HDF5 file per shard; each volume a dataset `volumes/<key>` of shape
                      (C, D, H, W), chunked 64^3, blosc-lz4 compressed, geometry and settings as attributes

Volumes are stored as uint16 (value * 65535): the measured choice (docs/cache.md, "Storage dtype").
Reading never opens HDF5 files before a DataLoader forks: files open lazily, once per process.
"""
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np
import pandas as pd

from ..util.capped import print_capped
from ..util.errors import DataError, VolMAEError
from .preprocess import PreprocessConfig
from .stored import to_unit_float

CACHE_FORMAT = "volmae-hdf5-cache"
CACHE_VERSION = 1
META_FILE = "cache.json"
MANIFEST_FILE = "manifest.csv"
CHUNK_EDGE = 64
CHUNK_CACHE_BYTES = 64 * 2**20  # h5py's default 1 MiB per dataset is too small for 64^3 crops
STORAGE_DTYPES = ("uint16", "uint8", "float16", "float32")
DEFAULT_STORAGE_DTYPE = "uint16"
SHARD_FILE = re.compile(r"shard-\d{5}\.h5")  # the only names build_cache gives: a manifest cannot point elsewhere


def compression() -> hdf5plugin.Blosc:
    return hdf5plugin.Blosc(cname="lz4", clevel=5, shuffle=hdf5plugin.Blosc.SHUFFLE)


def encode(volume: np.ndarray, dtype: str) -> np.ndarray:
    """[0, 1] float32 -> stored array: integers scaled to their full range, or floats as they are."""
    if dtype in ("uint16", "uint8"):
        top = np.iinfo(dtype).max
        return np.rint(np.clip(volume, 0.0, 1.0) * top).astype(dtype)
    return volume.astype(dtype)


def chunk_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1, *(min(CHUNK_EDGE, s) for s in shape[1:]))


def write_volume(group: h5py.Group, key: str, volume: np.ndarray, dtype: str, attrs: dict) -> None:
    stored = encode(volume, dtype)
    dataset = group.create_dataset(key, data=stored, chunks=chunk_shape(stored.shape), **compression())
    for name, value in attrs.items():
        dataset.attrs[name] = value


def is_cache(path: str | os.PathLike) -> bool:
    return (Path(path) / META_FILE).is_file()


def read_meta(root: Path) -> dict:
    meta = json.loads((root / META_FILE).read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{root / META_FILE}: not a VolMAE cache")
    if meta.get("version") != CACHE_VERSION:
        raise ValueError(f"{root / META_FILE}: cache version {meta.get('version')}, this VolMAE reads {CACHE_VERSION}")
    return meta


class CacheReadError(VolMAEError, OSError):
    """One cached volume that cannot be read: the shard, the key, the source file and the reason."""


class CacheError(DataError):
    """A cache that cannot be trusted as a whole; the message says why, in one line."""


def _checked_meta(root: Path) -> tuple[dict, PreprocessConfig]:
    """cache.json, refused in one line when it cannot describe a cache."""
    path = root / META_FILE
    try:
        meta = read_meta(root)
        config = PreprocessConfig.from_dict(meta["preprocess"])
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"{path} is malformed: {err}") from None
    if meta.get("dtype") not in STORAGE_DTYPES:
        raise CacheError(f"{path}: dtype {meta.get('dtype')!r} is not one of {', '.join(STORAGE_DTYPES)}")
    return meta, config


def dataset_problem(group: h5py.Group, key: str, dtype: np.dtype, shape: tuple[int, ...]) -> str | None:
    """Why the volume `key` of a shard's group is not a plain dataset of this file with the cache's dtype and
    shape (external storage, links, virtual datasets and odd dtypes would read other files or other values)."""
    link = group.get(key, getlink=True)
    if link is None:
        return "missing from its shard"
    if not isinstance(link, h5py.HardLink):
        return f"a {type(link).__name__}, not a dataset stored in the shard"
    dataset = group[key]
    if not isinstance(dataset, h5py.Dataset):
        return "not a dataset"
    if dataset.is_virtual:
        return "a virtual dataset (its data live elsewhere)"
    if dataset.external:
        return "stored in external files"
    if dataset.dtype != dtype:
        return f"stored as {dataset.dtype}, cache.json says {dtype}"
    if dataset.shape != shape:
        return f"shape {dataset.shape}, cache.json says {shape}"
    return None


class VolumeCache:
    """`VolumeCache(DIR)`: len(c), c[i] -> float32 (C, D, H, W) in [0, 1], c.manifest (ok rows, index order)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not is_cache(self.root):
            raise FileNotFoundError(f"{self.root}: not a VolMAE cache (no {META_FILE}); "
                                    f"build one with `volmae-cache`")
        self.meta, self.preprocess = _checked_meta(self.root)
        if not (self.root / MANIFEST_FILE).is_file():
            raise CacheError(f"{self.root} is an unfinished cache (no {MANIFEST_FILE}: its build was stopped); run "
                             f"the same volmae-cache command again to finish it")
        table = pd.read_csv(self.root / MANIFEST_FILE, keep_default_na=False)
        ok = table[table["status"] == "ok"].sort_values("index").reset_index(drop=True)
        self.unreadable = self._verify(ok)
        self.manifest = ok[~ok["source"].isin(self.unreadable)].reset_index(drop=True)
        self._locations = list(zip(self.manifest["shard"], self.manifest["key"]))
        self._sources = list(self.manifest["source"])
        self._files: dict[str, h5py.File] = {}
        self._pid = None

    def _verify(self, manifest: pd.DataFrame) -> dict[str, str]:
        """Open every shard once and check each volume's link, storage, dtype and shape against cache.json:
        source -> why it is left out. A shard whose every volume disagrees in the same way (dtype or shape)
        means cache.json is wrong, and the whole cache is refused."""
        dtype, shape = np.dtype(self.meta["dtype"]), self.shape
        unreadable: dict[str, str] = {}
        for shard, rows in manifest.groupby("shard", sort=True):
            if not SHARD_FILE.fullmatch(str(shard)):
                unreadable.update(dict.fromkeys(rows["source"], f"{self.root / MANIFEST_FILE} names the shard "
                                                                 f"{shard!r}, not a shard file of this cache folder"))
                continue
            try:
                with h5py.File(self.root / shard, "r") as handle:
                    group = handle.get("volumes", getclass=False)
                    problems = {source: dataset_problem(group, key, dtype, shape) if group is not None
                                else "the shard has no 'volumes' group" for source, key in zip(rows["source"], rows["key"])}
            except OSError as err:
                reason = re.sub(r"\s+", " ", str(err).strip())
                problems = dict.fromkeys(rows["source"], f"{self.root / shard} cannot be opened: {reason}")
            problems = {source: why for source, why in problems.items() if why}
            mismatch = {why for why in problems.values() if "cache.json says" in why}
            if len(problems) == len(rows) and len(mismatch) == 1:
                raise CacheError(f"{self.root / META_FILE} disagrees with {self.root / shard}: every volume is "
                                 f"{mismatch.pop()}")
            unreadable.update({source: why if why.startswith(str(self.root)) else f"{self.root / shard}: {why}"
                               for source, why in problems.items()})
        if unreadable:
            print_capped(f"warning: {len(unreadable)} volume(s) of the cache {self.root} left out:",
                         [f"{source}: {why}" for source, why in sorted(unreadable.items())])
        return unreadable

    def __len__(self) -> int:
        return len(self.manifest)

    @property
    def shape(self) -> tuple[int, ...]:
        return (1, *self.preprocess.size)

    def _dataset(self, i: int) -> h5py.Dataset:
        if self._pid != os.getpid():  # after a fork, handles of the parent must not be reused
            self._files, self._pid = {}, os.getpid()
        shard, key = self._locations[i]
        handle = self._files.get(shard)
        if handle is None:
            handle = h5py.File(self.root / shard, "r", rdcc_nbytes=CHUNK_CACHE_BYTES, rdcc_nslots=10007)
            self._files[shard] = handle
        return handle["volumes"][key]

    def read_stored(self, i: int, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """Volume i as stored (e.g. uint16), or the (D, H, W) `box` of it (only the chunks it touches are read)."""
        with self._reading(i):
            dataset = self._dataset(i)
            return dataset[(slice(None), *box)] if box is not None else dataset[()]

    def read_into(self, i: int, out: np.ndarray, box: tuple[slice, ...] | None = None) -> None:
        """Decompress volume i (or its box) straight into `out`, a C-contiguous array of the stored dtype."""
        with self._reading(i):
            dataset = self._dataset(i)
            dataset.read_direct(out, np.s_[(slice(None), *box)] if box is not None else None)

    @contextmanager
    def _reading(self, i: int) -> Iterator[None]:
        """A damaged, truncated or missing shard, or a missing key, as a CacheReadError naming the volume."""
        try:
            yield
        except (OSError, KeyError, ValueError, RuntimeError) as err:
            shard, key = self._locations[i]
            self._files.pop(shard, None)
            reason = re.sub(r"\s+", " ", str(err).strip()) or type(err).__name__
            raise CacheReadError(f"{self.root / shard}, volume {key} (from {self._sources[i]}): {reason}") from None

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def read(self, i: int, box: tuple[slice, ...] | None = None) -> np.ndarray:
        """Volume i (or a box of it) as float32 in [0, 1]."""
        return to_unit_float(self.read_stored(i, box))

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"cache index {i} out of range for {len(self)} volumes")
        return self.read(i % len(self))

    def attrs(self, i: int) -> dict:
        return dict(self._dataset(i).attrs)

    def source(self, i: int) -> str:
        return self._sources[i]

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files = {}
