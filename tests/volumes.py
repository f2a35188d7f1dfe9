"""Small test volumes built with SimpleITK: reoriented copies and broken files of each kind."""
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def image_from_xyz(array_xyz: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                   direction=IDENTITY) -> sitk.Image:
    """An image whose index (i, j, k) holds array_xyz[i, j, k]."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_xyz.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in origin])
    image.SetDirection([float(d) for d in np.asarray(direction).ravel()])
    return image


def reoriented_copy(image: sitk.Image, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same physical image stored with permuted and flipped index axes.

    New index axis k is old axis perm[k], reversed when flips[k]; spacing, direction and origin
    are rewritten so that every voxel keeps its physical position.
    """
    old = sitk.GetArrayFromImage(image).transpose(2, 1, 0)  # x, y, z index order
    new = old.transpose(perm)
    for k, flip in enumerate(flips):
        if flip:
            new = np.flip(new, axis=k)
    size = np.array(image.GetSize())
    old_direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = [image.GetSpacing()[p] for p in perm]
    direction = np.stack([old_direction[:, p] * (-1 if f else 1) for p, f in zip(perm, flips)], axis=1)
    first = [0, 0, 0]
    for p, f in zip(perm, flips):
        first[p] = int(size[p] - 1) if f else 0
    origin = image.TransformIndexToPhysicalPoint(first)
    return image_from_xyz(new, spacing, origin, direction)


def write_bad_inputs(folder: Path, good: Path) -> dict[str, str]:
    """One file of each broken kind next to the good ones; returns name -> expected reason fragment."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = good.read_bytes()
    (folder / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    uncompressed = gzip.decompress(raw)
    (folder / "truncated.nii").write_bytes(uncompressed[: len(uncompressed) // 2])
    (folder / "text.nii.gz").write_text("a text file, not an image")
    (folder / "empty.nii").write_bytes(b"")
    data = (np.random.default_rng(0).random((12, 14, 16)) * 100).astype(np.int16)
    nib.save(nib.Nifti2Image(data, np.eye(4)), folder / "nifti2.nii.gz")
    shear = np.eye(4)
    shear[0, 1] = 0.5
    nib.save(nib.Nifti1Image(data, shear), folder / "non_orthonormal.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((0, 14, 16), np.int16), np.eye(4)), folder / "zero_sized.nii.gz")
    nib.save(nib.Nifti1Image(np.full((12, 14, 16), 40, np.int16), np.eye(4)), folder / "constant.nii.gz")
    return {
        "truncated.nii.gz": "truncated",
        "truncated.nii": "truncated",
        "text.nii.gz": "not a known image format",
        "empty.nii": "empty file",
        "nifti2.nii.gz": "NIfTI-2",
        "non_orthonormal.nii.gz": "orthonormal",
        "zero_sized.nii.gz": "not recognized as a NIFTI file",
        "constant.nii.gz": "same value",
    }
