"""A cross-validated fine-tuning run (`--folds K`): the candidates through the folds (finetuning.cross_validation),
then what it writes: the final model (OUTPUT_DIR/final_model), the pooled out-of-fold scores as val_scores.csv,
the ensemble's test scores as test_scores.csv (the test split read once), every floor beside them, and
results.json, whose `below_floor` says when no candidate reached the PCA floor on the out-of-fold predictions."""
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..datasets.data_profile import DataProfile
from ..datasets.task_data import TaskData
from ..util.atomic import atomic_write
from ..util.dist import DistInfo
from ..util.metrics import REGRESSION, auc_and_acc
from ..util.run_log import cpu_seconds
from .cross_validation import FINAL_MODEL, CandidateFolds, Pool, below_floor, cross_validate, write_final_model
from .finetune_config import FinetuneRun
from .reporting import floor_line, headline, threshold_report, verdict, write_results, write_split_outputs

STACK_INPUTS = ("the image model's probability", "the PCA floor's probability")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p) - np.log1p(-p)


def stack_screen(pool: Pool, chosen: CandidateFolds, floor: dict | None, test_labels: np.ndarray,
                 test_scores: np.ndarray) -> dict | None:
    """A screen, not the final model: a logistic regression on the logits of the image model and of the PCA floor,
    fitted on the out-of-fold predictions. Its own out-of-fold AUC comes from the same folds (fit on the other
    folds' out-of-fold rows, scored on this fold's), so it is judged as the image model is."""
    if floor is None or chosen.oof.shape[1] != 2:
        return None
    from sklearn.linear_model import LogisticRegression  # imported where used: util/metrics.py says why

    features = np.stack([logit(chosen.oof[:, 1]), logit(floor["scores"]["val"][:, 1])], axis=1)
    target = pool.labels.reshape(-1)
    stacked = np.zeros(len(target))
    for i in np.unique(pool.parts):
        held = pool.parts == i
        model = LogisticRegression().fit(features[~held], target[~held])
        stacked[held] = model.predict_proba(features[held])[:, 1]
    model = LogisticRegression().fit(features, target)
    test_features = np.stack([logit(test_scores[:, 1]), logit(floor["scores"]["test"][:, 1])], axis=1)
    test = model.predict_proba(test_features)[:, 1]
    as_two = lambda p: np.stack([1 - p, p], axis=1)  # noqa: E731 - the two-column form the metrics take
    val_auc, _ = auc_and_acc(pool.labels, as_two(stacked), "binary-class")
    test_auc, _ = auc_and_acc(test_labels, as_two(test), "binary-class")
    return {"inputs": list(STACK_INPUTS), "val_auc": val_auc, "test_auc": test_auc,
            "weights": [float(w) for w in model.coef_[0]], "val_is": "pooled out-of-fold (nested by fold)"}


def run_folds(run: FinetuneRun, data: TaskData, dist_info: DistInfo, output_dir: Path, profile: DataProfile,
              report: dict, flags: dict, folds: int) -> dict:
    """Cross-validate, write the final model and its outputs; the run's results.json record."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    say: Callable = print if dist_info.is_main else (lambda *a, **k: None)
    found = cross_validate(run, data, dist_info, output_dir, profile, flags, folds, say)
    pool, chosen, floor = found["pool"], found["chosen"], found["floor"]
    final = write_final_model(output_dir, chosen, dist_info)
    test_scores = np.mean(chosen.test, axis=0)  # the ensemble: the fold models' mean probability
    records = [t.record for t in found["tried"]]
    floors = dict(found["shares"])
    if floor is not None:
        floors["pca_logreg"] = {k: v for k, v in floor.items() if k != "scores"}
    result = {"setup": run.setup, "data": data.data, "model": run.model.name, "finetune": run.model.finetune,
              "model_config": chosen.trainers[0].classifier.config, "recipe": run.recipe, "seed": run.training.seed,
              "patience": run.training.patience, **report, **found["used"], "folds": folds,
              "fold_patients": [int(len(set(pool.groups[pool.parts == i]))) for i in range(folds)],
              "lr": chosen.run.training.lr, "augment": chosen.augment_report, "floors": floors,
              "search": {"mode": run.search, "chosen": chosen.record["name"], "candidates": records,
                         "judged_on": "pooled out-of-fold predictions of the training patients"},
              "below_floor": below_floor(records, floor["val_auc"] if floor else None),
              "final_model": FINAL_MODEL, "collapsed": chosen.record["collapsed"],
              "best_epoch": chosen.record["fold_best_epochs"]}
    if not dist_info.is_main:
        return result
    pool_view = replace(data, splits={"val": (pool.images, pool.labels), "test": data.splits["test"]},
                        sources=None if data.sources is None else {"val": pool.sources, "test": data.sources["test"]})
    result["val"] = write_split_outputs(output_dir, "val", pool_view, pool.labels, chosen.oof, run.training.seed,
                                        run.bootstrap)
    result["val"]["is"] = "pooled out-of-fold predictions of the chosen candidate's fold models"
    test_labels = data.splits["test"][1]
    if len(test_labels):
        result["test"] = write_split_outputs(output_dir, "test", data, test_labels, test_scores, run.training.seed,
                                             run.bootstrap)
        result["test"]["is"] = f"the ensemble of the {folds} fold models ({FINAL_MODEL}), read once"
        result["test_per_fold"] = [auc_and_acc(test_labels, scores, data.task)[0] if data.task != REGRESSION else None
                                   for scores in chosen.test]
        result.update(threshold_report(pool_view, {"val": chosen.oof, "test": test_scores}))
        stack = stack_screen(pool, chosen, floor, test_labels, test_scores)
        if stack is not None:
            result["stack_screen"] = stack
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
    write_fold_scores(output_dir, chosen, data, pool)
    write_results(output_dir, result)
    shown = "test" if "test" in result else "val"
    if result["below_floor"]:
        say(f"BELOW THE FLOOR: no candidate reached the PCA + logistic regression floor on the pooled out-of-fold "
            f"predictions ({floor['val_auc']:.4f}); the final model is the best of them, not a model to prefer to "
            f"the floor")
    say(f"final model {final} (the {folds} fold models of {chosen.record['name']}): {shown} "
        f"{headline(result[shown], data.task == REGRESSION)}; pooled out-of-fold score "
        f"{chosen.record['val_score']:.4f}, in {result['seconds']} s")
    for line in (floor_line(result, shown), verdict(result, shown)):
        if line:
            say(line)
    return result


def write_fold_scores(output_dir: Path, chosen: CandidateFolds, data: TaskData, pool: Pool) -> None:
    """Each fold model's test scores (fold<i>_test_scores.csv, in the order of test_scores.csv): what a study's
    two-level interval resamples; and folds.csv, the fold of each training sample (in the order of
    val_scores.csv), so that other models (a one-column floor) go through the same folds."""
    folds = pd.DataFrame({"path": pool.sources if pool.sources is not None else np.arange(len(pool.parts)),
                          "patient": pool.groups, "fold": pool.parts})
    atomic_write(output_dir / "folds.csv", lambda tmp: folds.to_csv(tmp, index=False))
    for i, scores in enumerate(chosen.test):
        table = pd.DataFrame(scores, columns=[f"score_{name}" for name in data.class_names])
        atomic_write(output_dir / f"fold{i}_test_scores.csv", lambda tmp, t=table: t.to_csv(tmp, index_label="index"))
