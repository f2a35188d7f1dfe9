"""Classification metrics exactly as the medmnist Evaluator computes them, plus per-class figures.

ACC and AUC come from medmnist's own getACC/getAUC (the functions its Evaluator calls), so our
numbers are the benchmark's. Scores follow the Evaluator's convention: softmax probabilities
(binary tasks: the last column is the positive class) or sigmoids for multi-label tasks.

medmnist and sklearn are imported where a metric is computed: importing either costs a second or more, which
every command would pay at its start, --help and one-line refusals included.
"""
import math
import warnings

import numpy as np
import torch

MULTI_LABEL = "multi-label, binary-class"


REGRESSION = "regression"


def scores_from_logits(logits: torch.Tensor, task: str) -> torch.Tensor:
    """Probabilities (softmax; sigmoid for multi-label), or the outputs themselves for regression."""
    if task == REGRESSION:
        return logits
    return torch.sigmoid(logits) if task == MULTI_LABEL else torch.softmax(logits, dim=-1)


def auc_and_acc(y_true: np.ndarray, scores: np.ndarray, task: str) -> tuple[float, float]:
    """medmnist's getAUC/getACC; AUC is NaN where undefined (one sample, or one class only)."""
    if len(y_true) < 2:
        truth = y_true if task == MULTI_LABEL else y_true.reshape(-1)
        return math.nan, float(np.mean(predicted_labels(scores, task) == truth))
    from medmnist.evaluator import getACC, getAUC

    try:
        auc = float(getAUC(y_true, scores, task))
    except ValueError:
        auc = math.nan
    return auc, float(getACC(y_true, scores, task))


def selection_score(y_true: np.ndarray, scores: np.ndarray, task: str) -> float:
    """What picks the best epoch: AUC, or R2 for regression."""
    if task == REGRESSION:
        from sklearn.metrics import r2_score

        return float(r2_score(y_true, scores)) if len(y_true) > 1 else math.nan
    return auc_and_acc(y_true, scores, task)[0]


def predicted_labels(scores: np.ndarray, task: str) -> np.ndarray:
    """Class index per sample, or a 0/1 row per sample for multi-label tasks (threshold 0.5)."""
    if task == MULTI_LABEL:
        return (scores > 0.5).astype(int)
    return scores.argmax(axis=-1)


# Scores whose spread over the samples stays below this carry no information about the input.
CONSTANT_SCORE_SPREAD = 1e-3


def stays_at_prior(scores: np.ndarray, task: str) -> bool:
    """True when the predictions do not depend on the input: every sample gets the same predicted class (for
    multi-label: the same decision on every label), or the scores are nearly constant (what an untrained or
    collapsed model outputs). Such a model's AUC comes from tiny differences and is noise, not a result."""
    if task == REGRESSION or len(scores) < 2:
        return False
    predicted = predicted_labels(scores, task)
    return bool((predicted == predicted[:1]).all()) or float(np.std(scores, axis=0).max()) < CONSTANT_SCORE_SPREAD


def bootstrap_auc_ci(y_true: np.ndarray, scores: np.ndarray, task: str, rounds: int = 1000,
                     seed: int = 0) -> list[float] | None:
    """95% percentile interval of AUC over bootstrap resamples of the samples (None if too few)."""
    from medmnist.evaluator import getAUC
    from sklearn.exceptions import UndefinedMetricWarning

    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(y_true), len(y_true))
        if task != MULTI_LABEL and len(np.unique(y_true[pick])) < 2:
            continue  # a resample with one class only has no AUC (sklearn would warn and give NaN)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            try:
                value = getAUC(y_true[pick], scores[pick], task)
            except ValueError:
                continue
        if np.isfinite(value):
            values.append(value)
    if len(values) < rounds // 2:
        return None
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def classification_metrics(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: list[str],
                           bootstrap_rounds: int = 1000) -> dict:
    """AUC and ACC (medmnist), per-class precision/recall/F1/support, bootstrap 95% CI of AUC."""
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.asarray(y_true)
    auc, acc = auc_and_acc(y_true, scores, task)
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
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(np.asarray(y_true).reshape(-1), predicted_labels(scores, task), labels=list(range(num_classes)))


def regression_metrics(y_true: np.ndarray, predicted: np.ndarray, names: list[str]) -> dict:
    """R2 and Pearson r per target (and their means), mean absolute error."""
    from sklearn.metrics import r2_score

    y_true, predicted = np.asarray(y_true, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    per_target = {}
    for i, name in enumerate(names):
        varied = len(y_true) > 1 and np.std(predicted[:, i]) > 0 and np.std(y_true[:, i]) > 0
        pearson = float(np.corrcoef(y_true[:, i], predicted[:, i])[0, 1]) if varied else math.nan
        r2 = float(r2_score(y_true[:, i], predicted[:, i])) if len(y_true) > 1 else math.nan
        per_target[name] = {"r2": r2, "pearson": pearson,
                            "mae": float(np.abs(y_true[:, i] - predicted[:, i]).mean())}
    return {"r2": float(np.mean([t["r2"] for t in per_target.values()])),
            "pearson": float(np.mean([t["pearson"] for t in per_target.values()])),
            "mae": float(np.mean([t["mae"] for t in per_target.values()])), "per_target": per_target,
            "n": int(len(y_true))}


def one_feature_scores(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                       classes: np.ndarray) -> np.ndarray:
    """Probabilities, a column per class of `classes`, of a logistic regression on one number per sample (e.g. a
    measured diameter); multinomial with more than two classes; a class absent from training gets 0."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression().fit(np.asarray(train_x, dtype=np.float64).reshape(-1, 1), np.asarray(train_y).reshape(-1))
    found = model.predict_proba(np.asarray(test_x, dtype=np.float64).reshape(-1, 1))
    scores = np.zeros((len(found), len(classes)))
    for k, name in enumerate(model.classes_):
        scores[:, list(classes).index(name)] = found[:, k]
    return scores


def one_vs_rest_auc(y: np.ndarray, scores: np.ndarray, classes: np.ndarray) -> float:
    """AUC as the image models are scored: for two classes the second's; with more, the mean one-vs-rest AUC over
    the classes present (the medmnist Evaluator's)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).reshape(-1)
    if len(np.unique(y)) < 2:
        return math.nan
    if len(classes) == 2:
        return float(roc_auc_score(y == classes[1], scores[:, 1]))
    scored = [k for k, name in enumerate(classes) if 0 < np.sum(y == name) < len(y)]
    return float(np.mean([roc_auc_score(y == classes[k], scores[:, k]) for k in scored]))


def one_feature_auc(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    """Test AUC of a logistic regression on one number per sample (e.g. a measured diameter): the floor an image
    model must beat on the same split. With more than two classes, a multinomial regression scored as the image
    models are (the medmnist Evaluator's AUC: the mean one-vs-rest AUC over the classes)."""
    train_y = np.asarray(train_y).reshape(-1)
    if len(np.unique(train_y)) < 2:
        return math.nan
    classes = np.unique(np.concatenate([train_y, np.asarray(test_y).reshape(-1)]))
    return one_vs_rest_auc(test_y, one_feature_scores(train_x, train_y, test_x, classes), classes)


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Binary tasks: the cut on the positive class's score that maximises sensitivity + specificity on these
    samples (the validation split's), for an accuracy that does not assume calibrated scores. None if one class."""
    from sklearn.metrics import roc_curve

    truth = np.asarray(y_true).reshape(-1)
    if len(np.unique(truth)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(truth, scores[:, -1])
    return float(min(1.0, thresholds[int(np.argmax(tpr - fpr))]))


def accuracy_at(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    """Binary accuracy when the positive class is predicted from score >= threshold."""
    return float(np.mean((scores[:, -1] >= threshold).astype(int) == np.asarray(y_true).reshape(-1)))


def _auc(y_true: np.ndarray, scores: np.ndarray, task: str) -> float:
    from medmnist.evaluator import getAUC
    from sklearn.metrics import roc_auc_score

    if task == "binary-class":
        return float(roc_auc_score(y_true.reshape(-1), scores[:, -1]))
    return float(getAUC(y_true, scores, task))


def paired_auc_difference(y_true: np.ndarray, arm_a: list[np.ndarray], arm_b: list[np.ndarray], groups: np.ndarray,
                          task: str = "binary-class", rounds: int = 2000, seed: int = 0) -> dict:
    """AUC(a) - AUC(b) on the same test samples, averaged over seeds (arm_a[i] and arm_b[i] are seed i's scores
    of the two arms), with a 95% percentile interval from resampling test patients (`groups`: a patient's samples
    are drawn together). The trained models are held fixed, so the interval holds the test set's variation only,
    not the seeds': two_level_auc_difference resamples both. `share_above_zero` is the share of resamples in which
    a beats b."""
    y_true, groups = np.asarray(y_true), np.asarray(groups)
    if len(arm_a) != len(arm_b) or not arm_a:
        raise ValueError(f"paired arms need the same number of seeds, got {len(arm_a)} and {len(arm_b)}")
    diff = float(np.mean([_auc(y_true, a, task) - _auc(y_true, b, task) for a, b in zip(arm_a, arm_b)]))
    patients, members = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(members == i) for i in range(len(patients))]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = np.concatenate([rows_of[i] for i in rng.integers(0, len(patients), len(patients))])
        if len(np.unique(y_true[pick].reshape(len(pick), -1)[:, 0] if task == MULTI_LABEL else y_true[pick])) < 2:
            continue
        values.append(np.mean([_auc(y_true[pick], a[pick], task) - _auc(y_true[pick], b[pick], task)
                               for a, b in zip(arm_a, arm_b)]))
    values = np.asarray(values)
    return {"difference": diff, "ci95": [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))],
            "share_above_zero": float(np.mean(values > 0)), "seeds": len(arm_a), "patients": int(len(patients)),
            "samples": int(len(y_true)), "rounds": int(len(values))}


def _patient_rows(groups: np.ndarray) -> list[np.ndarray]:
    patients, members = np.unique(np.asarray(groups), return_inverse=True)
    return [np.flatnonzero(members == i) for i in range(len(patients))]


def _arm_auc(y_true: np.ndarray, units: list[np.ndarray], drawn: np.ndarray, rows: np.ndarray, task: str,
             ensemble: bool) -> float | np.ndarray:
    if ensemble:
        return _auc(y_true[rows], np.mean([units[i][rows] for i in drawn], axis=0), task)
    return np.array([_auc(y_true[rows], units[i][rows], task) for i in drawn])


def two_level_auc_difference(y_true: np.ndarray, arm_a: list[np.ndarray], arm_b: list[np.ndarray], groups: np.ndarray,
                             task: str = "binary-class", ensemble: bool = True, rounds: int = 2000,
                             seed: int = 0) -> dict:
    """AUC(a) - AUC(b) with a 95% interval that counts both sources of variation: which models were trained and
    which patients were tested. arm_a[i] and arm_b[i] are unit i's test scores in each arm (a fold's model, or a
    seed's), trained on the same patients. Each round draws the units with replacement and, within them, the test
    patients with replacement (a patient's samples together). With `ensemble` (a cross-validated study's final
    model is the mean probability of its fold models), each arm is the ensemble of the units drawn; otherwise (one
    model per seed) the units' AUC differences are averaged. Where the units disagree the interval widens, as it
    must; the per-unit differences on all test patients come with it."""
    y_true = np.asarray(y_true)
    if len(arm_a) != len(arm_b) or not arm_a:
        raise ValueError(f"paired arms need the same number of units, got {len(arm_a)} and {len(arm_b)}")
    everyone, units = np.arange(len(y_true)), np.arange(len(arm_a))
    per_unit = [_auc(y_true, a, task) - _auc(y_true, b, task) for a, b in zip(arm_a, arm_b)]
    if ensemble:
        difference = _arm_auc(y_true, arm_a, units, everyone, task, True) - _arm_auc(y_true, arm_b, units, everyone,
                                                                                      task, True)
    else:
        difference = float(np.mean(per_unit))
    rows_of = _patient_rows(groups)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        drawn = rng.integers(0, len(units), len(units))
        rows = np.concatenate([rows_of[i] for i in rng.integers(0, len(rows_of), len(rows_of))])
        first = y_true[rows].reshape(len(rows), -1)[:, 0]
        if len(np.unique(first)) < 2:
            continue
        a = _arm_auc(y_true, arm_a, drawn, rows, task, ensemble)
        b = _arm_auc(y_true, arm_b, drawn, rows, task, ensemble)
        values.append(float(np.mean(a - b)))
    values = np.asarray(values)
    return {"difference": float(difference), "ci95": [float(np.percentile(values, 2.5)),
                                                       float(np.percentile(values, 97.5))],
            "share_above_zero": float(np.mean(values > 0)), "per_unit_difference": [float(d) for d in per_unit],
            "units": len(arm_a), "ensemble": ensemble, "patients": len(rows_of), "samples": int(len(y_true)),
            "rounds": int(len(values)), "resampled": "units (folds or seeds) and test patients"}
