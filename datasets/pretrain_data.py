"""What `main_pretrain.py --data_path` points at, turned into a Dataset: a cache, or volume files."""
import copy
import sys
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from ..util.capped import SHOWN, print_capped, write_list
from ..util.dist import barrier
from ..util.errors import DataError
from ..volumes.cache import CacheError, VolumeCache, is_cache
from ..volumes.phantoms import write_phantom_corpus
from ..volumes.preprocess import PreprocessConfig
from ..volumes.reading import unreadable_reason
from ..volumes.sources import SourceListError, list_sources
from .data_profile import DataProfile, profile_images
from .medmnist_data import MedMNISTNotFound, MedMNISTSpec, load_split, subset_indices
from .volume_dataset import ArrayPretrainDataset, CacheDataset, VolumeFileDataset


def readable_sources(data_path: str, announce: bool, max_voxels: int, external_data: bool = False,
                     skipped_list: Path | None = None) -> list[str]:
    """The corpus' sources that pass a header check; the others are named in a warning (the first few; all of
    them in `skipped_list`)."""
    try:
        sources = list_sources(data_path)
    except SourceListError as err:
        raise DataError(str(err)) from None
    readable, skipped = [], []
    for source in sources:
        reason = unreadable_reason(source, max_voxels, external_data)
        if reason is None:
            readable.append(source)
        else:
            skipped.append(f"{source}: {reason}")
    if not readable:
        raise DataError(f"none of the {len(sources)} sources under {data_path} is readable")
    if skipped and announce:
        full_list = write_list(skipped_list, skipped) if skipped_list and len(skipped) > SHOWN else None
        print_capped(f"warning: skipping {len(skipped)} of {len(sources)} sources that cannot be read:", skipped,
                     full_list, sys.stderr)
    return readable


def phantom_corpus(output_dir: str, count: int, seed: int, is_main: bool) -> str:
    """The built-in corpus, written once by rank 0."""
    folder = Path(output_dir) / "phantoms"
    if is_main:
        write_phantom_corpus(folder, count=count, seed=seed)
    barrier()
    return str(folder)


def build_pretrain_dataset(data_path: str, input_size: tuple[int, int, int], config: PreprocessConfig,
                           augment: bool, seed: int, is_main: bool,
                           skipped_list: Path | None = None) -> tuple[Dataset, PreprocessConfig]:
    """A CacheDataset when `data_path` is a cache (its own preprocessing then applies), else volume files."""
    if is_cache(data_path):
        try:
            cache = VolumeCache(data_path)
        except CacheError as err:
            raise DataError(str(err)) from None
        if len(cache) == 0:
            raise DataError(f"the cache {data_path} holds no volumes")
        try:
            return CacheDataset(cache, input_size, augment, seed), cache.preprocess
        except ValueError as err:
            raise DataError(f"{data_path}: {err}") from None
    sources = readable_sources(data_path, is_main, config.max_voxels, config.external_data, skipped_list)
    return VolumeFileDataset(sources, config, augment, seed), config


def medmnist_pretrain_dataset(flag: str, size: int, root: str, augment: bool, seed: int,
                              train_samples: int | None = None, download: bool = False,
                              ) -> tuple[Dataset, MedMNISTSpec, DataProfile]:
    """The training split of a MedMNIST set (2D or 3D), for self-pretraining before fine-tuning on it (labels
    unused); `train_samples` keeps the subset main_finetune.py --train_samples keeps. The profile decides the
    augmentation (masks: flips, no intensity jitter)."""
    try:
        spec = MedMNISTSpec(flag, size, root)
        images, _ = load_split(spec, "train", download)
    except (ValueError, MedMNISTNotFound) as err:
        raise DataError(str(err)) from None
    if train_samples:
        images = images[subset_indices(len(images), train_samples)]
    profile = profile_images(images)
    dataset = ArrayPretrainDataset(images, f"{flag}_{size}:train", augment, seed, jitter=not profile.is_label_like)
    return dataset, spec, profile


class IndexSubset(Dataset):
    """Some samples of an epoch-seeded pretraining dataset. Items keep their original index, on which masks and
    augmentation are keyed, so a sample is treated the same with or without a held-out part."""

    def __init__(self, dataset: Dataset, indices: np.ndarray):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[self.indices[index]]

    def __getitems__(self, indices: list[int]):
        chosen = [self.indices[i] for i in indices]
        if hasattr(self.dataset, "__getitems__"):
            return self.dataset.__getitems__(chosen)
        return [self.dataset[i] for i in chosen]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def held_out_count(volumes: int, fraction: float) -> int:
    """How many of `volumes` hold_out keeps out: the `fraction`, at least one, never all."""
    return min(volumes - 1, max(1, round(fraction * volumes)))


def hold_out(dataset: Dataset, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training part, held-out part without augmentation): a fixed random `fraction` of the samples (at least
    one) is kept out of training, to measure the reconstruction loss on volumes the model never learned from."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out share must be in (0, 1), got {fraction}")
    if len(dataset) < 2:
        raise ValueError(f"holding out part of {len(dataset)} volume(s) leaves nothing to train on")
    order = np.random.default_rng(seed).permutation(len(dataset))
    count = held_out_count(len(dataset), fraction)
    plain = copy.copy(dataset)
    plain.augment = False
    return IndexSubset(dataset, np.sort(order[count:])), IndexSubset(plain, np.sort(order[:count]))
