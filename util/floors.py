"""The floors an image model must clear to be worth its cost, fitted on the same patients it trains on.

`image_floor` is PCA + logistic regression on block-averaged voxels: about ten lines that a reviewer would write
first. On small labelled sets it is often hard to beat (an FDG-PET study nobody here tuned for: AUC 0.93 where the
default fine-tuning sat at chance), so every result carries it. Its settings (components, regularisation) are
chosen on the validation split, as the image models' are; the test split is read once, by the chosen one.
"""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import auc_and_acc, stays_at_prior

FLOOR_CELLS = 16  # voxels are averaged down to at most this many cells per axis (4,096 features in 3D)
COMPONENTS = (8, 32, 128)
INVERSE_REGULARISATION = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
FLOOR_TASKS = ("binary-class", "multi-class")


def block_features(images: np.ndarray, cells: int = FLOOR_CELLS) -> np.ndarray:
    """(N, C, *spatial) arrays of any dtype -> (N, features): each channel averaged to at most `cells` per axis."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))
    pool = F.adaptive_avg_pool3d if x.dim() == 5 else F.adaptive_avg_pool2d
    return pool(x, [min(cells, s) for s in x.shape[2:]]).flatten(1).numpy()


def majority_share(labels: np.ndarray) -> float:
    _, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    return float(counts.max() / counts.sum()) if counts.size else math.nan


def image_floor(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                test: tuple[np.ndarray, np.ndarray] | None, task: str, num_classes: int, seed: int = 0) -> dict | None:
    """PCA + L2 logistic regression on block-averaged voxels, its components and C chosen by validation AUC
    (a candidate whose validation predictions sit at the class prior is never chosen). None for tasks it does not
    cover (multi-label, regression) or when train or val hold one class only."""
    found = image_floor_scores(train, val, test, task, num_classes, seed)
    if found is None:
        return None
    result, _, test_scores = found
    if test_scores is not None:
        result["test_auc"], result["test_acc"] = auc_and_acc(test[1], test_scores, task)
        result["test_at_prior"] = stays_at_prior(test_scores, task)
    return result


def image_floor_scores(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                       test: tuple[np.ndarray, np.ndarray] | None, task: str, num_classes: int,
                       seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray | None] | None:
    """image_floor's choice, with its probabilities on val and test (None without a test split): what a
    cross-validated floor pools and averages (finetuning.cross_validation)."""
    if task not in FLOOR_TASKS:
        return None
    x_train, y_train = block_features(train[0]), np.asarray(train[1]).reshape(-1)
    x_val, y_val = block_features(val[0]), np.asarray(val[1]).reshape(-1)
    if len(np.unique(y_train)) < 2 or len(np.unique(y_val)) < 2:
        return None
    from sklearn.decomposition import PCA  # sklearn imported where used: util/metrics.py says why
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    candidates, best = [], None
    for components in sorted({min(c, len(x_train) - 1, x_train.shape[1]) for c in COMPONENTS}):
        for c in INVERSE_REGULARISATION:
            model = make_pipeline(StandardScaler(), PCA(components, random_state=seed),
                                  LogisticRegression(C=c, max_iter=2000))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(x_train, y_train)
            scores = _scores(model, x_val, num_classes)
            auc, acc = auc_and_acc(val[1], scores, task)
            at_prior = stays_at_prior(scores, task)
            candidates.append({"components": components, "C": c, "val_auc": auc, "val_acc": acc, "val_at_prior": at_prior})
            key = (not at_prior, auc if np.isfinite(auc) else -math.inf, -c)
            if best is None or key > best[0]:
                best = (key, model, candidates[-1], scores)
    _, model, chosen, val_scores = best
    result = {"method": f"PCA + logistic regression on voxels averaged to <= {FLOOR_CELLS} per axis",
              "chosen": {"components": chosen["components"], "C": chosen["C"]}, "val_auc": chosen["val_auc"],
              "val_acc": chosen["val_acc"], "candidates": candidates}
    test_scores = _scores(model, block_features(test[0]), num_classes) if test is not None and len(test[0]) else None
    return result, val_scores, test_scores


def _scores(model, features: np.ndarray, num_classes: int) -> np.ndarray:
    """Probabilities with a column per class, as the image models give (a class absent from training gets 0)."""
    probabilities = model.predict_proba(features)
    classes = model.classes_.astype(int)
    full = np.zeros((len(features), num_classes))
    full[:, classes] = probabilities
    return full
