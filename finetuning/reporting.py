"""What a fine-tuning run writes about its model: metrics and scores per split, the medmnist Evaluator's
CSVs on MedMNIST's own splits, figures, explanations, results.json, and the summary over seeds."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..datasets.data_profile import DataProfile
from ..datasets.task_data import TaskData
from ..util.atomic import atomic_write
from ..util.explain import explain_predictions
from ..util.floors import image_floor, majority_share
from ..util.metrics import (
    REGRESSION,
    accuracy_at,
    classification_metrics,
    confusion,
    regression_metrics,
    stays_at_prior,
    youden_threshold,
)
from ..util.plotting import confusion_figure, plt, roc_figure
from ..util.strict_json import write_json
from ..volumes.stored import to_unit_float
from .finetune_config import FinetuneRun

RESULTS_FILE = "results.json"  # written last: a folder that has it holds a finished run
HEADLINE = {False: ("auc", "acc"), True: ("r2", "pearson")}


def write_split_outputs(output_dir: Path, split: str, data: TaskData, labels: np.ndarray, scores: np.ndarray,
                        seed: int, bootstrap: int) -> dict:
    """Metrics and scores; on MedMNIST's own splits also the Evaluator's CSV (and its numbers, as a check);
    for test, the confusion matrix and ROC figures."""
    if data.task == REGRESSION:
        metrics = regression_metrics(labels, scores, data.class_names)
    else:
        metrics = classification_metrics(labels, scores, data.task, data.class_names, bootstrap)
        metrics["at_prior"] = stays_at_prior(scores, data.task)
    table = pd.DataFrame(scores, columns=[f"score_{name}" for name in data.class_names])
    for i, column in enumerate(np.asarray(labels).T):
        table.insert(i, f"label_{i}" if labels.shape[1] > 1 else "label", column)
    if data.sources is not None:  # which file each score belongs to
        table.insert(0, "path", data.sources[split])
    atomic_write(output_dir / f"{split}_scores.csv", lambda tmp: table.to_csv(tmp, index_label="index"))
    if data.medmnist is not None:
        spec = data.medmnist
        from medmnist import Evaluator  # imported where used: util/metrics.py says why

        evaluator = Evaluator(spec.flag, split, size=spec.size, root=spec.root)
        official = evaluator.evaluate(scores, save_folder=str(output_dir), run=f"seed{seed}")
        metrics["evaluator"] = {"auc": float(official.AUC), "acc": float(official.ACC)}
    if split == "test" and data.task != REGRESSION:
        matrix = confusion(labels, scores, data.task, len(data.class_names))
        if matrix is not None:
            figure = confusion_figure(matrix, data.class_names, f"{data.data.get('flag', 'test')} test")
            atomic_write(output_dir / "confusion_matrix.png", lambda tmp, f=figure: f.savefig(tmp, dpi=120))
            plt.close(figure)
        figure = roc_figure(labels, scores, data.task, data.class_names, "test")
        atomic_write(output_dir / "roc_curve.png", lambda tmp: figure.savefig(tmp, dpi=120))
        plt.close(figure)
    return metrics


def write_explanations(output_dir: Path, model: torch.nn.Module, data: TaskData, scores: np.ndarray, count: int) -> None:
    """Explanations of the first `count` test samples, for the class each was predicted: explain/testNNN*."""
    images = torch.from_numpy(to_unit_float(data.splits["test"][0][:count]))
    explain_predictions(model.cpu(), images, scores[:count], data.task, data.class_names,
                        output_dir / "explain", [f"test{i:03d}" for i in range(len(images))])


def write_results(output_dir: Path, result: dict) -> None:
    write_json(output_dir / RESULTS_FILE, result)


def headline(values: dict, regression: bool) -> str:
    """`AUC 0.8123, ACC 0.7900` of one split's metrics; mean +- std where they are a summary over seeds."""
    return ", ".join(f"{m.upper()} {values[m]['mean']:.4f} +- {values[m]['std']:.4f}" if isinstance(values[m], dict)
                     else f"{m.upper()} {values[m]:.4f}" for m in HEADLINE[regression])


def aggregate(results: list[dict], regression: bool) -> dict:
    """Mean, std and values of the headline metrics over seeds, time, and which seeds collapsed."""
    summary = {}
    for split in ("val", "test"):
        summary[split] = {metric: {"mean": float(np.mean([r[split][metric] for r in results])),
                                   "std": float(np.std([r[split][metric] for r in results])),
                                   "values": [r[split][metric] for r in results]} for metric in HEADLINE[regression]}
    for clock in ("seconds", "cpu_seconds"):
        summary[clock] = {"mean": float(np.mean([r[clock] for r in results])),
                          "total": float(np.sum([r[clock] for r in results]))}
    summary["collapsed_seeds"] = [r["seed"] for r in results if r.get("collapsed")]
    summary["collapsed"] = bool(summary["collapsed_seeds"])
    summary["test_at_prior_seeds"] = [r["seed"] for r in results if r.get("test", {}).get("at_prior")]
    for split in ("val", "test"):
        pca = [r["floors"]["pca_logreg"][f"{split}_auc"] for r in results
               if f"{split}_auc" in r.get("floors", {}).get("pca_logreg", {})]
        if pca:
            summary[split]["pca_logreg_floor_auc"] = {"mean": float(np.mean(pca)), "std": float(np.std(pca)), "values": pca}
        at_threshold = [r[f"{split}_acc_at_val_threshold"] for r in results if f"{split}_acc_at_val_threshold" in r]
        if at_threshold:
            summary[split]["acc_at_val_threshold"] = {"mean": float(np.mean(at_threshold)), "std": float(np.std(at_threshold))}
    return summary


def floors(data: TaskData, train: tuple[np.ndarray, np.ndarray], seed: int) -> dict:
    """What an image model must beat, on the same training samples: each split's majority share and the PCA +
    logistic regression floor (util.floors), chosen on validation."""
    if data.task == REGRESSION:
        return {}
    result = {f"{split}_majority_share": majority_share(data.splits[split][1])
              for split in ("val", "test") if len(data.splits[split][0])}
    test = data.splits["test"] if len(data.splits["test"][0]) else None
    image = image_floor(train, data.splits["val"], test, data.task, len(data.class_names), seed)
    if image is not None:
        result["pca_logreg"] = image
    return result


def threshold_report(data: TaskData, scores: dict[str, np.ndarray]) -> dict:
    """Binary tasks: the cut chosen on validation (util.metrics.youden_threshold) and each split's accuracy at it,
    beside the accuracy at 0.5 that uncalibrated scores can make look bad."""
    if data.task != "binary-class" or "val" not in scores:
        return {}
    threshold = youden_threshold(data.splits["val"][1], scores["val"])
    if threshold is None:
        return {}
    return {"val_threshold": threshold, **{f"{split}_acc_at_val_threshold": accuracy_at(data.splits[split][1], scores[split],
                                                                                       threshold) for split in scores}}


def verdict(result: dict, split: str) -> str:
    """Warnings a reader must see beside a score: a collapsed model, one at the class prior, one below a floor."""
    notes = []
    if result.get("collapsed"):
        notes.append("COLLAPSED: its validation predictions never left the class prior")
    elif result.get(split, {}).get("at_prior"):
        notes.append(f"AT THE PRIOR on {split}: one class, or scores that ignore the input")
    floor = result.get("floors", {}).get("pca_logreg", {}).get(f"{split}_auc")
    auc = result.get(split, {}).get("auc")
    if floor is not None and auc is not None and np.isfinite(floor) and auc < floor:
        notes.append(f"BELOW the PCA + logistic regression floor ({split} AUC {floor:.4f})")
    return "; ".join(notes)


def floor_line(result: dict, split: str) -> str:
    """`floors: majority 0.735, PCA + LR AUC 0.912; ACC at the validation threshold 0.812`, where known."""
    parts = []
    found = result.get("floors", {})
    if f"{split}_majority_share" in found:
        parts.append(f"majority share {found[f'{split}_majority_share']:.4f}")
    if f"{split}_auc" in found.get("pca_logreg", {}):
        parts.append(f"PCA + LR AUC {found['pca_logreg'][f'{split}_auc']:.4f}")
    text = f"floors: {', '.join(parts)}" if parts else ""
    if f"{split}_acc_at_val_threshold" in result:
        text += f"{'; ' if text else ''}ACC at the validation-chosen threshold {result[f'{split}_acc_at_val_threshold']:.4f}"
    return text


def describe_run(run: FinetuneRun, data: TaskData, profile: DataProfile, augment_report: dict, precision: str | None,
                 threads: str | None) -> list[str]:
    """What the run is about to do, printed before it does it: data, model, recipe, precision and augmentation."""
    source = data.data.get("flag") or data.data.get("meta")
    splits = ", ".join(f"{k} {len(v[0])}" for k, v in data.splits.items())
    model = run.model
    lines = [f"{run.setup} setup, {source} ({data.task}, {len(data.class_names)} output(s)) at "
             f"{'x'.join(map(str, data.input_size))}: {splits}; model {model.name}"
             f"{' ' + json.dumps(model.architecture) if model.architecture else ''}, recipe {run.recipe}, "
             f"lr {run.training.lr:.2e}, {run.training.epochs} epochs, seeds {list(run.seeds)}"]
    if precision:
        lines.append(f"precision: {precision}{'; threads ' + threads if threads else ''}")
    lines.append(f"training data: {profile.describe()}")
    if model.normalization:
        lines.append(f"input standardisation inside the model: mean {model.normalization['input_mean']:.4f}, std "
                     f"{model.normalization['input_std']:.4f} ({'the encoder' if model.finetune else 'training images'})")
    lines.append(f"augmentation: {augment_report['preset']} ({augment_report['does']})"
                 f"{': ' + augment_report['reason'] if run.augment == 'auto' else ''}")
    return lines


def describe_seeds(summary: dict, regression: bool) -> list[str]:
    """The summary over seeds, with the seeds whose scores are not results named."""
    lines = [f"test over {len(summary['seeds'])} seeds: {headline(summary['test'], regression)}"]
    if "pca_logreg_floor_auc" in summary["test"]:
        lines.append(f"PCA + LR floor over the same seeds: test AUC {summary['test']['pca_logreg_floor_auc']['mean']:.4f}")
    flagged = sorted(set(summary["collapsed_seeds"]) | set(summary["test_at_prior_seeds"]))
    if flagged:
        lines.append(f"WARNING: seeds {flagged} collapsed or sat at the class prior: their scores are not results")
    return lines
