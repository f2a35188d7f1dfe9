"""A fine-tuning folder holds one finished run or none, never a mix of two, and loses nothing to a new one.

results.json is written last, so a folder that has one holds a finished run. A new run there is refused unless
`--overwrite` is given. Then the old run's outputs (results.json first) are set aside in a hidden folder beside
them, `.replaced-run-PID`, and removed only when the new run has written its own results; a new run that fails
or is stopped puts the old run back, and one killed outright leaves it there for the next run to put back.
Outputs of a run that never finished (a killed run's log.txt, tensorboard events, best.pth) are moved into
`stopped-N/` before a new run starts, so its log and events start fresh instead of continuing the dead run's.
Only the files a fine-tuning run writes are moved: anything else in the folder (the volume cache, a user's
files) stays where it is.
"""
import os
import re
import shutil
from pathlib import Path

from ..util.errors import UsageError
from .reporting import RESULTS_FILE

RUN_OUTPUTS = (RESULTS_FILE, "best.pth", "log.txt", "meta_split.csv", "*_scores.csv", "*@seed*.csv", "roc_curve.png",
               "confusion_matrix.png", "explain", "search", "tensorboard", "seed_*", "folds", "final_model", "folds.csv")
REPLACED = re.compile(r"\.replaced-run-(\d+)")
STOPPED = "stopped-{}"


class FinishedRunError(UsageError):
    """The folder holds a finished run and --overwrite was not given; the message names it."""


def finished_results(output_dir: Path) -> list[Path]:
    return sorted([*output_dir.glob(RESULTS_FILE), *output_dir.glob(f"seed_*/{RESULTS_FILE}")])


def run_outputs(output_dir: Path) -> list[Path]:
    """The files and folders of a run in `output_dir`, results.json files first."""
    found = dict.fromkeys(finished_results(output_dir))
    for pattern in RUN_OUTPUTS:
        found.update(dict.fromkeys(sorted(output_dir.glob(pattern))))
    return list(found)


def _move(paths: list[Path], source: Path, destination: Path) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in paths:
        target = destination / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(path, target)


def _set_aside_unfinished(output_dir: Path) -> Path | None:
    """Move an unfinished run's outputs into a new stopped-N folder; that folder, or None when there were none."""
    leftovers = run_outputs(output_dir)
    if not leftovers:
        return None
    n = 1
    while (output_dir / STOPPED.format(n)).exists():
        n += 1
    folder = output_dir / STOPPED.format(n)
    _move(leftovers, output_dir, folder)
    return folder


def _backups(output_dir: Path) -> list[tuple[Path, int]]:
    return [(entry, int(m.group(1))) for entry in output_dir.iterdir() if (m := REPLACED.fullmatch(entry.name))]


def put_back_replaced(output_dir: Path, pid: int | None = None) -> Path | None:
    """The run set aside by an --overwrite goes back in place: this process's (`pid`), or with None that of a run
    killed before it finished (this run holds the folder's lock, so any other owner is dead). What the replacing
    run left is moved to stopped-N first. The folder it was restored from, or None."""
    for backup, owner in _backups(output_dir):
        if owner != pid if pid is not None else owner == os.getpid():
            continue
        _set_aside_unfinished(output_dir)
        _move(list(backup.iterdir()), backup, output_dir)
        backup.rmdir()
        return backup
    return None


def claim_output_folder(output_dir: Path, overwrite: bool) -> None:
    """Before a run writes anything: refuse a folder that holds a finished run, or with `overwrite` set that run
    aside; move a stopped run's outputs into stopped-N."""
    restored = put_back_replaced(output_dir)
    if restored is not None:
        print(f"note: put back the finished run that an --overwrite stopped before finishing had set aside "
              f"({restored.name})", flush=True)
    finished = finished_results(output_dir)
    if finished and not overwrite:
        raise FinishedRunError(f"{output_dir} holds a finished fine-tuning run ({finished[0]}); its best.pth, "
                               f"scores and plots belong to it. Choose another --output_dir, or add --overwrite to "
                               f"replace that run")
    if finished:
        backup = output_dir / f".replaced-run-{os.getpid()}"
        _move(run_outputs(output_dir), output_dir, backup)
        print(f"--overwrite: the finished run in {output_dir} is set aside in {backup.name} until this run "
              f"finishes (then removed; put back if this run fails)", flush=True)
        return
    stopped = _set_aside_unfinished(output_dir)
    if stopped is not None:
        print(f"note: {output_dir} held the outputs of a run that did not finish (no {RESULTS_FILE}); moved them "
              f"to {stopped} so that this run's log.txt and tensorboard start fresh", flush=True)


def release_replaced(output_dir: Path) -> None:
    """This run finished: the run its --overwrite set aside is removed."""
    for backup, owner in _backups(output_dir):
        if owner == os.getpid():
            shutil.rmtree(backup)


def undo_claim(output_dir: Path) -> None:
    """This run failed or was stopped: the run its --overwrite set aside goes back in place."""
    restored = put_back_replaced(output_dir, os.getpid())
    if restored is not None:
        print(f"--overwrite: this run did not finish; the run it was to replace is back in {output_dir}", flush=True)
