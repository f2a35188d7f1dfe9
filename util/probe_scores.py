"""Frozen-feature probes: how well an encoder's features already separate labelled classes.

Two classical read-outs, fitted on the training split's features and scored on the validation
split: a k-nearest-neighbour vote under cosine similarity (k=20, as in DINO's evaluation) and a
logistic regression on standardised features. Scores are AUCs as the medmnist Evaluator defines
them, so they compare with fine-tuning figures. Nothing here trains or touches the encoder.
"""
import numpy as np

from .metrics import MULTI_LABEL, REGRESSION, auc_and_acc

KNN_NEIGHBOURS = 20


def _full_width(probabilities: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """predict_proba columns (only the classes seen in training) placed in a [N, num_classes] array."""
    out = np.zeros((len(probabilities), num_classes))
    out[:, classes.astype(int)] = probabilities
    return out


def _single_label_scores(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray,
                         num_classes: int, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.linear_model import LogisticRegression  # sklearn imported where used: util/metrics.py says why
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    knn = KNeighborsClassifier(n_neighbors=min(neighbours, len(train_x)), metric="cosine").fit(train_x, train_y)
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(train_x, train_y)
    return (_full_width(knn.predict_proba(val_x), knn.classes_, num_classes),
            _full_width(linear.predict_proba(val_x), linear.classes_, num_classes))


def probe_aucs(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, task: str,
               num_classes: int, neighbours: int = KNN_NEIGHBOURS) -> dict[str, float]:
    """{'probe_knn_auc', 'probe_linear_auc'} for features [N, F] and labels [N, k] (medmnist layout)."""
    if task == REGRESSION:
        raise ValueError("the probes score classification tasks, not regression")
    if len(np.unique(train_y)) < 2:
        raise ValueError("the probe's training split holds a single class")
    if task == MULTI_LABEL:
        columns = [_single_label_scores(train_x, train_y[:, j], val_x, 2, neighbours) for j in range(train_y.shape[1])]
        knn = np.stack([c[0][:, 1] for c in columns], axis=1)
        linear = np.stack([c[1][:, 1] for c in columns], axis=1)
    else:
        knn, linear = _single_label_scores(train_x, train_y.reshape(-1), val_x, num_classes, neighbours)
    return {"probe_knn_auc": auc_and_acc(val_y, knn, task)[0], "probe_linear_auc": auc_and_acc(val_y, linear, task)[0]}
