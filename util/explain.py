"""Visual explanations: attention rollout for ViTs, Grad-CAM for convolutional and hybrid models.

The model says which, and where to read it (models.contract: `explain_method`, `cam_layer` by submodule
name); nothing here knows an architecture.
Every map is upsampled to the input grid and normalised to [0, 1]. Rollout follows Abnar & Zuidema:
per block, the head-averaged attention plus the identity (residual), rows renormalised, multiplied
through the blocks; the class token's row over the patch tokens is the map. timm's blocks use fused
attention, so each block's attention is recomputed from its own input and weights.
"""
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .atomic import atomic_write
from .plotting import plt

METHOD_NAMES = {"rollout": "attention rollout", "grad_cam": "Grad-CAM"}
MONTAGE_SLICES = 36  # evenly spaced axial slices in a montage; every slice of a 28^3 volume
HEAT_OPACITY = 0.45  # the map over the image, drawn where it exceeds HEAT_SHOWN_ABOVE
HEAT_SHOWN_ABOVE = 0.05


def method_for(model: torch.nn.Module) -> str:
    """The model's explanation method (models.contract), as shown in titles."""
    if getattr(model, "explain_method", None) not in METHOD_NAMES:
        raise ValueError(f"{type(model).__name__} does not say how to explain it: it needs explain_method "
                         f"({' or '.join(METHOD_NAMES)}) and cam_layer (docs/contributing.md: Adding a model)")
    return METHOD_NAMES[model.explain_method]


def _attention_probs(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, heads, T, T) attention of a timm Attention module on its input x."""
    n, t, _ = x.shape
    qkv = attn.qkv(x).reshape(n, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


@torch.no_grad()
def attention_rollout(model, x: torch.Tensor) -> torch.Tensor:
    """(N, *patch grid) relevance of each patch for the class token, through the blocks named by cam_layer."""
    captured = []
    hooks = [block.attn.register_forward_hook(lambda module, args, _out: captured.append(_attention_probs(module, args[0])))
             for block in model.get_submodule(model.cam_layer)]
    try:
        model.forward_features(x)
    finally:
        for hook in hooks:
            hook.remove()
    rollout = None
    for probs in captured:
        a = probs.mean(dim=1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0, 1:].reshape(x.shape[0], *model.grid_size)


def grad_cam(model, x: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(N, *map grid): ReLU of the cam_layer maps weighted by their mean gradient for each sample's class."""
    store = {}
    hook = model.get_submodule(model.cam_layer).register_forward_hook(lambda _m, _a, out: store.update(maps=out))
    try:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            logits = model(x)
            maps = store["maps"]
            score = logits.gather(1, classes.view(-1, 1)).sum() if logits.shape[1] > 1 else logits.sum()
            grads, = torch.autograd.grad(score, maps)
    finally:
        hook.remove()
    weights = grads.mean(dim=tuple(range(2, grads.dim())), keepdim=True)
    cam = F.relu((weights * maps).sum(dim=1)).detach()
    if cam.shape[0] != x.shape[0]:  # a 2D backbone over the slices of each volume: (N*S, h, w) -> (N, S, h, w)
        cam = cam.reshape(x.shape[0], cam.shape[0] // x.shape[0], *cam.shape[1:])
    return cam


def explain(model, x: torch.Tensor, classes: torch.Tensor) -> np.ndarray:
    """(N, *input grid) maps in [0, 1] for each sample's class; for an ensemble of fold models (one that lists its
    `members`), the mean of its members' maps, put back in [0, 1]."""
    model.eval()
    if isinstance(getattr(model, "members", None), torch.nn.ModuleList):
        mean = np.mean([explain(member, x, classes) for member in model.members], axis=0)
        flat = mean.reshape(mean.shape[0], -1)
        low, high = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
        return ((flat - low) / np.maximum(high - low, 1e-12)).reshape(mean.shape)
    if method_for(model) == METHOD_NAMES["rollout"]:
        maps = attention_rollout(model, x)
    else:
        maps = grad_cam(model, x, classes)
    grid = tuple(x.shape[2:])
    if tuple(maps.shape[1:]) != grid:
        mode = "trilinear" if len(grid) == 3 else "bilinear"
        maps = F.interpolate(maps[:, None].float(), size=grid, mode=mode, align_corners=False)[:, 0]
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.min(dim=1, keepdim=True).values, flat.max(dim=1, keepdim=True).values
    return ((flat - low) / (high - low).clamp_min(1e-12)).reshape(maps.shape).cpu().numpy()


def mass_share(heat: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's total mass that falls inside `region` (a boolean mask)."""
    return float(heat[region].sum() / max(heat.sum(), 1e-12))


def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.imshow(heat, cmap="jet", alpha=HEAT_OPACITY * (heat > HEAT_SHOWN_ABOVE), vmin=0, vmax=1, interpolation="bilinear")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def save_explanation(folder: Path, name: str, volume: np.ndarray, heat: np.ndarray, title: str) -> list[Path]:
    """`name`.npy and .nii.gz (the map on the input grid), `name`_overlay.png (middle slices) and, for
    volumes, `name`_montage.png (up to MONTAGE_SLICES evenly spaced axial slices with the map)."""
    from .plotting import middle_slices

    folder.mkdir(parents=True, exist_ok=True)
    image = volume[0]
    paths = [folder / f"{name}.npy", folder / f"{name}.nii.gz", folder / f"{name}_overlay.png"]
    atomic_write(paths[0], lambda tmp: np.save(tmp, heat.astype(np.float32)))
    atomic_write(paths[1], lambda tmp: sitk.WriteImage(sitk.GetImageFromArray(heat.astype(np.float32)), str(tmp)))
    if image.ndim == 3:
        views, maps = middle_slices(image), middle_slices(heat)
    else:
        views, maps = {"image": image}, {"image": heat}
    fig, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 3.4), squeeze=False)
    for ax, view in zip(axes[0], views):
        _overlay(ax, views[view], maps[view], view)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(paths[2], lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    if image.ndim == 3:
        paths.append(folder / f"{name}_montage.png")
        _save_montage(paths[-1], image, heat, title)
    return paths


def _save_montage(path: Path, image: np.ndarray, heat: np.ndarray, title: str) -> None:
    """Up to MONTAGE_SLICES evenly spaced axial slices with the map, tiled into one RGB mosaic (blended as
    `_overlay` blends) on a single axes: an axes per slice cost about a second per case in matplotlib."""
    chosen = np.unique(np.linspace(0, image.shape[0] - 1, min(image.shape[0], MONTAGE_SLICES)).round().astype(int))
    columns = int(np.ceil(np.sqrt(len(chosen))))
    rows = int(np.ceil(len(chosen) / columns))
    height, width = image.shape[1:]
    step_y, step_x = height + 1, width + 1  # a white line between tiles
    mosaic = np.ones((rows * step_y - 1, columns * step_x - 1, 3), dtype=np.float32)
    for tile, index in enumerate(chosen):
        top, left = (tile // columns) * step_y, (tile % columns) * step_x
        mosaic[top:top + height, left:left + width] = _blend(image[index], heat[index])
    fig, ax = plt.subplots(figsize=(1.6 * columns, 1.6 * rows + 0.4))
    ax.imshow(mosaic, interpolation="nearest")
    for tile, index in enumerate(chosen):
        ax.text((tile % columns) * step_x + 0.5, (tile // columns) * step_y + 0.5, str(index), color="yellow",
                fontsize=7, va="top", ha="left")
    ax.set_title(f"{title}: axial slices", fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90))
    plt.close(fig)


def _blend(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """(H, W, 3): the slice in grey with the map in jet, as `_overlay` draws them."""
    grey = np.repeat(np.clip(image, 0, 1)[..., None], 3, axis=-1)
    colour = plt.get_cmap("jet")(np.clip(heat, 0, 1))[..., :3]
    alpha = (HEAT_OPACITY * (heat > HEAT_SHOWN_ABOVE))[..., None]
    return (1 - alpha) * grey + alpha * colour


def explain_predictions(model, x: torch.Tensor, scores: np.ndarray, task: str, class_names: list[str],
                        folder: Path, names: list[str]) -> list[Path]:
    """Explain and save each sample's predicted class (the first output for regression), as `names`;
    returns the overlay paths."""
    from .metrics import REGRESSION

    predicted = np.zeros(len(x), dtype=np.int64) if task == REGRESSION else scores.argmax(axis=1)
    heat = explain(model.float(), x.float(), torch.from_numpy(predicted).to(x.device))
    method = method_for(model)
    return [save_explanation(folder, name, x[i].cpu().numpy(), heat[i],
                             f"{name}: predicted {class_names[label]} ({method})")[2]
            for i, (name, label) in enumerate(zip(names, predicted))]
