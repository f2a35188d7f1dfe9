"""From a SimpleITK image to a (C, D, H, W) float32 array in [0, 1] on a fixed grid.

Steps, in order: canonical orientation, anti-aliasing, resampling (linear) to the target grid,
intensity windowing. Every setting lives in `PreprocessConfig`, which travels inside caches and
checkpoints so that prediction repeats exactly what training saw.
"""
from dataclasses import asdict, dataclass

import numpy as np
import SimpleITK as sitk

from .orientation import image_to_array, to_canonical
from .reading import MAX_VOXELS, MODALITY_KEY, VolumeReadError, image_like, read_image

RESAMPLE_MODES = ("fit", "stretch", "spacing")
MODALITIES = ("auto", "ct", "mr")
NONFINITE_POLICIES = ("skip", "fill")
CT_BACKGROUND_HU = -1024.0
# CT windows in use in the field (REFERENCE.md §3), selectable by name.
CT_WINDOWS = {
    "wide": (-1000.0, 1000.0),
    "tangerine": (-1200.0, 800.0),
    "ctfm": (-1024.0, 2048.0),
    "lung": (-1350.0, 150.0),
    "abdomen": (-175.0, 250.0),
}
# Below this minimum an image is taken for CT: air is about -1000 HU, MR has no negative tissue.
CT_DETECTION_MIN = -500.0
PERCENTILE_SAMPLE = 2_000_000


@dataclass
class PreprocessConfig:
    size: tuple[int, int, int] = (256, 256, 256)  # D, H, W
    resample: str = "fit"
    spacing: tuple[float, float, float] | None = None  # D, H, W in mm, for resample="spacing"
    modality: str = "auto"
    ct_window: tuple[float, float] = CT_WINDOWS["wide"]
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    nonfinite: str = "skip"  # NaN/Inf voxels: skip the volume, or fill them with the background value
    max_voxels: int = MAX_VOXELS  # larger headers are skipped before decoding
    external_data: bool = False  # detached headers (.mhd, .nhdr) may name data files outside their folder
    version: int = 1

    def __post_init__(self):
        self.size = tuple(int(s) for s in self.size)
        if len(self.size) != 3 or min(self.size) < 1:
            raise ValueError(f"size must be three positive ints (D, H, W), got {self.size}")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {RESAMPLE_MODES}, got {self.resample!r}")
        if self.resample == "spacing" and self.spacing is None:
            raise ValueError("resample='spacing' needs a spacing in mm")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
        if self.modality not in MODALITIES:
            raise ValueError(f"modality must be one of {MODALITIES}, got {self.modality!r}")
        self.ct_window = tuple(float(v) for v in self.ct_window)
        self.mr_percentiles = tuple(float(v) for v in self.mr_percentiles)
        if self.nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {self.nonfinite!r}")
        self.max_voxels = int(self.max_voxels)
        if self.ct_window[0] >= self.ct_window[1]:
            raise ValueError(f"ct_window must be (low, high) with low < high, got {self.ct_window}")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict) -> "PreprocessConfig":
        return cls(**values)


def detect_modality(image: sitk.Image, array: np.ndarray) -> str:
    """DICOM's Modality tag when present, else CT when the image holds air-like HU values."""
    if image.HasMetaDataKey(MODALITY_KEY):
        return "ct" if image.GetMetaData(MODALITY_KEY).upper() == "CT" else "mr"
    return "ct" if float(array.min()) < CT_DETECTION_MIN else "mr"


def output_spacing(image: sitk.Image, config: PreprocessConfig) -> np.ndarray:
    """Target spacing in SimpleITK's (x, y, z) order."""
    grid = np.array(config.size[::-1], dtype=np.float64)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    if config.resample == "stretch":
        return extent / grid
    if config.resample == "fit":
        return np.full(3, (extent / grid).max())
    return np.array(config.spacing[::-1], dtype=np.float64)


def anti_alias(image: sitk.Image, new_spacing: np.ndarray) -> sitk.Image:
    """Low-pass filter before downsampling: average blocks of the integer part of each axis'
    factor (BinShrink, fast on CT-sized volumes), then a Gaussian of sigma = (f - 1) / 2 voxels
    for the factor f that is left."""
    shrink = [max(1, min(int(new / old), size)) for old, new, size in
              zip(image.GetSpacing(), new_spacing, image.GetSize())]
    if max(shrink) > 1:
        image = sitk.BinShrink(image, shrink)
    for axis, (old, new, size) in enumerate(zip(image.GetSpacing(), new_spacing, image.GetSize())):
        factor = new / old
        if factor <= 1.0 or size < 4:
            continue
        smoother = sitk.RecursiveGaussianImageFilter()
        smoother.SetDirection(axis)
        smoother.SetSigma((factor - 1.0) / 2.0 * old)
        image = smoother.Execute(image)
    return image


def resample_to_grid(image: sitk.Image, config: PreprocessConfig, pad_value: float) -> sitk.Image:
    """Linear resampling onto `config.size`, centred on the image, direction kept, padding `pad_value`."""
    spacing = output_spacing(image, config)
    size = np.array(config.size[::-1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint(
        [(s - 1) / 2.0 for s in image.GetSize()]))
    origin = centre - direction @ ((size - 1) / 2.0 * spacing)
    smoothed = anti_alias(sitk.Cast(image, sitk.sitkFloat32), spacing)
    return sitk.Resample(smoothed, [int(s) for s in size], sitk.Transform(), sitk.sitkLinear,
                         origin.tolist(), spacing.tolist(), direction.ravel().tolist(),
                         float(pad_value), sitk.sitkFloat32)


def intensity_range(array: np.ndarray, modality: str, config: PreprocessConfig) -> tuple[float, float]:
    """The raw intensities mapped to 0 and 1: a CT window in HU, or MR percentiles of this image."""
    if modality == "ct":
        return config.ct_window
    flat = array.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // PERCENTILE_SAMPLE]
    low, high = np.percentile(flat, config.mr_percentiles)
    if high <= low:
        low, high = float(flat.min()), float(flat.max())
    return float(low), float(high)


@dataclass(frozen=True)
class Preprocessed:
    array: np.ndarray  # (1, D, H, W) float32 in [0, 1]
    modality: str
    intensity_range: tuple[float, float]  # raw values mapped to 0 and 1
    nonfinite_filled: int = 0  # NaN/Inf voxels replaced by the background value (config.nonfinite == "fill")


def _fill_nonfinite(image: sitk.Image, raw: np.ndarray, nonfinite: np.ndarray, config: PreprocessConfig) -> sitk.Image:
    """The image with its NaN/Inf voxels set to the background: air for CT, the lowest finite value for MR."""
    finite = raw[~nonfinite]
    modality = detect_modality(image, finite) if config.modality == "auto" else config.modality
    filled = np.where(nonfinite, CT_BACKGROUND_HU if modality == "ct" else finite.min(), raw).astype(raw.dtype)
    return image_like(filled, image)


def preprocess_image(image: sitk.Image, config: PreprocessConfig) -> Preprocessed:
    """Canonical orientation, anti-aliased resampling onto `config.size`, windowing to [0, 1].

    Non-finite voxels are found before any conversion (a cast or window would silently make them 0, which
    in HU is soft tissue): the volume is refused, or with `nonfinite="fill"` they become the background."""
    image = to_canonical(image)
    raw = sitk.GetArrayViewFromImage(image)
    if raw.size == 0:
        raise VolumeReadError(f"no voxels (size {'x'.join(map(str, image.GetSize()))})")
    nonfinite = ~np.isfinite(raw) if np.issubdtype(raw.dtype, np.floating) else None
    filled = 0
    if nonfinite is not None and nonfinite.any():
        filled = int(nonfinite.sum())
        if filled == raw.size:
            raise VolumeReadError(f"all {raw.size} voxels are non-finite (NaN/Inf)")
        if config.nonfinite != "fill":
            raise VolumeReadError(f"{filled} non-finite voxels (NaN/Inf)")
        image = _fill_nonfinite(image, np.array(raw), nonfinite, config)
        raw = sitk.GetArrayViewFromImage(image)
    low_value, high_value = float(raw.min()), float(raw.max())
    if low_value == high_value:
        raise VolumeReadError(f"all voxels have the same value ({low_value:g})")
    modality = detect_modality(image, raw) if config.modality == "auto" else config.modality
    low, high = intensity_range(raw, modality, config)
    pad_value = CT_BACKGROUND_HU if modality == "ct" else low_value
    array = image_to_array(resample_to_grid(image, config, pad_value))
    return Preprocessed(np.clip((array - low) / (high - low), 0.0, 1.0), modality, (low, high), filled)


def load_volume(source: str, config: PreprocessConfig, frames: str = "first") -> np.ndarray:
    """Read and preprocess one source (file or DICOM folder): (1, D, H, W) float32 in [0, 1]; `frames`:
    reading.first_volume."""
    return preprocess_image(read_image(source, config.max_voxels, config.external_data, frames), config).array


AUTO = "auto"
