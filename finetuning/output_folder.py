"""A fine-tuning folder holds one finished run or none, never a mix of two.

results.json is written last, so a folder that has one holds a finished run. A new run there is refused
unless `--overwrite` is given; then the old run's results.json files go first and its other outputs after,
so a new run killed at any moment leaves an unfinished folder (no results.json), not one whose results
describe another model.
"""
import shutil
from pathlib import Path

from ..util.errors import UsageError
from .reporting import RESULTS_FILE

RUN_OUTPUTS = ("best.pth", "log.txt", "meta_split.csv", "*_scores.csv", "*@seed*.csv", "roc_curve.png",
               "confusion_matrix.png", "explain", "search", "tensorboard", "seed_*")


class FinishedRunError(UsageError):
    """The folder holds a finished run and --overwrite was not given; the message names it."""


def finished_results(output_dir: Path) -> list[Path]:
    return sorted([*output_dir.glob(RESULTS_FILE), *output_dir.glob(f"seed_*/{RESULTS_FILE}")])


def claim_output_folder(output_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds a finished run, or with `overwrite` clear that run's outputs (not caches)."""
    finished = finished_results(output_dir)
    if not finished:
        return
    if not overwrite:
        raise FinishedRunError(f"{output_dir} holds a finished fine-tuning run ({finished[0]}); its best.pth, "
                               f"scores and plots belong to it. Choose another --output_dir, or add --overwrite to "
                               f"replace that run")
    for path in finished:
        path.unlink()
    for pattern in RUN_OUTPUTS:
        for path in output_dir.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"--overwrite: removed the finished run in {output_dir}", flush=True)
