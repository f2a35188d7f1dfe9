"""Checks on NIfTI-1 files that ITK does not make: truncation (ITK fills the gap with garbage), zero-length
axes (ITK reads them as length 1), voxel sizes of 0, NaN or Inf (read as 1 mm) and non-finite voxels (ITK's
NIfTI reader turns NaN and Inf into 0)."""
import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

NIFTI1_HEADER_SIZE = 348
NIFTI2_HEADER_SIZE = 540
READ_BLOCK = 1 << 22


# NIfTI-1 datatype codes of the floating-point types, the only ones that can hold NaN or Inf
FLOAT_DATATYPES = {16: "f4", 64: "f8"}


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class NiftiHeader(NamedTuple):
    endian: str
    dims: tuple[int, ...]  # lengths of the used axes
    datatype: int
    bitpix: int
    data_offset: int
    spacing: tuple[float, ...]  # pixdim of the first three axes, as stored


def _header_fields(header: bytes) -> NiftiHeader | None:
    """The fields of a NIfTI-1 header these checks need; None for anything else (NIfTI-2, Analyze)."""
    for endian in "<>":
        if len(header) >= NIFTI1_HEADER_SIZE and struct.unpack(endian + "i", header[:4])[0] == NIFTI1_HEADER_SIZE:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", header[70:74])
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            pixdim = struct.unpack(endian + "8f", header[76:108])
            ndim = max(0, min(dims[0], 7))
            offset = int(vox_offset) if math.isfinite(vox_offset) else 0
            return NiftiHeader(endian, tuple(dims[1:ndim + 1]), datatype, bitpix,
                               max(offset, NIFTI1_HEADER_SIZE), tuple(pixdim[1:4]))
    return None


def _read_header(path: Path) -> NiftiHeader | None:
    try:
        with _open(path) as f:
            return _header_fields(f.read(NIFTI1_HEADER_SIZE))
    except (OSError, EOFError, zlib.error):
        return None


def nifti_empty_axis(path: Path) -> str | None:
    """A header with an axis of length 0 (ITK would read it as 1), or None."""
    fields = _read_header(path)
    if fields is None or all(d > 0 for d in fields.dims[:3]):
        return None
    return f"the header gives an axis of length 0 (dims {'x'.join(map(str, fields.dims))}): no voxels"


def nifti_bad_spacing(path: Path) -> str | None:
    """A voxel size of 0, NaN or Inf in the header (ITK would read it as 1 mm, without a word), or None."""
    fields = _read_header(path)
    if fields is None or all(math.isfinite(v) and v > 0 for v in fields.spacing[:len(fields.dims[:3])]):
        return None
    return f"the header gives a voxel size of {' x '.join(f'{v:g}' for v in fields.spacing)} mm: not a usable spacing"


def nifti_nonfinite_mask(path: Path) -> np.ndarray | None:
    """Where the first 3D volume of a floating-point NIfTI-1 file holds NaN or Inf, read from the raw data, as a
    (z, y, x) boolean array in SimpleITK's array order; None when the file has no floating-point data."""
    fields = _read_header(path)
    if fields is None or fields.datatype not in FLOAT_DATATYPES or len(fields.dims) < 3:
        return None
    shape = tuple(fields.dims[:3])
    dtype = np.dtype(fields.endian + FLOAT_DATATYPES[fields.datatype])
    with _open(path) as f:
        f.read(fields.data_offset)
        data = np.frombuffer(f.read(math.prod(shape) * dtype.itemsize), dtype=dtype)
    if data.size != math.prod(shape):
        return None  # truncated: nifti_truncation reports it
    return ~np.isfinite(data).reshape(shape[::-1])


def _expected_bytes(header: bytes) -> int | None:
    """Header plus data size a NIfTI-1 header promises; None for anything else (NIfTI-2, Analyze)."""
    fields = _header_fields(header)
    if fields is None:
        return None
    return fields.data_offset + math.prod(max(d, 0) for d in fields.dims) * max(fields.bitpix, 0) // 8


def is_nifti2(path: Path) -> bool:
    try:
        with _open(path) as f:
            first = f.read(4)
    except (OSError, EOFError, zlib.error):
        return False
    return len(first) == 4 and NIFTI2_HEADER_SIZE in (struct.unpack("<i", first)[0], struct.unpack(">i", first)[0])


def _decompressed_size(path: Path) -> int:
    """Stream the whole gzip file; EOFError when it ends before its end-of-stream marker."""
    size = 0
    with gzip.open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            size += len(block)
    return size


def nifti_truncation(path: Path) -> str | None:
    """Why a .nii/.nii.gz holds less data than its header says, or None when it is whole (or not NIfTI-1)."""
    compressed = path.name.lower().endswith(".gz")
    try:
        with _open(path) as f:
            expected = _expected_bytes(f.read(NIFTI1_HEADER_SIZE))
    except (OSError, EOFError, zlib.error):
        return None  # not gzip or not NIfTI at all: the reader reports that itself
    if expected is None:
        return None
    if not compressed:
        actual = path.stat().st_size
        return None if actual >= expected else f"truncated: {actual} bytes, the header needs {expected}"
    with open(path, "rb") as f:
        f.seek(-4, 2)
        recorded = struct.unpack("<I", f.read(4))[0]  # gzip's ISIZE: uncompressed length mod 2^32
    if recorded == expected % 2**32:
        return None
    try:
        actual = _decompressed_size(path)
    except (EOFError, OSError, zlib.error) as err:
        return f"truncated or corrupt gzip stream ({err})"
    return None if actual >= expected else f"truncated: {actual} bytes after decompression, the header needs {expected}"
