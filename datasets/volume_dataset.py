"""Pretraining datasets: volume files preprocessed on the fly, or volumes from the HDF5 cache.

Both yield {"volume", "index", "source", "error"} plus the sample's augmentation parameters
(applied on the batch by `datasets.pretrain_augment.finish_batch`); cached volumes stay in their stored dtype.
A source that fails to load does not stop training: its item carries the error instead of a volume, `collate_volumes` drops it from the
batch and reports it, and the run counts it.
"""
import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from ..volumes.cache import CacheReadError, VolumeCache
from ..volumes.preprocess import PreprocessConfig, load_volume
from ..volumes.reading import VolumeReadError
from .pretrain_augment import crop_box, draw_params, sample_rng


class _EpochSeeded(Dataset):
    """Per-sample random streams keyed on (seed, epoch, index); the loop calls set_epoch."""

    def __init__(self, augment: bool, seed: int):
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator | None:
        return sample_rng(self.seed, self.epoch, index) if self.augment else None

    @staticmethod
    def item(index: int, source: str, volume: np.ndarray | None = None, error: str = "",
             rng: np.random.Generator | None = None) -> dict:
        tensor = torch.from_numpy(np.ascontiguousarray(volume)) if volume is not None else None
        return {"volume": tensor, "index": index, "source": source, "error": error, **draw_params(rng)}


class VolumeFileDataset(_EpochSeeded):
    """Reads and preprocesses each volume file at every access (for small corpora)."""

    def __init__(self, sources: list[str], config: PreprocessConfig, augment: bool = False, seed: int = 0):
        super().__init__(augment, seed)
        self.sources = list(sources)
        self.config = config

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        try:
            volume = load_volume(source, self.config)
        except (VolumeReadError, RuntimeError, OSError) as err:
            return self.item(index, source, error=str(err))
        return self.item(index, source, volume, rng=self.rng(index))


class CacheDataset(_EpochSeeded):
    """Volumes from a VolumeCache, cropped to `input_size` (randomly when augmenting) and augmented."""

    def __init__(self, cache: VolumeCache, input_size: tuple[int, int, int], augment: bool = False, seed: int = 0):
        super().__init__(augment, seed)
        grid = cache.preprocess.size
        if any(i > g for i, g in zip(input_size, grid)):
            raise ValueError(f"input size {tuple(input_size)} is larger than the cache's grid {tuple(grid)}")
        self.cache = cache
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.cache)

    def _box(self, rng: np.random.Generator | None) -> tuple[slice, ...] | None:
        if self.input_size == tuple(self.cache.preprocess.size):
            return None
        return crop_box(self.cache.preprocess.size, self.input_size, rng)

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        try:
            volume = self.cache.read_stored(index, self._box(rng))
        except CacheReadError as err:  # one bad sample, counted against --max_bad_samples like a bad file
            return self.item(index, self.cache.source(index), error=str(err))
        return self.item(index, self.cache.source(index), volume, rng=rng)

    def __getitems__(self, indices: list[int]) -> dict:
        """A whole batch, already collated: each volume is decompressed straight into one batch
        tensor, in shared memory inside a loader worker, so nothing is copied after reading. A volume
        the cache cannot read is left out of the batch and listed in `failed`, like a bad file."""
        volumes = _batch_tensor((len(indices), 1, *self.input_size), self.cache.stored_dtype)
        items, rows, failed = [], [], []
        for row, index in enumerate(indices):
            rng = self.rng(index)
            try:
                self.cache.read_into(index, volumes[row].numpy(), self._box(rng))
            except CacheReadError as err:
                failed.append((self.cache.source(index), str(err)))
                continue
            rows.append(row)
            items.append({"index": index, **draw_params(rng)})
        if failed:
            volumes = volumes[rows] if rows else None
        return {"volume": volumes, **_stack_params(items), "failed": failed}


class ArrayPretrainDataset(_EpochSeeded):
    """Images already on a fixed grid, e.g. a MedMNIST training split as (N, C, *grid) uint8.
    `jitter=False` keeps intensities as they are (masks and label maps: flips only)."""

    def __init__(self, images: np.ndarray, name: str, augment: bool = False, seed: int = 0, jitter: bool = True):
        super().__init__(augment, seed)
        self.images = images
        self.name = name
        self.jitter = jitter

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        item = self.item(index, f"{self.name}[{index}]", self.images[index])
        return {**item, **draw_params(self.rng(index), self.jitter)}


def _batch_tensor(shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """An uninitialised tensor, allocated in shared memory when in a loader worker (as default_collate does)."""
    example = torch.from_numpy(np.empty(0, dtype=dtype))
    if get_worker_info() is None:
        return torch.empty(shape, dtype=example.dtype)
    storage = example._typed_storage()._new_shared(int(np.prod(shape)), device=example.device)
    return example.new(storage).resize_(*shape)


def _stack_params(items: list[dict]) -> dict:
    return {
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
        "flip": torch.tensor([item["flip"] for item in items], dtype=torch.bool),
        "gain": torch.tensor([item["gain"] for item in items], dtype=torch.float32),
        "offset": torch.tensor([item["offset"] for item in items], dtype=torch.float32),
    }


def collate_volumes(items: list[dict] | dict) -> dict:
    """Stack the loaded volumes; list the failed sources with their reasons.

    A dict is a batch a dataset fetched whole (`CacheDataset.__getitems__`) and passes through.
    """
    if isinstance(items, dict):
        return items
    loaded = [item for item in items if item["volume"] is not None]
    return {
        # default_collate stacks straight into shared memory inside a loader worker: no extra copy
        "volume": default_collate([item["volume"] for item in loaded]) if loaded else None,
        **_stack_params(loaded),
        "failed": [(item["source"], item["error"]) for item in items if item["volume"] is None],
    }


def single_threaded_worker(_worker_id: int) -> None:
    """Loader workers already run in parallel; more ITK threads each would oversubscribe the CPU."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
