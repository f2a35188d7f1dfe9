"""The pretraining run, resolved once from the flags and the data: every `auto` (model, patch size, input size,
epochs, warmup, lr) replaced by its value. The loop reads the frozen PretrainConfig made from it, and every
checkpoint records the resolved flags, which a resume is checked against."""
import argparse
import math
from argparse import Namespace
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .. import models
from ..models.mae3d import AUTO_DECODER
from ..models.patch_embed import REFERENCE_PATCH, auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..util.cli import grid
from ..util.errors import DataError, UsageError
from ..util.lr_sched import (
    AUTO_PRETRAIN_STEPS,
    auto_epochs,
    auto_warmup_epochs,
    effective_lr,
    optimizer_steps_per_epoch,
)
from ..volumes.cache import is_cache, read_meta

MAE_BLR = 1.5e-4  # MAE's base lr, for its ViTs at large batches
AUTO_BLR = 6e-3  # the recipes' base lr for the small --model auto (docs/results.md)
AUTO_MAE = "mae_vit_tiny_patch16"  # --model auto: its encoder is then shaped by AUTO_ARCHITECTURE
MODEL_FLAGS = ("depth", "stem_channels", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
               "contrast_weight", "contrast_temperature")  # given: they override the named model's


@dataclass(frozen=True)
class PretrainConfig:
    """What the pretraining loop reads, resolved once by main_pretrain (no `auto` left): the loop never writes it."""
    output_dir: str
    seed: int
    epochs: int
    max_steps: int | None
    batch_size: int
    accum_iter: int
    num_workers: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    clip_grad: float | None
    precision: str
    deepspeed: str | None
    mask_ratio: float
    mask_type: str
    log_every: int
    save_every: int
    save_every_steps: int | None
    keep_every: int
    vis_every: int
    val_every: int
    max_bad_steps: int
    max_bad_samples: float

    @classmethod
    def from_flags(cls, flags: Namespace) -> "PretrainConfig":
        return cls(**{f.name: getattr(flags, f.name) for f in fields(cls)})


def check_flags(args: Namespace) -> None:
    """The flags argparse cannot check alone."""
    if not 0.0 <= args.max_bad_samples <= 1.0:
        raise UsageError(f"--max_bad_samples is a share of the epoch, 0..1; got {args.max_bad_samples}")


def resolve_input_size(requested: tuple[int, ...] | str, data_path: str | None) -> tuple[int, ...]:
    """--input_size auto: the grid a cache was built at (so that no volume is cropped or padded again), else 256."""
    if requested != "auto":
        return grid(requested)
    if data_path is not None and is_cache(data_path):
        return cache_grid(data_path)
    return grid((256,))


def cache_grid(data_path: str) -> tuple[int, ...]:
    """The grid a cache's manifest records; a manifest without one is refused with the cache's path."""
    try:
        return grid(tuple(read_meta(Path(data_path))["preprocess"]["size"]))
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"--input_size auto: cannot read the grid of the cache {data_path} ({err})") from None


def resolve_patch_size(args: Namespace, input_size: tuple[int, ...], stem: bool) -> tuple[int, ...]:
    """--patch_size as given; auto (and the default under --model auto) chosen from the grid; else 16."""
    if args.patch_size == "auto" or (args.patch_size is None and args.model == "auto"):
        return auto_patch_size(input_size, stem)
    return grid(args.patch_size or (REFERENCE_PATCH,), len(input_size))


def build_model(args: Namespace, input_size: tuple[int, ...], in_chans: int,
                normalization: dict) -> tuple[str, torch.nn.Module]:
    """(registry name, the MAE) for --model and the flags that shape it; a model that cannot mask as asked is
    refused before any data is loaded into it."""
    overrides = {"img_size": input_size, "in_chans": in_chans, "norm_pix_loss": args.norm_pix_loss, **normalization}
    if args.model == "auto":
        overrides.update({**AUTO_ARCHITECTURE, **AUTO_DECODER})
    overrides.update({key: getattr(args, key) for key in MODEL_FLAGS if getattr(args, key) is not None})
    overrides["patch_size"] = resolve_patch_size(args, input_size, overrides.get("stem_channels", 0) > 0)
    name = AUTO_MAE if args.model == "auto" else args.model
    try:
        core = models.create_model(name, **overrides)
        core.num_visible(args.mask_ratio, args.mask_type)
    except ValueError as err:
        raise UsageError(str(err)) from None
    return name, core


def resolve_schedule(args: Namespace, samples: int, world_size: int) -> tuple[int, float, str]:
    """(epochs, warmup epochs, what was chosen for the log): `--epochs auto` and `--warmup_epochs auto` from the
    corpus size and the batch."""
    per_epoch = optimizer_steps_per_epoch(samples, world_size, args.batch_size, args.accum_iter)
    epochs, warmup, notes = args.epochs, args.warmup_epochs, []
    if epochs == "auto":
        epochs = auto_epochs(per_epoch)
        notes.append(f"epochs auto: {epochs} x {per_epoch} steps for about {AUTO_PRETRAIN_STEPS} steps")
    if warmup == "auto":
        warmup = auto_warmup_epochs(min(epochs * per_epoch, args.max_steps or math.inf), per_epoch)
        notes.append("warmup auto: a tenth of the steps")
    return epochs, warmup, f" ({'; '.join(notes)})" if notes else ""


def resolve_flags(args: Namespace, model_name: str, data_path: str, samples: int,
                  world_size: int) -> tuple[Namespace, str]:
    """(a new namespace of the flags with no `auto` left, the schedule's note for the log); `args` is not
    touched. It is what PretrainConfig is made from and what every checkpoint records."""
    blr = args.blr if args.blr is not None else (AUTO_BLR if args.model == "auto" else MAE_BLR)
    epochs, warmup_epochs, schedule_note = resolve_schedule(args, samples, world_size)
    effective_batch = args.batch_size * args.accum_iter * world_size
    resolved = argparse.Namespace(**{**vars(args), "model": model_name, "data_path": data_path, "blr": blr,
                                     "lr": effective_lr(blr, args.lr, effective_batch), "epochs": epochs,
                                     "warmup_epochs": warmup_epochs})
    return resolved, schedule_note
