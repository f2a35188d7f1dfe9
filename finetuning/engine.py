"""The fine-tuning loop: train, keep the epoch with the best validation AUC, then test it once.

An epoch whose validation predictions do not depend on the input (all one class, or nearly constant
scores) has not left the class prior: its AUC comes from tiny differences in probability and is noise.
Such epochs lose the selection to any epoch that has left it, and a run in which every epoch stays
there is reported as collapsed.

Evaluation shards the samples across ranks without padding and gathers (index, scores) pairs,
so every sample is scored exactly once whatever the number of ranks.
"""
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from ..datasets.finetune_augment import NO_AUGMENT, AugmentConfig, augment_batch
from ..inference.checkpoints import ClassifierCheckpoint
from ..util.dist import DistInfo, all_reduce_sum
from ..util.errors import UsageError
from ..util.lr_sched import lr_at_step, multistep_lr, set_lr
from ..util.metrics import MULTI_LABEL, REGRESSION, scores_from_logits, selection_score, stays_at_prior
from ..util.run_log import RunLog
from ..util.sampler import ShardSampler
from ..util.train_backend import make_backend
from ..volumes.stored import to_unit_float
from .finetune_config import TrainingConfig

HEAD_MODULES = frozenset({"head", "fc_norm", "head_norm"})  # the ViTs' classification head, after the encoder


def is_head_parameter(name: str) -> bool:
    """A parameter of the head (in a classifier, or in one joined to its MAE decoder: `classifier.head.weight`)."""
    return not HEAD_MODULES.isdisjoint(name.split(".")[:-1])


def build_optimizer(model: torch.nn.Module, config: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW with timm's layer-wise lr decay for ViTs (MAE fine-tuning), or plain Adam (MedMNIST recipe)."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    no_decay = model.no_weight_decay()
    if config.layer_decay < 1.0:
        groups = param_groups_layer_decay(model, config.weight_decay, no_decay, layer_decay=config.layer_decay)
    else:
        groups = param_groups_weight_decay(model, config.weight_decay, no_decay)
    if config.probe_epochs:
        groups = split_head_groups(model, groups)
    fused = not config.deepspeed  # one kernel for all parameters (pretraining.engine.build_optimizer)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, fused=fused)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=fused)


def split_head_groups(model: torch.nn.Module, groups: list[dict]) -> list[dict]:
    """Each parameter group split into its head and its other parameters (`head`: True / False), with the same
    settings, so that LP-FT can hold the encoder still by its groups' lr, which DDP and DeepSpeed both allow."""
    head = {id(p) for name, p in model.named_parameters() if is_head_parameter(name)}
    if not head:
        raise UsageError(f"--probe_epochs trains the head alone, and {type(model).__name__} has none named "
                         f"{', '.join(sorted(HEAD_MODULES))}")
    split = []
    for group in groups:
        for in_head in (True, False):
            params = [p for p in group["params"] if (id(p) in head) == in_head]
            if params:
                split.append({**group, "params": params, "head": in_head})
    return split


class Patience:
    """Early stopping: exhausted once `patience` epochs in a row have not lowered the validation loss
    (None: never)."""

    def __init__(self, patience: int | None):
        self.patience, self.best, self.stale = patience, math.inf, 0

    def exhausted(self, val_loss: float) -> bool:
        self.best, self.stale = (val_loss, 0) if val_loss < self.best else (self.best, self.stale + 1)
        return bool(self.patience) and self.stale >= self.patience


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """'balanced' weights n / (classes * count) from the training labels."""
    counts = np.bincount(labels.reshape(-1), minlength=num_classes).astype(np.float64)
    return torch.tensor(len(labels) / (num_classes * np.maximum(counts, 1)), dtype=torch.float32)


class Finetuner:
    def __init__(self, config: TrainingConfig, model: torch.nn.Module, splits: dict[str, Dataset], task: str,
                 num_classes: int, dist_info: DistInfo, augment_config: AugmentConfig = NO_AUGMENT):
        self.config = config
        self.task = task
        self.dist = dist_info
        self.device = dist_info.device
        self.splits = splits
        self.augment_config = augment_config
        self.sampler = DistributedSampler(splits["train"], num_replicas=dist_info.world_size, rank=dist_info.rank,
                                          shuffle=True, seed=config.seed)
        # a last batch of one sample would stop batch norm (the ViTs' head_norm): drop it, and only then
        per_rank = math.ceil(len(splits["train"]) / dist_info.world_size)
        self.train_loader = DataLoader(splits["train"], batch_size=config.batch_size, sampler=self.sampler,
                                       num_workers=config.num_workers, pin_memory=self.device.type == "cuda",
                                       drop_last=per_rank % config.batch_size == 1)
        self.steps_per_epoch = len(self.train_loader)
        optimizer = build_optimizer(model, config)
        self.backend = make_backend(model, optimizer, dist_info, config.deepspeed, config.precision, config.batch_size,
                                    clip_grad=config.clip_grad)
        if config.deepspeed and self.backend.config.get("zero_optimization", {}).get("stage", 0) > 2:
            raise UsageError("fine-tuning takes ZeRO stage 1 or 2; stage 3 shards the weights, which "
                             "sharded evaluation cannot use (classifiers fit without it)")
        self.core = self.backend.module
        self.model = self.backend.model
        # what is evaluated and saved: the classifier, without an auxiliary reconstruction decoder (models.joint_mae)
        self.classifier = getattr(self.core, "classifier", self.core)
        self.reconstruction_weight = config.mae_loss_weight if self.classifier is not self.core else 0.0
        self.optimizer = self.backend.optimizer
        if task == MULTI_LABEL:
            self.criterion = torch.nn.BCEWithLogitsLoss()
        elif task == REGRESSION:
            self.criterion = torch.nn.L1Loss()
        else:
            weight = None
            if config.class_weights == "balanced":
                weight = class_weights(splits["train"].labels.numpy(), num_classes).to(self.device)
            self.criterion = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=config.smoothing)

    def lr_at(self, step: int, epoch: int) -> float:
        if self.config.schedule == "multistep":
            return multistep_lr(epoch, self.config.lr, self.config.epochs)
        if self.config.schedule == "constant":
            return self.config.lr
        return lr_at_step(step, self.config.lr, self.config.min_lr, round(self.config.warmup_epochs * self.steps_per_epoch),
                          self.config.epochs * self.steps_per_epoch)

    def inputs(self, images: torch.Tensor, train: bool) -> torch.Tensor:
        """Stored batch (uint8; uint16 in the volumes setup) -> floats in [0, 1] on the device, augmented."""
        x = to_unit_float(images.to(self.device, non_blocking=True))
        x = augment_batch(x, self.augment_config) if train and self.augment_config != NO_AUGMENT else x
        return x.to(getattr(self.backend, "input_dtype", torch.float32))

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.to(self.device)
        return labels.float() if self.task in (MULTI_LABEL, REGRESSION) else labels[:, 0]

    def train_epoch(self, epoch: int) -> float:
        self.model.train()
        self.sampler.set_epoch(epoch)
        total = torch.zeros(2, device=self.device, dtype=torch.float64)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}", leave=False, disable=not self.dist.is_main)
        for i, (images, labels, _) in enumerate(bar):
            set_lr(self.optimizer, self.lr_at(epoch * self.steps_per_epoch + i, epoch))
            if epoch < self.config.probe_epochs:  # LP-FT's probe: the encoder's groups stand still
                for group in self.optimizer.param_groups:
                    group["lr"] = group["lr"] if group.get("head", True) else 0.0
            with self.backend.autocast():
                x = self.inputs(images, train=True)
                if self.reconstruction_weight:
                    logits, reconstruction = self.model(x, with_reconstruction=True)
                    loss = self.criterion(logits.float(), self.targets(labels)) + \
                        self.reconstruction_weight * reconstruction.float()
                else:
                    loss = self.criterion(self.model(x).float(), self.targets(labels))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch}, step {i}: lower the learning rate")
            self.backend.backward(loss)
            self.backend.finish_step(skip=False)
            total += torch.tensor([loss.item() * len(images), len(images)], device=self.device, dtype=torch.float64)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        all_reduce_sum(total)
        return float(total[0] / total[1])

    @torch.inference_mode()
    def predict(self, split: str) -> np.ndarray:
        """Model outputs (logits) for every sample of a split, in dataset order, gathered from all ranks."""
        self.classifier.eval()
        dataset = self.splits[split]
        loader = DataLoader(dataset, batch_size=self.config.batch_size * 2, num_workers=self.config.num_workers,
                            sampler=ShardSampler(len(dataset), self.dist.rank, self.dist.world_size))
        indices, scores = [], []
        for images, _, index in loader:
            with self.backend.autocast(inference=True):
                logits = self.classifier(self.inputs(images, train=False)).float()
            scores.append(logits.cpu().numpy())
            indices.append(index.numpy())
        part = (np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64),
                np.concatenate(scores) if scores else None)
        parts = [part]
        if self.dist.distributed:
            parts = [None] * self.dist.world_size
            torch_dist.all_gather_object(parts, part)
        order = np.concatenate([p[0] for p in parts])
        stacked = np.concatenate([p[1] for p in parts if p[1] is not None])
        result = np.empty_like(stacked)
        result[order] = stacked
        if sorted(order.tolist()) != list(range(len(dataset))):
            raise RuntimeError(f"gathered {len(order)} predictions for {len(dataset)} samples of {split}")
        return result

    def scores(self, split: str) -> np.ndarray:
        return scores_from_logits(torch.from_numpy(self.predict(split)), self.task).numpy()

    def fit(self, run_log: RunLog, best_path: Path, checkpoint: ClassifierCheckpoint) -> dict:
        """Train; keep (in memory and in best_path) the weights of the best validation AUC (R2 for
        regression) among the epochs that left the class prior (all epochs when none did), the lower
        validation loss breaking ties: on an easy task the AUC reaches 1 epochs before the
        predictions are confident, and the first such epoch classifies worse than a later one;
        with --patience, stop once the validation loss has not improved for that many epochs."""
        val_labels = self.splits["val"].labels
        metric = "val_r2" if self.task == REGRESSION else "val_auc"
        best = {"key": (False, -math.inf, -math.inf), "score": -math.inf, "epoch": -1, "state": None}
        patience, prior_epochs = Patience(self.config.patience), 0
        for epoch in range(self.config.epochs):
            start = time.perf_counter()
            train_loss = self.train_epoch(epoch)
            logits = torch.from_numpy(self.predict("val"))
            val_loss = float(self.criterion.to("cpu")(logits, self.targets(val_labels).cpu()))
            self.criterion.to(self.device)
            val_scores = scores_from_logits(logits, self.task).numpy()
            score = selection_score(val_labels.numpy(), val_scores, self.task)
            at_prior = stays_at_prior(val_scores, self.task)
            prior_epochs += at_prior
            key = (not at_prior, score, -val_loss)
            improved = best["state"] is None or key > best["key"]  # an undefined (NaN) score keeps the first
            if improved:
                best = {"key": key, "score": score, "epoch": epoch,
                        "state": {k: v.detach().cpu().clone() for k, v in self.classifier.state_dict().items()}}
                if self.dist.is_main:
                    checkpoint.with_weights(best["state"], epoch, {metric: score}).save(best_path)
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, metric: score,
                      "val_at_prior": at_prior, "lr": self.optimizer.param_groups[-1]["lr"],
                      "seconds": time.perf_counter() - start}
            run_log.scalars(record, epoch)
            if self.dist.is_main:
                tqdm.write(f"epoch {epoch}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                           f"{metric.replace('_', ' ')} {score:.4f}{' (stays at the class prior)' if at_prior else ''}"
                           f"{' (best)' if improved else ''}")
            if patience.exhausted(val_loss):
                if self.dist.is_main:
                    tqdm.write(f"early stop: validation loss has not improved for {patience.stale} epochs")
                break
        self.classifier.load_state_dict(best["state"])
        epochs_run = epoch + 1
        undefined = not math.isfinite(best["score"])  # e.g. one class in validation: nothing to choose on or judge
        collapsed = prior_epochs == epochs_run and not undefined
        if undefined and self.dist.is_main:
            tqdm.write(f"WARNING: {metric.replace('_', ' ')} is undefined in every epoch (the validation split holds "
                       f"one class{'' if self.task != REGRESSION else ' value'}): the epoch kept is the first, and "
                       f"whether the model learned cannot be judged on this split. Give a validation split with "
                       f"every class.")
        if collapsed and self.dist.is_main:
            tqdm.write(f"WARNING: the model never left the class prior: in all {epochs_run} epochs its validation "
                       f"predictions were one class, or scores that do not depend on the input. Its AUC is noise, "
                       f"not a result (results.json: collapsed: true). Train longer, raise the learning rate, or "
                       f"check the augmentation.")
        return {"best_epoch": best["epoch"], f"best_{metric}": best["score"], "best_val_at_prior": not best["key"][0],
                "epochs_run": epochs_run, "epochs_at_prior": prior_epochs, "collapsed": collapsed,
                "val_score_undefined": undefined}
