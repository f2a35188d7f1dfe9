"""Figures people look at rather than read: middle slices of volumes."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Volumes are (D, H, W) in the canonical LPS orientation (see volumes/orientation.py): D runs
# inferior->superior, H anterior->posterior, W right->left. Axial slices are shown as stored
# (radiological view); coronal and sagittal ones are flipped so that superior is up.


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


def label_efficiency_figure(result: dict) -> plt.Figure:
    """The volumes recipe's report: test AUC of each arm's final model (the fold ensemble; bars: the spread of its
    fold models' own test AUCs) and of the floors against the fraction of labelled training patients, then the
    pretraining curves (training and held-out reconstruction loss, frozen-feature probe AUCs) of every seed, then
    the paired MAE - scratch difference with its two-level interval."""
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    fractions = sorted(result["fractions"], key=float)
    x = [float(f) for f in fractions]
    styles = {"mae": ("MAE-pretrained", "tab:blue"), "scratch": ("from scratch", "tab:orange")}
    ax = axes[0]
    for init, (name, colour) in styles.items():
        if init in result["fractions"][fractions[0]]:
            mean = [result["fractions"][f][init]["test_auc_mean"] for f in fractions]
            std = [result["fractions"][f][init]["test_auc_std"] for f in fractions]
            ax.errorbar(x, mean, yerr=std, marker="o", capsize=4, color=colour, label=name)
    if "floor" in result["fractions"][fractions[0]]:
        floor = [result["fractions"][f]["floor"] for f in fractions]
        ax.errorbar(x, [f["test_auc_mean"] for f in floor], yerr=[f["test_auc_std"] for f in floor], marker="s",
                    capsize=4, color="grey", linestyle="--", label=f"{floor[0]['column']} alone")
    if result["fractions"][fractions[0]].get("pca_floor"):
        pca = [result["fractions"][f]["pca_floor"] for f in fractions]
        ax.errorbar(x, [f["test_auc_mean"] for f in pca], yerr=[f["test_auc_std"] for f in pca], marker="^",
                    capsize=4, color="tab:green", linestyle=":", label="PCA + LR on voxels")
    patients = [result["fractions"][f]["train_patients"] for f in fractions]
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{v:g}\n({p} pat.)" for v, p in zip(x, patients)])
    ax.minorticks_off()
    ax.axhline(0.5, color="black", linewidth=0.5, linestyle=":")
    ax.set_xlabel("fraction of the training patients labelled")
    ax.set_ylabel("test AUC (final model; bars: fold models)")
    ax.set_title("label efficiency")
    ax.legend(fontsize="small", loc="lower right")
    for seed, run in result["pretrain"]["per_seed"].items():
        train = [r for r in run["curve"] if r.get("loss") is not None]
        held = [r for r in run["curve"] if r.get("val_loss") is not None]
        line, = axes[1].plot([r["epoch"] for r in train], [r["loss"] for r in train], label=f"seed {seed} train")
        if held:
            axes[1].plot([r["epoch"] for r in held], [r["val_loss"] for r in held], linestyle="--", marker=".",
                         color=line.get_color(), label=f"seed {seed} held out")
        if run["probe"]:
            axes[2].plot([r["epoch"] for r in run["probe"]], [r["probe_knn_auc"] for r in run["probe"]], marker=".",
                         color=line.get_color(), label=f"seed {seed} kNN")
            axes[2].plot([r["epoch"] for r in run["probe"]], [r["probe_linear_auc"] for r in run["probe"]],
                         marker="x", linestyle="--", color=line.get_color(), label=f"seed {seed} linear")
    axes[1].set_xlabel("pretraining epoch")
    axes[1].set_ylabel("masked reconstruction loss")
    axes[1].set_title("MAE pretraining")
    axes[1].legend(fontsize="x-small")
    axes[2].set_xlabel("pretraining epoch")
    axes[2].set_ylabel("val AUC of the frozen encoder")
    axes[2].set_title("probes (frozen features)")
    if axes[2].lines:
        axes[2].legend(fontsize="x-small")
    paired = [(v, result["fractions"][f]["paired"]) for v, f in zip(x, fractions) if "paired" in result["fractions"][f]]
    if paired:
        ax = axes[3]
        for v, entry in paired:
            low, high = entry["ci95"]
            ax.errorbar([v], [entry["difference"]], yerr=[[entry["difference"] - low], [high - entry["difference"]]],
                        marker="o", capsize=4, color="tab:blue")
        ax.axhline(0, color="black", linewidth=0.5)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:g}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the training patients labelled")
        ax.set_ylabel("test AUC, MAE - scratch")
        ax.set_title(f"paired difference, two-level 95% CI ({paired[0][1]['units']} folds and the test patients "
                     f"resampled)", fontsize="small")
    else:
        axes[3].axis("off")
    fig.tight_layout()
    return fig
