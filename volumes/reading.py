"""Reading any volume SimpleITK can read: NIfTI, Analyze (.hdr/.img, SPM's output), MHA/MHD, NRRD files and
DICOM series folders.

Errors are `VolumeReadError`s whose message is the reason alone (callers add the source), so the
same text can go to a log line or into a manifest's `reason` column.
"""
import contextlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..util.errors import DataError
from .nifti_check import is_nifti2, nifti_bad_spacing, nifti_empty_axis, nifti_nonfinite_mask, nifti_truncation

log = logging.getLogger(__name__)

# an Analyze 7.5 (or NIfTI pair) volume is listed by its .hdr; its voxels are in the .img beside it
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".mha", ".mhd", ".nrrd", ".nhdr")
DICOM_SUFFIXES = (".dcm", ".ima")
SERIES_SEPARATOR = "::"  # "folder::SeriesInstanceUID" names one series of a folder holding several
MODALITY_KEY = "0008|0060"
POSITION_KEY = "0020|0032"  # ImagePositionPatient
# Headers promising more voxels than this are skipped before decoding: preprocessing holds a few float32
# copies of a volume, so 2^29 voxels (e.g. 512 x 512 x 2048) needs roughly 8 GB; raise it on larger machines.
MAX_VOXELS = 2 ** 29
PLAUSIBLE_SPACING_MM = (0.01, 50.0)
BUDGET_VOXEL_BYTES = 4  # --max_voxels counts float32-sized voxels: the decoded-byte budget is 4 x max_voxels


class VolumeReadError(DataError):
    """A source that is not a readable 3D volume."""


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def listed_path(base: Path, text: str, canonical: bool = False) -> tuple[Path, str]:
    """A path as a CSV or a list names it, with what follows `::` kept apart (a DICOM SeriesInstanceUID, an
    array of an npz, a cache key): relative paths are taken from `base`, the listing's folder, and with
    `canonical` made absolute without `..` or links. The one reading of a listed path, for every listing."""
    folder, _, key = text.strip().partition(SERIES_SEPARATOR)
    path = Path(folder)
    if not path.is_absolute():
        path = (base / path).resolve() if canonical else base / path
    return path, key


def listed_source(base: Path, text: str, canonical: bool = False) -> str:
    """`listed_path` as one source string, `path::key` when a key was given."""
    path, key = listed_path(base, text, canonical)
    return f"{path}{SERIES_SEPARATOR}{key}" if key else str(path)


def split_series(source: str) -> tuple[Path, str | None]:
    folder, _, series = source.partition(SERIES_SEPARATOR)
    return Path(folder), series or None


def source_stamp(source: str) -> str:
    """Size and modification time of what a source reads (a DICOM folder: its files'; a detached or Analyze
    header: it and the data files beside it), so a cache knows when a source changed at the same path.
    '' for a source that does not exist."""
    path, _ = split_series(source)
    try:
        if path.is_dir():
            stats = [entry.stat() for entry in os.scandir(path) if entry.is_file()]
        else:
            stats = [path.stat()] + [p.stat() for p in _data_files_beside(path) if p.is_file()]
    except OSError:
        return ""
    return f"{sum(st.st_size for st in stats)}:{max((st.st_mtime_ns for st in stats), default=0)}:{len(stats)}"


def _data_files_beside(path: Path) -> list[Path]:
    if _is_analyze_pair(path):
        return [path.with_suffix(suffix) for suffix in (".img", ".IMG", ".img.gz")]
    if path.name.lower().endswith((".mhd", ".nhdr")):
        try:
            return [path.parent / name for name in detached_data_files(path)]
        except OSError:
            return []
    return []


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


def _read_dicom(source: str, max_voxels: int) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_check_dicom(source, max_voxels))
    reader.MetaDataDictionaryArrayUpdateOn()
    image = reader.Execute()
    if reader.HasMetaDataKey(0, MODALITY_KEY):
        image.SetMetaData(MODALITY_KEY, reader.GetMetaData(0, MODALITY_KEY).strip())
    return image


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def check_voxel_count(size: tuple[int, ...], max_voxels: int, voxel_bytes: int = BUDGET_VOXEL_BYTES) -> None:
    """Refuse, from the header alone, a volume too large to decode on this machine: more voxels than
    --max_voxels, or more decoded bytes than that many 4-byte voxels (a float64 or multi-component volume gets
    proportionally fewer voxels, since a small compressed file can decode to many gigabytes)."""
    count = math.prod(int(length) for length in size[:3])
    shape = "x".join(map(str, size))
    if count > max_voxels:
        raise VolumeReadError(f"the header promises {count:,} voxels ({shape}), more than --max_voxels "
                              f"{max_voxels:,}; skipped before decoding")
    budget = max_voxels * BUDGET_VOXEL_BYTES
    if count * voxel_bytes > budget:
        raise VolumeReadError(f"the header promises {count:,} voxels ({shape}) of {voxel_bytes} bytes, "
                              f"{count * voxel_bytes / 2**30:.1f} GiB decoded, more than the {budget / 2**30:.1f} "
                              f"GiB that --max_voxels {max_voxels:,} allows (4-byte voxels); skipped before decoding")


def check_spacing(spacing: tuple[float, ...]) -> None:
    """Refuse a voxel size no scanner gives (zero, non-finite, or outside 0.01-50 mm): one such header would
    otherwise steer the automatic grid of a whole corpus."""
    low, high = PLAUSIBLE_SPACING_MM
    if not all(math.isfinite(v) and low <= v <= high for v in spacing):
        raise VolumeReadError(f"the header gives a voxel size of {' x '.join(f'{v:g}' for v in spacing)} mm, outside "
                              f"the plausible {low:g}-{high:g} mm")


def voxel_bytes(reader: sitk.ImageFileReader) -> int:
    """Bytes per decoded voxel, all components, from the header's pixel type (e.g. '64-bit float': 8)."""
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    return (int(bits.group(1)) // 8 if bits else BUDGET_VOXEL_BYTES) * max(1, reader.GetNumberOfComponents())


def check_data_files(path: Path, allow_external: bool) -> None:
    """A detached header (.mhd, .nhdr) names its data file(s); they must sit in the header's folder, so that a
    CSV row cannot make the cache, fine-tuning or prediction read any file on the machine (`/etc/passwd`)."""
    if allow_external or not path.name.lower().endswith((".mhd", ".nhdr")):
        return
    folder = path.parent.resolve()
    for name in detached_data_files(path):
        target = Path(name)
        if target.is_absolute() or folder not in (folder / target).resolve().parents:
            raise VolumeReadError(f"its header names the data file {name!r}, outside its folder {folder}; "
                                  f"--allow_external_data reads it anyway")


def detached_data_files(path: Path) -> list[str]:
    """The data file names a MetaImage (ElementDataFile) or detached NRRD (data file) header gives."""
    lines = path.read_bytes()[:65536].decode("latin-1").splitlines()
    key = re.compile(r"\s*(ElementDataFile\s*=|data ?file\s*:)\s*(.*)", re.IGNORECASE)
    for i, line in enumerate(lines):
        found = key.match(line)
        if not found:
            continue
        value = found.group(2).strip()
        if value.upper() == "LOCAL":
            return []
        if value.upper().startswith("LIST"):
            return [entry.strip() for entry in lines[i + 1:] if entry.strip()]
        return [value.split()[0]] if value else []
    return []


def _is_analyze_pair(path: Path) -> bool:
    return path.name.lower().endswith(".hdr")


def _check_file(path: Path, max_voxels: int, external_data: bool = False) -> sitk.ImageFileReader:
    if path.stat().st_size == 0:
        raise VolumeReadError("empty file")
    check_data_files(path, external_data)
    if _is_analyze_pair(path) and not any(path.with_suffix(s).is_file() for s in (".img", ".IMG", ".img.gz")):
        raise VolumeReadError(f"an Analyze header without its data file {path.with_suffix('.img').name} beside it")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with quiet_itk_warnings(_is_analyze_pair(path)):
        reader.ReadImageInformation()
    if reader.GetDimension() < 3:
        raise VolumeReadError(f"a {reader.GetDimension()}-D image, not a volume")
    check_voxel_count(reader.GetSize(), max_voxels, voxel_bytes(reader))
    if _is_nifti(path) and (reason := nifti_empty_axis(path) or nifti_bad_spacing(path) or nifti_truncation(path)):
        raise VolumeReadError(reason)
    check_spacing(reader.GetSpacing()[:3])
    return reader


def _check_dicom(source: str, max_voxels: int) -> list[str]:
    """The series' files, after checking the voxel count its first header and file count promise."""
    files = dicom_series_files(source)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.ReadImageInformation()
    columns, rows = reader.GetSize()[:2]
    check_voxel_count((columns, rows, len(files)), max_voxels, voxel_bytes(reader))
    check_spacing(reader.GetSpacing()[:2])
    return files


@contextlib.contextmanager
def quiet_itk_warnings(quiet: bool):
    """ITK warns on stderr that Analyze is deprecated, once per file read: a corpus of SPM output would bury the
    log in it. The format is read all the same, so the warning says nothing a user can act on."""
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    if quiet:
        sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def image_like(array: np.ndarray, template: sitk.Image) -> sitk.Image:
    """`array` (SimpleITK's z, y, x order) as an image with the template's geometry and metadata."""
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(template)
    for key in template.GetMetaDataKeys():
        image.SetMetaData(key, template.GetMetaData(key))
    return image


def restore_nonfinite(image: sitk.Image, path: Path) -> sitk.Image:
    """Put back the NaN/Inf that ITK's NIfTI reader silently turned into 0, so later steps see the file's truth."""
    mask = nifti_nonfinite_mask(path) if _is_nifti(path) else None
    if mask is None or not mask.any() or mask.shape != sitk.GetArrayViewFromImage(image).shape[-3:]:
        return image
    array = sitk.GetArrayFromImage(image)
    if array.ndim != 3 or not np.issubdtype(array.dtype, np.floating):
        return image
    array[mask] = np.nan
    return image_like(array, image)


def first_volume(image: sitk.Image, source: str, frames: str = "first") -> sitk.Image:
    """A scalar 3D image: the first frame of a 4D series (with `frames="refuse"`, a 4D series is refused: a
    prediction is made for one volume, and the row must say which), the first component of a vector image."""
    if image.GetDimension() == 4 and frames == "refuse":
        raise VolumeReadError(f"a 4-D image with {image.GetSize()[3]} frames; one row is one 3-D volume: extract "
                              f"the frame to predict into a file of its own")
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


def read_image(source: str, max_voxels: int = MAX_VOXELS, external_data: bool = False,
               frames: str = "first") -> sitk.Image:
    """Read a volume file or DICOM series folder as a scalar 3D SimpleITK image, its non-finite voxels kept;
    `external_data` lets a detached header name a data file outside its folder; `frames` (first_volume) says
    what a 4-D series gives."""
    path, _ = split_series(source)
    if not path.exists():
        raise VolumeReadError("no such file or folder")
    try:
        with quiet_itk_warnings(_is_analyze_pair(path)):
            image = _read_dicom(source, max_voxels) if path.is_dir() else \
                restore_nonfinite(_check_file(path, max_voxels, external_data).Execute(), path)
    except RuntimeError as err:
        raise VolumeReadError(itk_reason(err, path)) from None
    return first_volume(image, source, frames)


@dataclass(frozen=True)
class Header:
    """A volume's geometry as its header states it, in SimpleITK's (x, y, z) index order."""
    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3, row-major


def _first_three(reader: sitk.ImageFileReader) -> Header:
    dims = reader.GetDimension()
    direction = [reader.GetDirection()[row * dims + col] for row in range(3) for col in range(3)]
    return Header(tuple(reader.GetSize()[:3]), tuple(reader.GetSpacing()[:3]), tuple(direction))


def _dicom_header(source: str, max_voxels: int) -> Header:
    """The series geometry from its first and last files: the slice spacing is their distance over the gaps."""
    files = _check_dicom(source, max_voxels)
    readers = []
    for name in (files[0], files[-1]):
        reader = sitk.ImageFileReader()
        reader.SetFileName(name)
        reader.ReadImageInformation()
        readers.append(reader)
    first = _first_three(readers[0])
    spacing = list(first.spacing)
    if len(files) > 1 and all(r.HasMetaDataKey(POSITION_KEY) for r in readers):
        positions = [np.array([float(v) for v in r.GetMetaData(POSITION_KEY).split("\\")]) for r in readers]
        spacing[2] = float(np.linalg.norm(positions[1] - positions[0])) / (len(files) - 1) or spacing[2]
    return Header((first.size[0], first.size[1], len(files)), tuple(spacing), first.direction)


def read_header(source: str, max_voxels: int = MAX_VOXELS) -> Header:
    """A source's geometry without decoding its voxels (a DICOM series: two of its files)."""
    path, _ = split_series(source)
    if not path.exists():
        raise VolumeReadError("no such file or folder")
    try:
        return _dicom_header(source, max_voxels) if path.is_dir() else _first_three(_check_file(path, max_voxels))
    except RuntimeError as err:
        raise VolumeReadError(itk_reason(err, path)) from None


def unreadable_reason(source: str, max_voxels: int = MAX_VOXELS, external_data: bool = False) -> str | None:
    """Check a source from its header alone; the reason it cannot be used, or None."""
    path, _ = split_series(source)
    if not path.exists():
        return "no such file or folder"
    try:
        if path.is_dir():
            _check_dicom(source, max_voxels)
        else:
            _check_file(path, max_voxels, external_data)
    except VolumeReadError as err:
        return str(err)
    except RuntimeError as err:
        return itk_reason(err, path)
    return None
