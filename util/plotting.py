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
