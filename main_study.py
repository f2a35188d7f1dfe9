"""Run a study: one command from data to a measured result, each step the main a user would type.

    python main_study.py demo [--output_dir demo_output] ...        # launch/recipes/demo.sh
    python main_study.py medmnist --data_flag adrenalmnist3d ...    # launch/recipes/medmnist.sh
    python main_study.py volumes --corpus DIR --labels labels.csv ... # launch/recipes/volumes.sh

`python main_study.py STUDY --help` lists a study's options. The studies live in `studies/`; the shell scripts
under launch/recipes/ only choose the interpreter ($VOLMAE_PYTHON) and the study.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import sys

from .studies import demo, medmnist, volumes
from .util.cli import run_main

STUDIES = {"demo": demo, "medmnist": medmnist, "volumes": volumes}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=tuple(STUDIES))
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the study's own (STUDY --help lists them)")
    chosen = parser.parse_args(argv)
    study = STUDIES[chosen.study]
    return run_main(study.run_study, study.get_args_parser().parse_args(chosen.options))


def cli() -> None:
    """The `volmae-study` command: the same as `python main_study.py`."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
