"""Reading any volume SimpleITK can read: NIfTI, MHA/MHD, NRRD files and DICOM series folders.

Errors are `VolumeReadError`s whose message is the reason alone (callers add the source), so the
same text can go to a log line or into a manifest's `reason` column.
"""
import logging
import re
from pathlib import Path

import SimpleITK as sitk

from datasets.nifti_check import is_nifti2, nifti_truncation

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima")
SERIES_SEPARATOR = "::"  # "folder::SeriesInstanceUID" names one series of a folder holding several
MODALITY_KEY = "0008|0060"


class VolumeReadError(ValueError):
    """A source that is not a readable 3D volume."""


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def split_series(source: str) -> tuple[Path, str | None]:
    folder, _, series = source.partition(SERIES_SEPARATOR)
    return Path(folder), series or None


def dicom_series_ids(folder: Path) -> tuple[str, ...]:
    return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))


def dicom_series_files(source: str) -> list[str]:
    folder, series = split_series(source)
    ids = dicom_series_ids(folder)
    if not ids:
        raise VolumeReadError("no DICOM series in this folder")
    if series is None:
        if len(ids) > 1:
            raise VolumeReadError(f"the folder holds {len(ids)} DICOM series; name one as "
                                  f"'<folder>{SERIES_SEPARATOR}<SeriesInstanceUID>'")
        series = ids[0]
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series)
    if not files:
        raise VolumeReadError(f"no files of DICOM series {series!r}")
    return list(files)


def itk_reason(err: RuntimeError, path: Path) -> str:
    """The informative part of an ITK exception, without C++ locations, pointers or the path."""
    if is_nifti2(path):
        return "NIfTI-2 file: SimpleITK reads NIfTI-1 only (convert it, e.g. with nibabel)"
    lines = str(err).strip().splitlines()
    text = next((line.split("Description:")[-1] for line in lines if "Description:" in line),
                lines[-1] if lines else "unknown error")
    if "Unable to determine ImageIO reader" in text:
        return "SimpleITK cannot read it: not a known image format (corrupt, or not what its name says)"
    text = re.sub(r"\(0x[0-9a-fA-F]+\)", "", text.replace(str(path), "the file"))
    return "SimpleITK cannot read it: " + re.sub(r"^(sitk::ERROR:|ITK ERROR:)\s*", "", text.strip()).strip()


def _read_dicom(source: str) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(dicom_series_files(source))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    if reader.HasMetaDataKey(0, MODALITY_KEY):
        image.SetMetaData(MODALITY_KEY, reader.GetMetaData(0, MODALITY_KEY).strip())
    return image


def _check_file(path: Path) -> sitk.ImageFileReader:
    if path.stat().st_size == 0:
        raise VolumeReadError("empty file")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    if reader.GetDimension() < 3:
        raise VolumeReadError(f"a {reader.GetDimension()}-D image, not a volume")
    if path.name.lower().endswith((".nii", ".nii.gz")) and (reason := nifti_truncation(path)):
        raise VolumeReadError(reason)
    return reader


def first_volume(image: sitk.Image, source: str) -> sitk.Image:
    """A scalar 3D image: the first frame of a 4D series, the first component of a vector image."""
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        log.warning("%s: 4-D image with %d frames; using the first", source, size[3])
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, 0])
    if image.GetDimension() != 3:
        raise VolumeReadError(f"a {image.GetDimension()}-D image, not a volume")
    if image.GetNumberOfComponentsPerPixel() > 1:
        log.warning("%s: %d components per voxel; using the first", source,
                    image.GetNumberOfComponentsPerPixel())
        image = sitk.VectorIndexSelectionCast(image, 0)
    if min(image.GetSize()) < 1:
        raise VolumeReadError(f"zero-sized image {image.GetSize()}")
    return image


def read_image(source: str) -> sitk.Image:
    """Read a volume file or DICOM series folder as a scalar 3D SimpleITK image."""
    path, _ = split_series(source)
    if not path.exists():
        raise VolumeReadError("no such file or folder")
    try:
        image = _read_dicom(source) if path.is_dir() else _check_file(path).Execute()
    except RuntimeError as err:
        raise VolumeReadError(itk_reason(err, path)) from None
    return first_volume(image, source)


def probe(source: str) -> str | None:
    """Check a source from its header alone; the reason it cannot be used, or None."""
    path, _ = split_series(source)
    if not path.exists():
        return "no such file or folder"
    try:
        if path.is_dir():
            dicom_series_files(source)
        else:
            _check_file(path)
    except VolumeReadError as err:
        return str(err)
    except RuntimeError as err:
        return itk_reason(err, path)
    return None
