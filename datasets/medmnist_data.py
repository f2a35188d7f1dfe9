"""MedMNIST (2D and 3D) through the `medmnist` package: metadata, file layout, splits.

Images stay uint8 in memory and in the loader; the training step divides by 255, the
normalisation recorded in checkpoints so that prediction applies the same to raw arrays.
"""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..util.errors import VolMAEError

# medmnist's own default root (medmnist.info.DEFAULT_ROOT; a test keeps the two equal). Spelled out here because
# importing anything from medmnist runs its __init__, which imports sklearn and PIL: a second or more on every
# command's start, --help included. medmnist itself is imported where its data or metadata are read.
DEFAULT_ROOT = str(Path.home() / ".medmnist")
SIZES_3D = (28, 64)
SIZES_2D = (28, 64, 128, 224)
RAW_SCALE = 1.0 / 255.0


def medmnist_info() -> dict:
    """medmnist's metadata of every flag (task, labels, channels, file URLs)."""
    from medmnist.info import INFO

    return INFO


class MedMNISTNotFound(VolMAEError, FileNotFoundError):
    """The npz file of a flag and size is not in the root folder."""


@dataclass(frozen=True)
class MedMNISTSpec:
    flag: str
    size: int = 28
    root: str = DEFAULT_ROOT

    def __post_init__(self):
        known = medmnist_info()
        if self.flag not in known:
            raise ValueError(f"unknown MedMNIST flag {self.flag!r}; known: {', '.join(sorted(known))}")
        sizes = SIZES_3D if self.is_3d else SIZES_2D
        if self.size not in sizes:
            raise ValueError(f"{self.flag} comes in sizes {sizes}, not {self.size}")

    @property
    def info(self) -> dict:
        return medmnist_info()[self.flag]

    @property
    def is_3d(self) -> bool:
        return self.flag.endswith("3d")

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def class_names(self) -> list[str]:
        labels = self.info["label"]
        return [labels[str(i)] for i in range(len(labels))]

    @property
    def in_chans(self) -> int:
        return int(self.info["n_channels"])

    @property
    def input_size(self) -> tuple[int, ...]:
        return (self.size,) * (3 if self.is_3d else 2)

    @property
    def filename(self) -> str:
        return f"{self.flag}{'' if self.size == 28 else f'_{self.size}'}.npz"

    def to_dict(self) -> dict:
        return {"source": "medmnist", "flag": self.flag, "size": self.size, "task": self.task,
                "raw_scale": RAW_SCALE, "input_size": list(self.input_size), "in_chans": self.in_chans}


def load_split(spec: MedMNISTSpec, split: str, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(images as (N, C, *grid) uint8, labels as (N, k) int) of one split."""
    path = Path(spec.root) / spec.filename
    if not path.exists() and not download:
        suffix = "" if spec.size == 28 else f"_{spec.size}"
        raise MedMNISTNotFound(f"{path} not found. Get it with --download (needs internet), or download "
                               f"{spec.info['url' + suffix]} (md5 {spec.info['MD5' + suffix]}) into {spec.root}")
    Path(spec.root).mkdir(parents=True, exist_ok=True)
    import medmnist

    dataset_class = getattr(medmnist, spec.info["python_class"])
    dataset = dataset_class(split=split, root=spec.root, size=spec.size, download=download)
    return to_channels_first(dataset.imgs, spec.is_3d), np.asarray(dataset.labels).astype(np.int64)


def subset_indices(total: int, count: int) -> np.ndarray:
    """The sorted indices of a fixed random subset of `count` of `total` samples (seed 0: the same in every step)."""
    return np.sort(np.random.default_rng(0).permutation(total)[:count])


def to_channels_first(images: np.ndarray, is_3d: bool) -> np.ndarray:
    """MedMNIST arrays -> (N, C, *grid): 3D (N, D, H, W); 2D (N, H, W) or (N, H, W, 3)."""
    if is_3d or images.ndim == 3:
        return images[:, None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
