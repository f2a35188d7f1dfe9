"""What a training set looks like, measured, so that defaults follow the data rather than its name.

Several MedMNIST3D sets are binary shape masks (AdrenalMNIST3D: values 0 and 255, ~1.6% foreground),
others are grey-level crops; a user's set can be either. Noise, gamma and linear interpolation turn
a mask into inputs never seen at evaluation, so the augmentation is chosen from what the images hold.
"""
from dataclasses import asdict, dataclass

import numpy as np

from ..volumes.stored import to_unit_float

# At most this many distinct values: a mask or a label map, not an intensity image.
MAX_LABEL_VALUES = 16
PROFILE_SAMPLES = 256


@dataclass(frozen=True)
class DataProfile:
    distinct_values: int  # in the sampled images (capped at MAX_LABEL_VALUES + 1)
    value_range: tuple[float, float]
    nonzero_fraction: float  # share of voxels above the minimum value
    class_counts: list[int]  # per class (or per label, for multi-label sets); empty when unknown
    samples: int  # images inspected
    mean: float = 0.0  # of the images as the model sees them (stored integers scaled to [0, 1])
    std: float = 1.0

    @property
    def is_label_like(self) -> bool:
        return self.distinct_values <= MAX_LABEL_VALUES

    def describe(self) -> str:
        values = f"{self.distinct_values}{'+' if self.distinct_values > MAX_LABEL_VALUES else ''} distinct values"
        low, high = self.value_range
        kind = "a mask or label map" if self.is_label_like else "grey levels"
        balance = f"; classes {':'.join(map(str, self.class_counts))}" if self.class_counts else ""
        return (f"{values} in [{low:g}, {high:g}], {100 * self.nonzero_fraction:.1f}% above the minimum, mean "
                f"{self.mean:.4f} and std {self.std:.4f} as model input ({kind}; {self.samples} images inspected)"
                f"{balance}")

    @property
    def normalization(self) -> dict[str, float]:
        """The model's input standardisation, `--normalize auto`."""
        return {"input_mean": self.mean, "input_std": max(self.std, 1e-6)}

    def to_dict(self) -> dict:
        return {**asdict(self), "value_range": list(self.value_range), "is_label_like": self.is_label_like}


def profile_images(images: np.ndarray, labels: np.ndarray | None = None,
                   samples: int = PROFILE_SAMPLES) -> DataProfile:
    """Profile (N, C, *grid) stored images (any dtype) from an evenly spread sample of at most `samples` images;
    mean and std are in the model's [0, 1] units (volumes.stored)."""
    if len(images) == 0:
        raise ValueError("cannot profile an empty training set")
    pick = np.linspace(0, len(images) - 1, min(samples, len(images))).round().astype(int)
    sample = np.asarray(images[pick])
    distinct = np.unique(sample)
    low, high = float(distinct[0]), float(distinct[-1])
    counts: list[int] = []
    if labels is not None and len(labels):
        labels = np.asarray(labels)
        if labels.ndim == 2 and labels.shape[1] > 1:
            counts = [int(c) for c in labels.sum(axis=0)]
        elif np.issubdtype(labels.dtype, np.integer):
            counts = [int(c) for c in np.bincount(labels.reshape(-1))]
    scaled = to_unit_float(sample).astype(np.float64)
    return DataProfile(distinct_values=int(min(len(distinct), MAX_LABEL_VALUES + 1)), value_range=(low, high),
                       nonzero_fraction=float((sample > low).mean()), class_counts=counts, samples=len(pick),
                       mean=float(scaled.mean()), std=float(scaled.std()))


def choose_augment(profile: DataProfile) -> tuple[str, str]:
    """(preset name, why) for `--augment auto`."""
    if profile.is_label_like:
        return "flips", ("the images hold few distinct values (a mask or label map): flips only, which keep every "
                         "value exact; never noise, gamma or interpolation (on AdrenalMNIST3D flips beat turns and "
                         "affine geometry for the ViT)")
    return "full", "the images are grey levels: the setup's whole pipeline, intensity changes included"
