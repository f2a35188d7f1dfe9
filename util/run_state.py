"""Whether the run that wrote a checkpoint has finished: what an export must know before it publishes the file.

A fine-tuning run writes results.json last and a pretraining run encoder.pth last, and both hold a lock on
their folder while they live (util.run_lock). A best.pth without results.json beside it is an epoch of a run
that was stopped or is still going; a checkpoint-last.pth without encoder.pth is an unfinished pretraining.
A file outside any run folder (copied elsewhere, no log.txt or lock beside it) has nothing to tell, and passes.
"""
from pathlib import Path

from .run_lock import LOCK_FILE, describe, live_holder

RESULTS_FILE = "results.json"  # a fine-tuning run writes it last
FINAL_ENCODER = "encoder.pth"  # a pretraining run writes it last
RUN_MARKERS = ("log.txt", LOCK_FILE)


def unfinished_reason(checkpoint: Path, is_classifier: bool) -> str | None:
    """Why `checkpoint` (symlinks resolved) is not a finished run's model, or None when it is (or cannot say)."""
    folder = checkpoint.parent
    holder = live_holder(folder)
    if holder is not None:
        return f"its folder {folder} is in use by {describe(holder)}: that run is still writing"
    if not any((folder / marker).exists() for marker in RUN_MARKERS):
        return None
    if is_classifier and not (folder / RESULTS_FILE).is_file():
        return f"there is no {RESULTS_FILE} beside it: its fine-tuning run stopped before it finished"
    if not is_classifier and not (folder / FINAL_ENCODER).is_file():
        return f"there is no {FINAL_ENCODER} beside it: its pretraining run stopped before it finished"
    return None
