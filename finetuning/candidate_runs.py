"""One seed's fine-tuning: each candidate of finetuning.search trained on the same training samples, judged on
validation, the chosen one's weights left in OUTPUT_DIR/best.pth.

A single candidate writes where a run always has (best.pth, log.txt, tensorboard in OUTPUT_DIR). When a second one
is needed, every candidate's files live in OUTPUT_DIR/search/<candidate>/ and OUTPUT_DIR gets a copy of the chosen
one's best.pth and log.txt.
"""
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..datasets.array_dataset import ArrayDataset
from ..datasets.data_profile import DataProfile
from ..datasets.task_data import TaskData
from ..inference.checkpoints import ClassifierCheckpoint
from ..util.dist import DistInfo, barrier
from ..util.run_log import RunLog
from .engine import Finetuner
from .finetune_config import FinetuneRun
from .model_choice import build_model, with_reconstruction
from .search import candidate_record, candidates, clears_validation, rank_key

MOVED_OUTPUTS = ("best.pth", "log.txt", "tensorboard")


@dataclass
class ChosenRun:
    trainer: Finetuner
    model: torch.nn.Module
    run: FinetuneRun  # with the chosen candidate's values
    selection: dict
    augment_report: dict
    search: dict


def train_candidate(run: FinetuneRun, data: TaskData, train: tuple[np.ndarray, np.ndarray], dist_info: DistInfo,
                    profile: DataProfile, folder: Path, flags: dict, say: Callable) -> tuple:
    """Train one candidate from the same initial weights and samples as every other; (trainer, model, selection,
    augmentation report). A diverged candidate raises FloatingPointError, with no best.pth of its own."""
    torch.manual_seed(run.training.seed)
    np.random.seed(run.training.seed)
    model = build_model(run.model, data, say)
    augment, augment_report = run.augmentation(profile)
    splits = {"train": ArrayDataset(*train), **{name: ArrayDataset(*data.splits[name]) for name in ("val", "test")}}
    trainer = Finetuner(run.training, with_reconstruction(run.model, model, say), splits, data.task,
                        len(data.class_names), dist_info, augment)
    checkpoint = ClassifierCheckpoint(
        run.model.name, model.config, data.class_names, data.task, list(data.input_size),
        data.preprocess.to_dict() if data.preprocess is not None else None, data.data, run.setup, run.to_dict(), flags)
    run_log = RunLog(folder, run.log_dir or folder / "tensorboard", enabled=dist_info.is_main)
    try:
        selection = trainer.fit(run_log, folder / "best.pth", checkpoint)
    finally:
        run_log.close()
    return trainer, model, selection, augment_report


def _move_into(output_dir: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in MOVED_OUTPUTS:
        if (output_dir / name).exists():
            shutil.move(str(output_dir / name), str(folder / name))


def train_chosen(run: FinetuneRun, data: TaskData, train: tuple[np.ndarray, np.ndarray], dist_info: DistInfo,
                 profile: DataProfile, output_dir: Path, val_floor_auc: float | None, flags: dict,
                 say: Callable) -> ChosenRun:
    """Try the candidates (finetuning.search) and keep the chosen one in memory and in OUTPUT_DIR/best.pth."""
    seed = run.training.seed
    todo = candidates(run, run.augmentation(profile)[1]["preset"])
    mode = run.search
    records, best, folders = [], None, {}
    for i, candidate in enumerate(todo):
        if i == 1 and dist_info.is_main:  # a second candidate: the first one's files move beside it
            _move_into(output_dir, output_dir / "search" / todo[0].name)
        barrier()
        folder = output_dir if i == 0 else output_dir / "search" / candidate.name
        folders[candidate.name] = output_dir / "search" / candidate.name
        candidate_run = candidate.apply(run)
        if len(todo) > 1:
            say(f"seed {seed}: candidate {i + 1} of at most {len(todo)} ({mode} search): lr {candidate.lr:.2e}, "
                f"augmentation {candidate.augment}")
        try:
            trainer, model, selection, augment_report = train_candidate(candidate_run, data, train, dist_info,
                                                                        profile, folder, flags, say)
        except FloatingPointError as err:
            records.append({"name": candidate.name, "lr": candidate.lr, "augment": candidate.augment,
                            "diverged": str(err)})
            say(f"seed {seed}: candidate {candidate.name} diverged ({err})")
            continue
        record = candidate_record(candidate, selection, val_floor_auc)
        records.append(record)
        if best is None or rank_key(record) > rank_key(best[0]):
            best = (record, ChosenRun(trainer, model, candidate_run, selection, augment_report, {}))
        if mode == "fallback" and clears_validation(record):
            break
        if len(todo) > 1 and i + 1 < len(todo):
            say(f"seed {seed}: candidate {candidate.name}: validation score {record['val_score']:.4f}"
                f"{', collapsed' if record['collapsed'] else ''}{', at the class prior' if record['val_at_prior'] else ''}"
                f"{f', PCA floor {val_floor_auc:.4f}' if val_floor_auc is not None else ''}"
                f"{'' if mode == 'full' else '; trying the next'}")
    if best is None:
        raise FloatingPointError(f"every candidate diverged ({', '.join(r['name'] for r in records)})")
    record, chosen = best
    if len(records) > 1 and dist_info.is_main:
        for name in ("best.pth", "log.txt"):
            shutil.copy2(folders[record["name"]] / name, output_dir / name)
    chosen.search = {"mode": mode, "chosen": record["name"], "cleared_validation": clears_validation(record),
                     "candidates": records, "folder": str(folders[record["name"]].relative_to(output_dir)) if len(records) > 1 else None}
    return chosen
