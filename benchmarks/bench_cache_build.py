"""Cache build throughput with 1 and 2 (or more) worker processes.

    python benchmarks/bench_cache_build.py [--quick] [--workers 1,2]

Builds the cache from the same CT-sized .nii.gz sources into a fresh folder per worker count
and prints JSON: volumes/s for each and the speedup over one worker. By default a worker uses
cores / workers SimpleITK threads, so one worker already uses every core for ITK's parallel
filters; "1_single_thread" (one worker, one thread) shows the scaling of processes alone.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from ..volumes.build_cache import build_cache
from ..volumes.preprocess import PreprocessConfig
from .ct_sources import FULL_SOURCE, QUICK_SOURCE, ct_sources


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--work_dir", default=os.environ.get("VOLMAE_BENCH_DIR", "/tmp/volmae_bench"))
    args = parser.parse_args()
    source_size = QUICK_SOURCE if args.quick else FULL_SOURCE
    count, size = (4, 128) if args.quick else (args.count, args.size)
    sources = ct_sources(Path(args.work_dir), count, source_size)
    runs = [(str(w), int(w), None) for w in args.workers.split(",")] + [("1_single_thread", 1, 1)]
    results = {}
    for name, workers, itk_threads in runs:
        output = Path(args.work_dir) / f"build_{name}"
        shutil.rmtree(output, ignore_errors=True)
        start = time.perf_counter()
        manifest = build_cache(str(sources), output, PreprocessConfig(size=(size,) * 3), workers=workers,
                               progress=False, itk_threads=itk_threads)
        seconds = time.perf_counter() - start
        results[name] = {"seconds": round(seconds, 2), "vol_per_s": round(len(manifest) / seconds, 3),
                         "ok": int((manifest["status"] == "ok").sum())}
        shutil.rmtree(output, ignore_errors=True)
    one = results["1"]["vol_per_s"]
    print(json.dumps({
        "benchmark": "cache_build", "quick": args.quick, "source_size_xyz": list(source_size), "grid": size,
        "volumes": count, "cpu_count": os.cpu_count(),
        "workers": results,
        "speedup_vs_1_worker": {name: round(r["vol_per_s"] / one, 2) for name, r in results.items()},
        "speedup_2_workers_vs_1_single_thread": round(results["2"]["vol_per_s"] / results["1_single_thread"]["vol_per_s"], 2)
        if "2" in results else None,
        "target_speedup_2_workers": 1.7,
    }, indent=2))


if __name__ == "__main__":
    main()
