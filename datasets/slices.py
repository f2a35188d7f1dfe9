"""Volumes as stacks of 2D slices, for SLIViT: a volume file, a DICOM series folder, or a folder of
2D slice images (tiff/png/jpeg/dcm, ordered by the last number in their names).

Volumes are put in the canonical orientation and their slices taken along D (axial for CT); a slice
folder's order is its own. Intensities are windowed as the volume preprocessing does (CT in HU, MR
and photographs by percentiles), then `--slices N` slices are chosen (`eq`: evenly spaced through
the stack; `mid`: N consecutive slices around the middle) and each is resized to S x S.
"""
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..volumes.orientation import image_to_array, to_canonical
from ..volumes.preprocess import PreprocessConfig, detect_modality, intensity_range
from ..volumes.reading import VolumeReadError, dicom_series_ids, read_image

SLICE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm")
SPARSING = ("eq", "mid")


def slice_indices(depth: int, count: int, mode: str) -> list[int]:
    """Which of `depth` slices to keep (repeating slices when there are fewer than `count`)."""
    if mode == "eq":
        return [int(round(i)) for i in np.linspace(0, depth - 1, count)]
    if mode == "mid":
        start = depth // 2 - count // 2
        return [min(max(start + i, 0), depth - 1) for i in range(count)]
    raise ValueError(f"sparsing must be one of {SPARSING}, got {mode!r}")


def _index_key(path: Path) -> tuple:
    numbers = re.findall(r"\d+", path.stem)
    return (int(numbers[-1]) if numbers else -1, path.name)


def slice_files(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.suffix.lower() in SLICE_SUFFIXES), key=_index_key)


def read_slice_folder(folder: Path) -> np.ndarray:
    """(D, H, W) float32 from 2D images (colour ones averaged to grey), resized to the first one's size."""
    files = slice_files(folder)
    if not files:
        raise VolumeReadError(f"no slice images ({', '.join(SLICE_SUFFIXES)}) in the folder")
    slices = []
    for path in files:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise VolumeReadError(f"cannot read the slice {path.name}") from None
        array = sitk.GetArrayFromImage(image).astype(np.float32)  # (H, W), (H, W, C) or (1, H, W)
        if image.GetNumberOfComponentsPerPixel() > 1:
            array = array.mean(axis=-1)
        if array.ndim == 3:
            array = array[0]
        if slices and array.shape != slices[0].shape:
            array = F.interpolate(torch.from_numpy(array)[None, None], size=slices[0].shape, mode="bilinear",
                                  align_corners=False)[0, 0].numpy()
        slices.append(array)
    return np.stack(slices)


def _is_slice_folder(path: Path) -> bool:
    return path.is_dir() and bool(slice_files(path)) and not dicom_series_ids(path)


def load_stack(path: Path) -> np.ndarray:
    """(D, H, W) float32 in [0, 1]: the windowed volume or slice stack."""
    if _is_slice_folder(path):
        stack = read_slice_folder(path)
        low, high = np.percentile(stack, [0.5, 99.5])
    else:
        image = to_canonical(read_image(str(path)))
        stack = image_to_array(image)[0]
        config = PreprocessConfig()
        low, high = intensity_range(stack, detect_modality(image, stack), config)
    if high <= low:
        raise VolumeReadError("all voxels have the same value")
    return np.clip((stack - low) / (high - low), 0.0, 1.0).astype(np.float32)


def select_and_resize(stack: np.ndarray, count: int, mode: str, size: int) -> np.ndarray:
    """(1, count, size, size) float32 from a (D, H, W) stack."""
    chosen = torch.from_numpy(np.ascontiguousarray(stack[slice_indices(stack.shape[0], count, mode)]))
    resized = F.interpolate(chosen[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return resized[:, 0][None].clamp_(0, 1).numpy()


def to_uint8(volume: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(volume, 0, 1) * 255).astype(np.uint8)


def stack_input(stack: np.ndarray, count: int, mode: str, size: int) -> np.ndarray:
    """(1, count, size, size) uint8 from a (D, H, W) stack in [0, 1]: SLIViT's inputs as stored for
    training, so prediction quantises exactly as training did."""
    return to_uint8(select_and_resize(stack, count, mode, size))
