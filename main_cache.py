"""Build the sharded HDF5 cache of a raw corpus (NIfTI, DICOM, MHA, NRRD, Analyze), in parallel, resumably.

    volmae-cache --input /data/ct --output /cache/ct256 --size 256 --workers 8

The same as `python main_cache.py`. Each volume is read with SimpleITK, put in the canonical orientation,
resampled to the grid and windowed (the preprocessing flags below), then stored in shards of HDF5.
Re-running the same command after a crash or a kill builds only what is missing; sources changed since are
cached again. Unusable inputs are `skipped` with their reason; the exit code is non-zero only when nothing
at all could be cached.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import os
import sys
import time
from pathlib import Path

from .util.cli import HelpFormatter, grid, int_tuple_or_auto, positive_int, run_main
from .util.errors import UsageError
from .volumes.build_cache import INTERRUPTED, CacheSettingsError, build_cache, summarise
from .volumes.cache import DEFAULT_STORAGE_DTYPE, STORAGE_DTYPES
from .volumes.flags import add_preprocess_args, preprocess_config_from_args
from .volumes.preprocess import AUTO
from .volumes.preprocess_choice import choose_preprocess, survey_headers
from .volumes.sources import list_sources


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="volmae-cache", description=__doc__, formatter_class=HelpFormatter)
    files = parser.add_argument_group("input and output")
    files.add_argument("--input", required=True, help="folder (searched recursively), .txt of paths, or .csv with a 'path' column")
    files.add_argument("--output", required=True, help="cache folder (created; re-run to resume)")
    files.add_argument("--size", type=int_tuple_or_auto, default=(256,),
                       help="N or D,H,W voxels of the cached grid; auto (with --resample auto): chosen from the headers")
    files.add_argument("--dtype", choices=STORAGE_DTYPES, default=DEFAULT_STORAGE_DTYPE,
                       help="stored dtype (uint16: 0.015 HU max error, half of float32's size)")
    files.add_argument("--shard_size", type=positive_int, default=None,
                       help="volumes per shard (default: enough shards to keep every worker busy, at most 64)")
    work = parser.add_argument_group("processes")
    work.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 2) - 1),
                      help="processes decoding and resampling volumes (default: cores - 1)")
    work.add_argument("--itk_threads", type=positive_int, default=None, help="SimpleITK threads per worker (default: cores / workers)")
    add_preprocess_args(parser, allow_auto=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.size == AUTO and args.resample != AUTO:
        raise UsageError("--size auto is chosen together with the resampling: add --resample auto")
    size = None if args.size == AUTO else grid(args.size)
    config = preprocess_config_from_args(args, size or (1, 1, 1))
    start = time.perf_counter()
    try:
        sources = list_sources(args.input)
        if args.resample == AUTO:
            choice = choose_preprocess(survey_headers(sources, config.max_voxels), config, size)
            config = choice.config
            print(f"preprocessing: {choice.reason}")
        manifest = build_cache(sources, args.output, config, args.workers, args.dtype, args.shard_size,
                               itk_threads=args.itk_threads)
    except CacheSettingsError as err:
        raise UsageError(f"{err}; use another --output") from None
    except KeyboardInterrupt:
        print(f"\ninterrupted: the finished shards in {args.output} are kept; run the same command again to build "
              f"the rest", file=sys.stderr)
        return INTERRUPTED
    print(summarise(manifest, Path(args.output), time.perf_counter() - start))
    if not (manifest["status"] == "ok").any():
        print("error: no volume could be cached", file=sys.stderr)
        return 1
    return 0


def cli() -> None:
    """The `volmae-cache` command: the same as `python main_cache.py`."""
    sys.exit(run_main(main))


if __name__ == "__main__":
    cli()
