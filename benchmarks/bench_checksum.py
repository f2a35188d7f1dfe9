"""Does HDF5's fletcher32 checksum cost reading speed? The same volumes written with the cache's compression,
with and without the checksum, then read whole, alternating rounds so both see the same machine load.

    python benchmarks/bench_checksum.py --volumes 64 --size 64 --rounds 5

Prints JSON: volumes/s of each, their ratio and the file sizes. With the checksum, bit-rot in a chunk is
reported as a checksum error instead of being decoded into wrong voxels (when the compressor does not notice).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
from scipy.ndimage import gaussian_filter

from ..volumes.cache import chunk_shape, compression


def write(path: Path, volumes: list[np.ndarray], checksum: bool) -> None:
    with h5py.File(path, "w") as handle:
        for i, volume in enumerate(volumes):
            handle.create_dataset(f"v{i}", data=volume, chunks=chunk_shape(volume.shape), fletcher32=checksum,
                                  **compression())


def read_rate(path: Path, count: int, shape: tuple[int, ...]) -> float:
    out = np.empty(shape, np.uint16)
    start = time.perf_counter()
    with h5py.File(path, "r") as handle:
        for i in range(count):
            handle[f"v{i}"].read_direct(out)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    shape = (1, args.size, args.size, args.size)
    volumes = [(gaussian_filter(rng.normal(size=shape[1:]), 2) * 20000 + 30000).clip(0, 65535).astype(np.uint16)
               .reshape(shape) for _ in range(args.volumes)]
    rates: dict[str, list[float]] = {"plain": [], "fletcher32": []}
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: Path(folder) / f"{name}.h5" for name in rates}
        for name, path in paths.items():
            write(path, volumes, checksum=name == "fletcher32")
        for _ in range(args.rounds):
            for name, path in paths.items():
                rates[name].append(read_rate(path, args.volumes, shape))
        sizes = {name: path.stat().st_size for name, path in paths.items()}
    median = {name: float(np.median(values)) for name, values in rates.items()}
    print(json.dumps({"volumes": args.volumes, "shape": list(shape), "rounds": args.rounds,
                      "read_volumes_per_s": median, "checksum_over_plain": median["fletcher32"] / median["plain"],
                      "bytes": sizes}, indent=2))


if __name__ == "__main__":
    main()
