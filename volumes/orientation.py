"""The canonical orientation of every volume inside VolMAE, and the one place arrays are made.

Images are reoriented (axes permuted and flipped, no interpolation) with SimpleITK's DICOMOrient
to LPS: the first image axis points to the patient's Left, the second to Posterior, the third to
Superior. SimpleITK's array view reverses the axis order, so a volume becomes (C, D, H, W) with
  D: inferior -> superior,  H: anterior -> posterior,  W: right -> left,
and an axial slice `volume[c, d]` appears in the radiological convention (patient's right on
the left of the screen, anterior at the top). Obliquity beyond that is kept in the direction
matrix; the resampler keeps that direction so no anatomy is rotated or cropped.
"""
import numpy as np
import SimpleITK as sitk

CANONICAL_ORIENTATION = "LPS"


def orientation_code(image: sitk.Image) -> str:
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def to_canonical(image: sitk.Image) -> sitk.Image:
    if orientation_code(image) == CANONICAL_ORIENTATION:
        return image
    return sitk.DICOMOrient(image, CANONICAL_ORIENTATION)


def canonical_geometry(size: tuple[int, ...], spacing: tuple[float, ...], direction: tuple[float, ...],
                       ) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(size, spacing) in the canonical (D, H, W) array order from a header's (x, y, z) index order alone:
    the index axis whose direction cosine points most along S becomes D, along P becomes H, along L becomes W,
    as `to_canonical` then `image_to_array` would arrange the decoded image."""
    cosines = np.abs(np.asarray(direction, dtype=np.float64).reshape(3, 3))
    order = [int(np.argmax(cosines[physical])) for physical in (2, 1, 0)]  # physical z, y, x rows
    if sorted(order) != [0, 1, 2]:
        order = [2, 1, 0]  # oblique beyond telling: the stored order
    return tuple(int(size[i]) for i in order), tuple(float(spacing[i]) for i in order)


def image_to_array(image: sitk.Image) -> np.ndarray:
    """(C, D, H, W) float32 copy of a scalar 3D image, SimpleITK's (x, y, z) order reversed."""
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)[None]
