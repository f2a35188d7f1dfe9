"""Which dtype to store cached volumes in: error against float32, compressed size and read time.

    python benchmarks/bench_storage_dtype.py [--size 256]

Preprocesses real volumes (../shared/data/volumes, or VOLMAE_SHARED_DATA) and a synthetic CT
phantom to SIZE^3, stores each as every candidate dtype with the cache's chunking and blosc-lz4
compression, and prints JSON: max and RMS error in [0, 1] units (and in HU for a 2000 HU CT
window), compressed MiB per volume, and full-volume and 64^3-crop read times (page-cached file, no
HDF5 chunk cache, so every read decompresses as it does once per volume per epoch).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from ..volumes.cache import STORAGE_DTYPES, write_volume
from ..volumes.phantoms import make_phantom
from ..volumes.preprocess import PreprocessConfig, load_volume, preprocess_image
from ..volumes.stored import to_unit_float

SHARED = Path(os.environ.get("VOLMAE_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SOURCES = ("example_ct.nii.gz", "example_mr_sm.nii.gz", "ch2.nii.gz")


def timed(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    config = PreprocessConfig(size=(args.size,) * 3)
    volumes = {"phantom_ct": preprocess_image(make_phantom(np.random.default_rng(0), (120, 160)), config).array}
    for name in SOURCES:
        if (SHARED / "volumes" / name).exists():
            volumes[name] = load_volume(str(SHARED / "volumes" / name), config)
    results = {dtype: {"max_abs_error": 0.0, "rms_error": [], "mib": [], "read_s": [], "crop_s": []}
               for dtype in STORAGE_DTYPES}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in STORAGE_DTYPES:
            path = Path(tmp) / f"{dtype}.h5"
            with h5py.File(path, "w") as f:
                group = f.create_group("volumes")
                for name, volume in volumes.items():
                    write_volume(group, name, volume, dtype, {})
            with h5py.File(path, "r", rdcc_nbytes=0) as f:  # every read decompresses, as in an epoch
                for name, volume in volumes.items():
                    dataset = f["volumes"][name]
                    error = to_unit_float(dataset[()]) - volume
                    entry = results[dtype]
                    entry["max_abs_error"] = max(entry["max_abs_error"], float(np.abs(error).max()))
                    entry["rms_error"].append(float(np.sqrt((error ** 2).mean())))
                    entry["mib"].append(dataset.id.get_storage_size() / 2**20)
                    entry["read_s"].append(timed(lambda d=dataset: to_unit_float(d[()])))
                    entry["crop_s"].append(timed(lambda d=dataset: to_unit_float(d[:, 32:96, 32:96, 32:96])))
    summary = {}
    for dtype, entry in results.items():
        summary[dtype] = {
            "max_abs_error": entry["max_abs_error"],
            "max_abs_error_hu_2000_window": entry["max_abs_error"] * 2000,
            "rms_error": float(np.mean(entry["rms_error"])),
            "mib_per_volume": round(float(np.mean(entry["mib"])), 2),
            "read_ms": round(1000 * float(np.mean(entry["read_s"])), 2),
            "crop64_ms": round(1000 * float(np.mean(entry["crop_s"])), 2),
        }
    base = summary["float32"]
    for entry in summary.values():
        entry["read_speedup_vs_float32"] = round(base["read_ms"] / entry["read_ms"], 2)
        entry["size_vs_float32"] = round(entry["mib_per_volume"] / base["mib_per_volume"], 3)
    print(json.dumps({"benchmark": "storage_dtype", "size": args.size, "volumes": list(volumes),
                      "compression": "blosc-lz4 clevel 5 + byte shuffle, 64^3 chunks", "dtypes": summary}, indent=2))


if __name__ == "__main__":
    main()
