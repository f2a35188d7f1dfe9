"""Per-iteration learning rate: linear warmup, then a half-cycle cosine down to `min_lr`."""
import math

import torch


def lr_at_step(step: int, base_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based); warmup reaches `base_lr` at its last step. The decay
    never climbs: a `min_lr` above `base_lr` (lr 0 evaluates the initial weights) is lowered to it."""
    min_lr = min(min_lr, base_lr)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply `lr`, scaled per group by `lr_scale` when a group carries one (layer-wise decay)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def effective_lr(blr: float, lr: float | None, effective_batch: int) -> float:
    """`--lr` when given, else the MAE scaling rule blr * effective_batch / 256."""
    return lr if lr is not None else blr * effective_batch / 256


def multistep_lr(epoch: int, base_lr: float, epochs: int, milestones=(0.5, 0.75), gamma: float = 0.1) -> float:
    """MedMNIST's official schedule: multiply by `gamma` at each milestone (a fraction of the epochs)."""
    passed = sum(epoch >= int(m * epochs) for m in milestones)
    return base_lr * gamma ** passed


# `--epochs auto` of pretraining: about this many optimizer steps, the LIDC recipe's schedule (50 epochs of 28
# steps, docs/results.md); a small corpus gets more passes, a large one fewer, at the same cost in steps
AUTO_PRETRAIN_STEPS = 1500
AUTO_WARMUP_SHARE = 0.1  # `--warmup_epochs auto`: a tenth of the run, as MAE's 40 of 400 epochs
MOST_OF_THE_RUN = 0.5  # a warmup longer than this share of the steps leaves the lr low for most of the run


def optimizer_steps_per_epoch(samples: int, world_size: int, batch_size: int, accum_iter: int) -> int:
    """Steps of one epoch as a DistributedSampler (padded to equal shares) and a DataLoader keeping the last
    partial batch give them."""
    batches = math.ceil(math.ceil(samples / world_size) / batch_size)
    return batches // accum_iter


def auto_epochs(steps_per_epoch: int, target_steps: int = AUTO_PRETRAIN_STEPS) -> int:
    return max(1, math.ceil(target_steps / max(1, steps_per_epoch)))


def auto_warmup_epochs(total_steps: int, steps_per_epoch: int, share: float = AUTO_WARMUP_SHARE) -> float:
    """A share of the run's steps, in (fractional) epochs, so that a run cut short by --max_steps still warms up
    within it."""
    return round(share * total_steps / max(1, steps_per_epoch), 3)


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """The warning for a warmup that takes most of the run (a shortened run keeping a long run's warmup)."""
    if total_steps == 0 or warmup_steps <= MOST_OF_THE_RUN * total_steps:
        return None
    return (f"WARNING: the warmup takes {warmup_steps} of the run's {total_steps} steps: the lr stays below its peak "
            f"for {min(1.0, warmup_steps / total_steps):.0%} of the run (step 1 at 1/{warmup_steps} of --lr) and the "
            f"model may learn little; lower --warmup_epochs (auto: {AUTO_WARMUP_SHARE:.0%} of the steps)")
