"""Pretraining augmentation, cheap: a random crop in the loader, flip and intensity jitter on the batch.
Fine-tuning has its own, richer one on the device (datasets.finetune_augment).

Parameters are drawn per sample from (seed, epoch, index), so a sample is augmented the same way
whatever the number of loader workers or ranks, and a resumed run exactly as an uninterrupted
one. Loader workers only read (cached volumes stay in their compact stored dtype); decoding to
[0, 1] floats, flipping and jitter run batched on the training device in `finish_batch`.
"""
import numpy as np
import torch

from ..volumes.stored import to_unit_float


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def crop_box(shape: tuple[int, ...], size: tuple[int, ...], rng: np.random.Generator | None) -> tuple[slice, ...]:
    """A `size` box inside `shape` (both D, H, W): random with `rng`, centred without."""
    starts = [rng.integers(0, s - c + 1) if rng is not None else (s - c) // 2 for s, c in zip(shape, size)]
    return tuple(slice(int(start), int(start) + c) for start, c in zip(starts, size))


def draw_params(rng: np.random.Generator | None, jitter: bool = True) -> dict:
    """Left-right flip with p=0.5, intensity gain in [0.9, 1.1] and offset in [-0.05, 0.05] (drawn always,
    so the stream does not depend on `jitter`, applied only with it); identity without rng."""
    if rng is None:
        return {"flip": False, "gain": 1.0, "offset": 0.0}
    flip, gain, offset = bool(rng.random() < 0.5), float(rng.uniform(0.9, 1.1)), float(rng.uniform(-0.05, 0.05))
    return {"flip": flip, "gain": gain if jitter else 1.0, "offset": offset if jitter else 0.0}


def finish_batch(batch: dict, device: torch.device) -> torch.Tensor:
    """Move a collated batch to `device`, decode it to [0, 1] and apply each sample's flip and jitter."""
    volume = to_unit_float(batch["volume"].to(device, non_blocking=True))
    flip = batch["flip"].to(device)
    if flip.any():
        volume = torch.where(flip.view(-1, *[1] * (volume.dim() - 1)), volume.flip(-1), volume)
    shape = (-1, *[1] * (volume.dim() - 1))
    gain, offset = batch["gain"].to(device).view(shape), batch["offset"].to(device).view(shape)
    return (volume * gain + offset).clamp_(0.0, 1.0)
