"""VolMAE's preprocessing as a MONAI transform, written out so that a bundle runs without VolMAE: a volume file
read with SimpleITK, turned to the LPS orientation (DICOMOrient), resampled onto the model's grid (linear, after
the anti-aliasing VolMAE applies when downsampling; centred, direction kept), windowed to [0, 1] (a CT window in
HU, or the image's own percentiles for MR), rounded to the levels of the cache it was trained from, and laid out
as (1, D, H, W) with D inferior to superior, H anterior to posterior, W right to left. The standardisation
happens inside the network. The steps and constants are VolMAE's (volumes/preprocess.py), so the bundle's
inputs equal volmae-predict's."""
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

CT_BACKGROUND_HU = -1024.0
CT_DETECTION_MIN = -500.0
PERCENTILE_SAMPLE = 2_000_000
MODALITY_KEY = "0008|0060"
INTEGER_TOPS = {"uint8": 255, "uint16": 65535}


def to_lps(image: sitk.Image) -> sitk.Image:
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return image if code == "LPS" else sitk.DICOMOrient(image, "LPS")


def output_spacing(image: sitk.Image, size: list[int], resample: str, spacing: list[float] | None) -> np.ndarray:
    grid = np.array(size[::-1], dtype=np.float64)
    extent = np.array(image.GetSize()) * np.array(image.GetSpacing())
    if resample == "stretch":
        return extent / grid
    if resample == "fit":
        return np.full(3, (extent / grid).max())
    return np.array(spacing[::-1], dtype=np.float64)


def anti_alias(image: sitk.Image, new_spacing: np.ndarray) -> sitk.Image:
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


def resample(image: sitk.Image, size: list[int], mode: str, spacing: list[float] | None, pad: float) -> sitk.Image:
    new_spacing = output_spacing(image, size, mode, spacing)
    grid = np.array(size[::-1])
    direction = np.array(image.GetDirection()).reshape(3, 3)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in image.GetSize()]))
    origin = centre - direction @ ((grid - 1) / 2.0 * new_spacing)
    smoothed = anti_alias(sitk.Cast(image, sitk.sitkFloat32), new_spacing)
    return sitk.Resample(smoothed, [int(s) for s in grid], sitk.Transform(), sitk.sitkLinear, origin.tolist(),
                         new_spacing.tolist(), direction.ravel().tolist(), float(pad), sitk.sitkFloat32)


def intensity_range(array: np.ndarray, modality: str, ct_window: list[float], percentiles: list[float]):
    if modality == "ct":
        return tuple(float(v) for v in ct_window)
    flat = array.reshape(-1)
    if flat.size > PERCENTILE_SAMPLE:
        flat = flat[:: flat.size // PERCENTILE_SAMPLE]
    low, high = np.percentile(flat, percentiles)
    if high <= low:
        low, high = float(flat.min()), float(flat.max())
    return float(low), float(high)


def centre_crop(volume: np.ndarray, size: list[int]) -> np.ndarray:
    starts = [(g - s) // 2 for g, s in zip(volume.shape[1:], size)]
    return volume[(slice(None), *(slice(b, b + s) for b, s in zip(starts, size)))]


class VolMAEPreprocessd(MapTransform):
    """data[key]: a volume file's path -> (1, D, H, W) float32 MetaTensor in [0, 1], as VolMAE preprocesses it;
    its meta keeps the path (`filename_or_obj`) for the outputs."""

    def __init__(self, keys, size: list[int], resample: str, spacing: list[float] | None, modality: str,
                 ct_window: list[float], mr_percentiles: list[float], stored_dtype: str | None,
                 input_size: list[int], **_ignored):
        super().__init__(keys)
        self.size, self.mode, self.spacing, self.modality = list(size), resample, spacing, modality
        self.ct_window, self.percentiles, self.stored_dtype = ct_window, mr_percentiles, stored_dtype
        self.input_size = list(input_size)

    def volume(self, path: str) -> np.ndarray:
        image = sitk.ReadImage(str(path))
        if image.GetDimension() != 3:
            raise ValueError(f"{path}: a {image.GetDimension()}-D image; the model takes one 3-D volume")
        if image.GetNumberOfComponentsPerPixel() > 1:
            image = sitk.VectorIndexSelectionCast(image, 0)
        image = to_lps(image)
        raw = sitk.GetArrayViewFromImage(image)
        if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
            raise ValueError(f"{path}: non-finite voxels (NaN/Inf)")
        low_value = float(raw.min())
        if self.modality == "auto":
            if image.HasMetaDataKey(MODALITY_KEY):
                modality = "ct" if image.GetMetaData(MODALITY_KEY).upper() == "CT" else "mr"
            else:
                modality = "ct" if low_value < CT_DETECTION_MIN else "mr"
        else:
            modality = self.modality
        low, high = intensity_range(raw, modality, self.ct_window, self.percentiles)
        pad = CT_BACKGROUND_HU if modality == "ct" else low_value
        array = sitk.GetArrayFromImage(resample(image, self.size, self.mode, self.spacing, pad)).astype(
            np.float32, copy=False)[None]
        volume = np.clip((array - low) / (high - low), 0.0, 1.0)
        if self.stored_dtype in INTEGER_TOPS:
            top = INTEGER_TOPS[self.stored_dtype]
            stored = np.rint(np.clip(volume, 0.0, 1.0) * top).astype(self.stored_dtype)
            volume = stored.astype(np.float32) * np.float32(1.0 / top)
        return centre_crop(volume, self.input_size)

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        for key in self.key_iterator(out):
            array = torch.from_numpy(np.ascontiguousarray(self.volume(out[key])))
            out[key] = MetaTensor(array, meta={"filename_or_obj": str(out[key])})
        return out
