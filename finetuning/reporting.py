"""What a fine-tuning run writes about its model: metrics and scores per split, the medmnist Evaluator's
CSVs on MedMNIST's own splits, figures, explanations, results.json, and the summary over seeds."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from medmnist import Evaluator

from volmae.datasets.stored import to_unit_float
from volmae.datasets.task_data import TaskData
from volmae.util.explain import explain_predictions
from volmae.util.metrics import REGRESSION, classification_metrics, confusion, regression_metrics, stays_at_prior
from volmae.util.plotting import confusion_figure, plt, roc_figure

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
    table.to_csv(output_dir / f"{split}_scores.csv", index_label="index")
    if data.medmnist is not None:
        spec = data.medmnist
        evaluator = Evaluator(spec.flag, split, size=spec.size, root=spec.root)
        official = evaluator.evaluate(scores, save_folder=str(output_dir), run=f"seed{seed}")
        metrics["evaluator"] = {"auc": float(official.AUC), "acc": float(official.ACC)}
    if split == "test" and data.task != REGRESSION:
        matrix = confusion(labels, scores, data.task, len(data.class_names))
        if matrix is not None:
            figure = confusion_figure(matrix, data.class_names, f"{data.data.get('flag', 'test')} test")
            figure.savefig(output_dir / "confusion_matrix.png", dpi=120)
            plt.close(figure)
        figure = roc_figure(labels, scores, data.task, data.class_names, "test")
        figure.savefig(output_dir / "roc_curve.png", dpi=120)
        plt.close(figure)
    return metrics


def write_explanations(output_dir: Path, model: torch.nn.Module, data: TaskData, scores: np.ndarray, count: int) -> None:
    """Explanations of the first `count` test samples, for the class each was predicted: explain/testNNN*."""
    images = torch.from_numpy(to_unit_float(data.splits["test"][0][:count]))
    explain_predictions(model.cpu(), images, scores[:count], data.task, data.class_names,
                        output_dir / "explain", [f"test{i:03d}" for i in range(len(images))])


def write_results(output_dir: Path, result: dict) -> None:
    (output_dir / "results.json").write_text(json.dumps(result, indent=2))


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
    return summary
