"""Classification metrics exactly as the medmnist Evaluator computes them, plus per-class figures.

ACC and AUC come from medmnist's own getACC/getAUC (the functions its Evaluator calls), so our
numbers are the benchmark's. Scores follow the Evaluator's convention: softmax probabilities
(binary tasks: the last column is the positive class) or sigmoids for multi-label tasks.
"""
import numpy as np
import torch
from medmnist.evaluator import getACC, getAUC
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

MULTI_LABEL = "multi-label, binary-class"


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=-1)


def predicted_labels(scores: np.ndarray, task: str) -> np.ndarray:
    """Class index per sample, or a 0/1 row per sample for multi-label tasks (threshold 0.5)."""
    if task == MULTI_LABEL:
        return (scores > 0.5).astype(int)
    return scores.argmax(axis=-1)


def bootstrap_auc_ci(y_true: np.ndarray, scores: np.ndarray, task: str, rounds: int = 1000,
                     seed: int = 0) -> list[float] | None:
    """95% percentile interval of AUC over bootstrap resamples of the samples (None if too few)."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(y_true), len(y_true))
        try:
            values.append(getAUC(y_true[pick], scores[pick], task))
        except ValueError:  # a resample with one class only has no AUC
            continue
    if len(values) < rounds // 2:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: list[str],
                           bootstrap_rounds: int = 1000) -> dict:
    """AUC and ACC (medmnist), per-class precision/recall/F1/support, bootstrap 95% CI of AUC."""
    y_true = np.asarray(y_true)
    auc, acc = float(getAUC(y_true, scores, task)), float(getACC(y_true, scores, task))
    predicted = predicted_labels(scores, task)
    truth = y_true if task == MULTI_LABEL else y_true.reshape(-1)
    labels = None if task == MULTI_LABEL else list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    per_class = {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for name, p, r, f, s in zip(class_names, precision, recall, f1, support)}
    return {"auc": auc, "acc": acc, "auc_ci95": bootstrap_auc_ci(y_true, scores, task, bootstrap_rounds) if bootstrap_rounds else None,
            "per_class": per_class, "n": int(len(y_true))}


def confusion(y_true: np.ndarray, scores: np.ndarray, task: str, num_classes: int) -> np.ndarray | None:
    if task == MULTI_LABEL:
        return None
    return confusion_matrix(np.asarray(y_true).reshape(-1), predicted_labels(scores, task), labels=list(range(num_classes)))
