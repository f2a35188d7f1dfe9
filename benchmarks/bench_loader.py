"""Pretraining input pipeline throughput: the HDF5 cache against reading the sources on the fly.

    python benchmarks/bench_loader.py [--quick] [--workers 2] [--size 256]

Through a DataLoader with W workers: (a) the cache (CacheDataset), (b) the on-the-fly path that
reads, reorients, resamples and windows the same CT-sized .nii.gz sources every time (as the
reference does), (c) bare h5py reads of the same cached data in W processes, no Dataset and no
transfer between processes (the upper bound), and (c1) the same bare reads in one process. Prints
JSON with volumes/s, MB/s (float32 voxels delivered) and the ratios a/b, a/c and a/c1.
Every path runs once untimed first (warm page cache, workers started), then is timed.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import h5py
from torch.utils.data import DataLoader

from ..datasets.volume_dataset import CacheDataset, VolumeFileDataset, collate_volumes, single_threaded_worker
from ..volumes.build_cache import build_cache
from ..volumes.cache import VolumeCache
from ..volumes.preprocess import PreprocessConfig
from ..volumes.sources import list_sources
from .ct_sources import FULL_SOURCE, QUICK_SOURCE, ct_sources


def make_loader(dataset, workers: int, batch_size: int) -> DataLoader:
    """Persistent workers, so that timed passes measure reading, not process start-up."""
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_volumes,
                      worker_init_fn=single_threaded_worker, persistent_workers=True)


def loader_pass(loader: DataLoader) -> tuple[float, int]:
    start = time.perf_counter()
    count = sum(int(batch["index"].numel()) for batch in loader)
    return time.perf_counter() - start, count


def timed_passes(run_pass, passes: int) -> tuple[float, int]:
    """One untimed warm-up pass, then `passes` timed ones."""
    run_pass()
    seconds, count = 0.0, 0
    for _ in range(passes):
        s, c = run_pass()
        seconds, count = seconds + s, count + c
    return seconds, count


def _bare_reads(paths_and_keys: list[tuple[str, str]]) -> int:
    handles = {}
    for path, key in paths_and_keys:
        handles.setdefault(path, h5py.File(path, "r"))["volumes"][key][()]
    return len(paths_and_keys)


def bare_pass(pool, cache: VolumeCache, workers: int) -> tuple[float, int]:
    items = [(str(cache.root / row.shard), row.key) for row in cache.manifest.itertuples()]
    start = time.perf_counter()
    count = sum(pool.map(_bare_reads, [items[w::workers] for w in range(workers)]))
    return time.perf_counter() - start, count


def rate(seconds: float, count: int, voxels: int) -> dict:
    return {"seconds": round(seconds, 3), "volumes": count, "vol_per_s": round(count / seconds, 3),
            "mb_per_s": round(count * voxels * 4 / 2**20 / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"4 sources of {QUICK_SOURCE}, cached at 128^3")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--cache_passes", type=int, default=3, help="timed passes over the cache")
    parser.add_argument("--work_dir", default=os.environ.get("VOLMAE_BENCH_DIR", "/tmp/volmae_bench"))
    args = parser.parse_args()
    source_size = QUICK_SOURCE if args.quick else FULL_SOURCE
    count, size = (4, 128) if args.quick else (args.count, args.size)
    work = Path(args.work_dir)
    config = PreprocessConfig(size=(size,) * 3)

    sources = ct_sources(work, count, source_size)
    cache_dir = work / f"cache_{source_size[0]}_{size}"
    build_cache(str(sources), cache_dir, config, workers=args.workers, progress=False)
    cache = VolumeCache(cache_dir)
    voxels = size ** 3

    cached = make_loader(CacheDataset(cache, (size,) * 3), args.workers, args.batch_size)
    a = rate(*timed_passes(lambda: loader_pass(cached), args.cache_passes), voxels)
    on_the_fly = make_loader(VolumeFileDataset(list_sources(sources), config), args.workers, args.batch_size)
    b = rate(*timed_passes(lambda: loader_pass(on_the_fly), 1), voxels)
    with get_context("spawn").Pool(args.workers) as pool:
        c = rate(*timed_passes(lambda: bare_pass(pool, cache, args.workers), args.cache_passes), voxels)
    with get_context("spawn").Pool(1) as pool:
        c1 = rate(*timed_passes(lambda: bare_pass(pool, cache, 1), args.cache_passes), voxels)
    print(json.dumps({
        "benchmark": "loader", "quick": args.quick, "source_size_xyz": list(source_size),
        "source_mb": round(sum(p.stat().st_size for p in Path(sources).glob("*.nii.gz")) / count / 2**20, 1),
        "grid": size, "workers": args.workers, "batch_size": args.batch_size, "cpu_count": os.cpu_count(),
        "stored_dtype": cache.meta["dtype"],
        "a_cache": a, "b_on_the_fly": b, "c_bare_h5py": c, "c1_bare_h5py_one_process": c1,
        "ratio_a_over_b": round(a["vol_per_s"] / b["vol_per_s"], 2),
        "ratio_a_over_c": round(a["vol_per_s"] / c["vol_per_s"], 3),
        "ratio_a_over_c1": round(a["vol_per_s"] / c1["vol_per_s"], 3),
        "targets": {"a_over_b_at_256": 20, "a_over_c": 0.8},
    }, indent=2))


if __name__ == "__main__":
    main()
