"""Truncation check for NIfTI-1 files, which ITK reads without complaint, filling the gap with garbage."""
import gzip
import math
import struct
import zlib
from pathlib import Path

NIFTI1_HEADER_SIZE = 348
NIFTI2_HEADER_SIZE = 540
READ_BLOCK = 1 << 22


def _expected_bytes(header: bytes) -> int | None:
    """Header plus data size a NIfTI-1 header promises; None for anything else (NIfTI-2, Analyze)."""
    for endian in "<>":
        if len(header) >= NIFTI1_HEADER_SIZE and struct.unpack(endian + "i", header[:4])[0] == NIFTI1_HEADER_SIZE:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            ndim = max(0, min(dims[0], 7))
            voxels = math.prod(max(d, 0) for d in dims[1:ndim + 1])
            return max(int(vox_offset), NIFTI1_HEADER_SIZE) + voxels * max(bitpix, 0) // 8
    return None


def is_nifti2(path: Path) -> bool:
    try:
        with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
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
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
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
