"""Write synthetic CT phantoms as NIfTI files (volumes.phantoms): the built-in corpus of `make demo`.

    python main_phantoms.py --output phantoms --count 24
    python main_phantoms.py --output labelled --count 320 --lesions   # with labels.csv (path, patient_id, lesion)
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import sys

from .util.cli import HelpFormatter, int_tuple, positive_int, run_main
from .util.errors import UsageError
from .volumes.phantoms import write_labelled_corpus, write_phantom_corpus


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", required=True, help="folder of the NIfTI files (made if missing)")
    parser.add_argument("--count", type=positive_int, default=24, help="number of phantoms")
    parser.add_argument("--seed", type=int, default=0, help="phantom i is drawn from the seed (SEED, i)")
    parser.add_argument("--size_range", type=int_tuple, default=(40, 80), help="MIN,MAX voxels per axis")
    parser.add_argument("--size", type=int_tuple, default=None, help="fixed X,Y,Z grid instead (e.g. 512,512,300)")
    parser.add_argument("--lesions", action="store_true",
                        help="every other phantom gets a lung mass; also write labels.csv (path, patient_id, lesion)")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.lesions:
        if args.size is not None:
            raise UsageError("--size is not used with --lesions")
        labels = write_labelled_corpus(args.output, args.count, args.seed, tuple(args.size_range))
        print(f"{args.count} phantoms and their labels in {labels}")
        return
    paths = write_phantom_corpus(args.output, args.count, args.seed, tuple(args.size_range), size=args.size)
    print(f"{len(paths)} phantoms in {args.output}")


def cli() -> None:
    sys.exit(run_main(main, get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
