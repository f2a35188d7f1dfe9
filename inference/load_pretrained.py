"""Initialise a classifier from a pretraining checkpoint, its encoder.pth, or a TANGERINE checkpoint.

Decoder keys and the mask token are dropped; `module.` prefixes (DDP) are removed; the positional
embedding is regenerated for the classifier's grid when it is the fixed sin-cos table (as every MAE
checkpoint's is) and interpolated per axis otherwise. Afterwards the only keys allowed to be missing
are the new head, head_norm and fc_norm; anything else that does not fit is an error naming the keys, never a
silent random initialisation.
"""
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.mae3d import PRETRAINING_ONLY_PREFIXES
from ..models.patch_embed import to_tuple
from ..models.pos_embed import sincos_pos_embed
from ..util.errors import DataError
from .checkpoints import load_checkpoint

DROPPED_PREFIXES = PRETRAINING_ONLY_PREFIXES
NEW_PREFIXES = ("head.", "fc_norm.", "head_norm.")


class CheckpointMismatchError(DataError):
    """A checkpoint whose weights do not fit the model; the message names the keys."""


def state_dict_of(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint dict (under 'model', 'state_dict' or at the top), unprefixed."""
    for key in ("model", "state_dict", "module"):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    weights = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    if not weights:
        raise CheckpointMismatchError("the file holds no weights (no 'model' or 'state_dict' of tensors)")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def source_grid(checkpoint: dict, pos_embed: torch.Tensor, spatial_dims: int) -> tuple[int, ...]:
    """The patch grid the checkpoint was trained on: from its model_config, else a cube/square."""
    config = checkpoint.get("model_config") if isinstance(checkpoint, dict) else None
    if config and "img_size" in config and "patch_size" in config:
        img_size, patch_size = (to_tuple(config[k], spatial_dims, k) for k in ("img_size", "patch_size"))
        return tuple(i // p for i, p in zip(img_size, patch_size))
    tokens = pos_embed.shape[1] - 1
    side = round(tokens ** (1 / spatial_dims))
    if side ** spatial_dims != tokens:
        raise CheckpointMismatchError(f"pos_embed has {tokens} patch tokens and the checkpoint carries no "
                                      f"model_config: cannot tell its {spatial_dims}D grid")
    return (side,) * spatial_dims


def adapt_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """[1, 1 + prod(grid), E] for `new_grid`: sin-cos regenerated exactly, learned tables interpolated per axis."""
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    if torch.allclose(pos_embed[0].float(), sincos_pos_embed(dim, old_grid, cls_token=True), atol=1e-4):
        return sincos_pos_embed(dim, new_grid, cls_token=True)[None].to(pos_embed.dtype)
    patches = pos_embed[:, 1:].reshape(1, *old_grid, dim).movedim(-1, 1).float()
    mode = "trilinear" if len(old_grid) == 3 else "bicubic"
    patches = F.interpolate(patches, size=new_grid, mode=mode, align_corners=False)
    patches = patches.movedim(1, -1).reshape(1, math.prod(new_grid), dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches], dim=1)


def load_encoder(model: torch.nn.Module, path: str | Path) -> dict:
    """Load pretrained encoder weights into a VisionTransformer classifier; returns what was done."""
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise CheckpointMismatchError(f"{path}: no such file") from None
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise CheckpointMismatchError(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from None
    weights = state_dict_of(checkpoint)
    dropped = sorted(k for k in weights if k.startswith(DROPPED_PREFIXES))
    weights = {k: v for k, v in weights.items() if not k.startswith(DROPPED_PREFIXES)}
    target = model.state_dict()
    if "norm.weight" not in target:  # mean pooling uses fc_norm; the encoder's final norm goes unused
        dropped += sorted(k for k in weights if k.startswith("norm."))
        weights = {k: v for k, v in weights.items() if not k.startswith("norm.")}
    grids = None
    if "pos_embed" in weights and "pos_embed" in target:
        old_grid = source_grid(checkpoint, weights["pos_embed"], model.spatial_dims)
        weights["pos_embed"] = adapt_pos_embed(weights["pos_embed"], old_grid, model.grid_size)
        grids = [list(old_grid), list(model.grid_size)]
    replaced = sorted(k for k in weights if k.startswith(NEW_PREFIXES) and k in target
                      and weights[k].shape != target[k].shape)  # e.g. another number of classes
    weights = {k: v for k, v in weights.items() if k not in replaced}
    wrong_shape = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(target[k].shape)}"
                   for k, v in weights.items() if k in target and v.shape != target[k].shape]
    if wrong_shape:
        raise CheckpointMismatchError(f"{path} does not fit this model; mismatching shapes: " + "; ".join(wrong_shape))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    not_new = [k for k in missing if not k.startswith(NEW_PREFIXES)]
    if not_new or unexpected:
        problems = []
        if not_new:
            problems.append(f"missing from the checkpoint: {', '.join(not_new[:12])}{' ...' if len(not_new) > 12 else ''}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected[:12])}{' ...' if len(unexpected) > 12 else ''}")
        raise CheckpointMismatchError(f"{path} does not fit this model ({'; '.join(problems)})")
    return {"loaded": len(weights), "new": sorted(missing), "dropped": dropped + replaced, "pos_embed_grids": grids}
