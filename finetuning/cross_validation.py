"""Cross-validation as a run's backbone (`--folds K`): every choice on the pooled out-of-fold predictions of the
training patients, the final model the ensemble of the K fold models, the test split read once, by it.

A validation split of 60 patients gives paired intervals 0.04-0.07 wide: too wide to choose an lr or an
augmentation on. Here the non-test patients (train and val of the split, or `--train_fraction` of them) are dealt
into K folds, grouped by patient and stratified by label (datasets.task_data.split_groups). Each candidate of the
search (finetuning.search) trains K models, fold i's on the other folds and stopped early on fold i; its
predictions on every training patient, each from the model that did not see it, are pooled, and the candidate
with the best pooled AUC (among those that left the class prior and cleared the floor, when any did) is chosen.
The PCA + logistic regression floor goes through the same folds, so its pooled AUC is the bar on the same
patients. Nothing reads the test split before the choice is made; then the chosen candidate's K models, as one
ensemble of their mean probability (OUTPUT_DIR/final_model, models.ensemble), are scored on it once.
"""
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..datasets.data_profile import DataProfile
from ..datasets.labelled_volumes import fraction_of_patients
from ..datasets.task_data import TaskData, split_groups
from ..inference.ensemble_folder import write_ensemble
from ..util.dist import DistInfo
from ..util.errors import UsageError
from ..util.floors import image_floor_scores, majority_share
from ..util.folder_swap import building
from ..util.metrics import REGRESSION, auc_and_acc, selection_score, stays_at_prior
from .candidate_runs import train_candidate
from .finetune_config import FinetuneRun
from .search import candidates, clears_validation, rank_key

FINAL_MODEL = "final_model"
FOLDS_FOLDER = "folds"


@dataclass
class Pool:
    """The non-test samples cross-validation deals into folds, and the fold of each."""
    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    sources: np.ndarray | None
    parts: np.ndarray

    def fold(self, data: TaskData, i: int) -> TaskData:
        """The task with fold i as its validation split and the other folds as its training split."""
        held, kept = self.parts == i, self.parts != i
        splits = {"train": (self.images[kept], self.labels[kept]), "val": (self.images[held], self.labels[held]),
                  "test": data.splits["test"]}
        groups = {"train": self.groups[kept], "val": self.groups[held], "test": data.groups["test"]}
        sources = None if self.sources is None else \
            {"train": self.sources[kept], "val": self.sources[held], "test": data.sources["test"]}
        return replace(data, splits=splits, groups=groups, sources=sources)


def strata(labels: np.ndarray, task: str) -> np.ndarray | None:
    """What folds are stratified by: the first label of a classification task."""
    return None if task == REGRESSION else labels.reshape(len(labels), -1)[:, 0].astype(str)


def make_pool(data: TaskData, folds: int, fraction: float | None, seed: int) -> tuple[Pool, dict]:
    """Train and val together (or `fraction` of their patients, stratified), dealt into `folds` folds."""
    images = np.concatenate([data.splits["train"][0], data.splits["val"][0]])
    labels = np.concatenate([data.splits["train"][1], data.splits["val"][1]])
    groups = np.concatenate([data.groups["train"], data.groups["val"]])
    sources = None if data.sources is None else np.concatenate([data.sources["train"], data.sources["val"]])
    used = {}
    if fraction is not None:
        keep = fraction_of_patients(groups, labels, fraction, seed)
        images, labels, groups = images[keep], labels[keep], groups[keep]
        sources = None if sources is None else sources[keep]
        used = {"train_fraction": fraction, "train_samples_used": int(len(keep)),
                "train_patients_used": int(len(set(groups)))}
    if len(set(groups)) < folds:
        raise UsageError(f"--folds {folds}: only {len(set(groups))} training patients; give fewer folds")
    parts = split_groups(groups, strata(labels, data.task), (1,) * folds, seed)
    return Pool(images, labels, groups, sources, parts), used


def pooled(values: list[np.ndarray], pool: Pool) -> np.ndarray:
    """Fold i's predictions on its own patients, put back in the pool's order."""
    out = np.zeros((len(pool.parts), values[0].shape[1]), dtype=np.float64)
    for i, scores in enumerate(values):
        out[pool.parts == i] = scores
    return out


def floor_through_folds(data: TaskData, pool: Pool, folds: int, seed: int) -> tuple[dict | None, dict]:
    """The PCA + logistic regression floor cross-validated like the image models: its pooled out-of-fold AUC and
    its fold ensemble's test AUC, with its scores; and each split's majority share."""
    shares = {"val_majority_share": majority_share(pool.labels), "test_majority_share":
              majority_share(data.splits["test"][1])}
    if data.task == REGRESSION:
        return None, shares
    found = [image_floor_scores(pool.fold(data, i).splits["train"], pool.fold(data, i).splits["val"],
                                data.splits["test"], data.task, len(data.class_names), seed) for i in range(folds)]
    if any(f is None for f in found):
        return None, shares
    oof = pooled([f[1] for f in found], pool)
    test = np.mean([f[2] for f in found], axis=0)
    oof_auc, oof_acc = auc_and_acc(pool.labels, oof, data.task)
    test_auc, test_acc = auc_and_acc(data.splits["test"][1], test, data.task)
    floor = {"method": found[0][0]["method"], "val_auc": oof_auc, "val_acc": oof_acc, "test_auc": test_auc,
             "test_acc": test_acc, "test_at_prior": stays_at_prior(test, data.task),
             "chosen_per_fold": [f[0]["chosen"] for f in found], "val_is": "pooled out-of-fold",
             "scores": {"val": oof, "test": test}}
    return floor, shares


@dataclass
class CandidateFolds:
    """One candidate trained on every fold: its record, the fold models' folders and their predictions."""
    record: dict
    folders: list[Path]
    oof: np.ndarray
    test: list[np.ndarray]
    trainers: list
    augment_report: dict
    run: FinetuneRun


def train_folds(candidate, run: FinetuneRun, data: TaskData, pool: Pool, folds: int, dist_info: DistInfo,
                profile: DataProfile, output_dir: Path, flags: dict, floor_auc: float | None,
                say: Callable) -> CandidateFolds:
    """`candidate` trained K times, fold i's model on the other folds, stopped early and its epoch chosen on fold i;
    judged on the pooled out-of-fold predictions."""
    candidate_run = candidate.apply(run)
    folders, val_scores, test_scores, trainers, selections = [], [], [], [], []
    for i in range(folds):
        say(f"candidate {candidate.name}: fold {i + 1} of {folds}")
        fold_data = pool.fold(data, i)
        folder = output_dir / FOLDS_FOLDER / candidate.name / f"fold_{i}"
        folder.mkdir(parents=True, exist_ok=True)
        trainer, _, selection, augment_report = train_candidate(candidate_run, fold_data, fold_data.splits["train"],
                                                                dist_info, profile, folder, flags, say)
        folders.append(folder)
        val_scores.append(trainer.scores("val"))
        test_scores.append(trainer.scores("test"))  # read now, used only once this candidate is chosen
        trainers.append(trainer)
        selections.append(selection)
    oof = pooled(val_scores, pool)
    score = selection_score(pool.labels, oof, data.task)
    record = {"name": candidate.name, "lr": candidate.lr, "augment": candidate.augment, "val_score": score,
              "val_is": "pooled out-of-fold", "collapsed": all(s["collapsed"] for s in selections),
              "val_at_prior": stays_at_prior(oof, data.task), "val_floor_auc": floor_auc,
              "fold_best_epochs": [s["best_epoch"] for s in selections],
              "fold_epochs_run": [s["epochs_run"] for s in selections],
              "fold_val_scores": [next(v for k, v in s.items() if k in ("best_val_auc", "best_val_r2"))
                                  for s in selections]}
    return CandidateFolds(record, folders, oof, test_scores, trainers, augment_report, candidate_run)


def cross_validate(run: FinetuneRun, data: TaskData, dist_info: DistInfo, output_dir: Path, profile: DataProfile,
                   flags: dict, folds: int, say: Callable) -> dict:
    """Every candidate through the folds, the choice on the pooled out-of-fold predictions, the chosen candidate's
    fold models written as one ensemble. What the run reports (its scores are written by the caller)."""
    seed = run.training.seed
    pool, used = make_pool(data, folds, run.train_fraction, seed)
    say(f"cross-validation: {len(set(pool.groups))} training patients ({len(pool.labels)} samples) in {folds} folds "
        f"by patient, stratified by label; test {len(data.splits['test'][0])} samples, read once by the final model")
    floor, shares = floor_through_folds(data, pool, folds, seed)
    floor_auc = floor["val_auc"] if floor else None
    todo = candidates(run, run.augmentation(profile)[1]["preset"])
    tried, best = [], None
    for candidate in todo:
        result = train_folds(candidate, run, data, pool, folds, dist_info, profile, output_dir, flags, floor_auc, say)
        tried.append(result)
        say(f"candidate {candidate.name}: pooled out-of-fold score {result.record['val_score']:.4f}"
            f"{f' (PCA floor {floor_auc:.4f})' if floor_auc is not None else ''}")
        if best is None or rank_key(result.record) > rank_key(best.record):
            best = result
        if run.search == "fallback" and clears_validation(result.record):
            break
    return {"pool": pool, "used": used, "floor": floor, "shares": shares, "tried": tried, "chosen": best}


def write_final_model(output_dir: Path, chosen: CandidateFolds, dist_info: DistInfo) -> Path:
    """OUTPUT_DIR/final_model: the chosen candidate's fold models as one ensemble (models.ensemble)."""
    folder = output_dir / FINAL_MODEL
    if dist_info.is_main:
        with building(folder) as staging:  # built beside, swapped in whole: util/folder_swap.py
            write_ensemble(staging, [f / "best.pth" for f in chosen.folders], {"chosen": chosen.record["name"]})
    return folder


def below_floor(records: list[dict], floor_auc: float | None) -> bool:
    """No candidate reached the floor on the pooled out-of-fold predictions."""
    if floor_auc is None:
        return False
    return not any(np.isfinite(r["val_score"]) and r["val_score"] >= floor_auc for r in records)
