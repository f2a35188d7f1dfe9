"""Figures people look at rather than read: middle slices of volumes."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Volumes are (D, H, W) in the canonical LPS orientation (see datasets/orientation.py): D runs
# inferior->superior, H anterior->posterior, W right->left. Axial slices are shown as stored
# (radiological view); coronal and sagittal ones are flipped so that superior is up.
VIEWS = ("axial", "coronal", "sagittal")


def middle_slices(volume: np.ndarray) -> dict[str, np.ndarray]:
    """The three middle slices of a (D, H, W) volume, oriented for display."""
    d, h, w = volume.shape
    return {
        "axial": volume[d // 2],
        "coronal": np.flipud(volume[:, h // 2, :]),
        "sagittal": np.flipud(volume[:, :, w // 2]),
    }


def slice_grid(rows: dict[str, np.ndarray], title: str = "", vmin: float = 0.0, vmax: float = 1.0) -> plt.Figure:
    """One row per named volume (D, H, W) or image (H, W), one column per view."""
    ncols = 3 if next(iter(rows.values())).ndim == 3 else 1
    fig, axes = plt.subplots(len(rows), ncols, figsize=(3 * ncols, 3 * len(rows)), squeeze=False)
    for r, (name, volume) in enumerate(rows.items()):
        views = middle_slices(volume) if volume.ndim == 3 else {"image": volume}
        for c, (view, image) in enumerate(views.items()):
            ax = axes[r, c]
            ax.imshow(image, cmap="gray", vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(view)
            if c == 0:
                ax.set_ylabel(name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_figure(matrix: np.ndarray, class_names: list[str], title: str = "") -> plt.Figure:
    """Counts, with each row (true class) shaded by its share."""
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(3.5, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", color="white" if shares[i, j] > 0.5 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def roc_figure(y_true: np.ndarray, scores: np.ndarray, task: str, class_names: list[str], title: str = "") -> plt.Figure:
    """ROC curves: the positive class for binary tasks, one-vs-rest per class (or label) otherwise."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y_true = np.asarray(y_true)
    if task == "binary-class":
        curves = [(class_names[-1], y_true.reshape(-1) == 1, scores[:, -1])]
    elif task == "multi-label, binary-class":
        curves = [(name, y_true[:, i] == 1, scores[:, i]) for i, name in enumerate(class_names)]
    else:
        curves = [(name, y_true.reshape(-1) == i, scores[:, i]) for i, name in enumerate(class_names)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, positive, score in curves:
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, score):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize="small", loc="lower right")
    fig.tight_layout()
    return fig
