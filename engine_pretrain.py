"""The MAE pretraining loop: optimizer steps with accumulation, guards, logging and checkpoints.

Masks are drawn from a generator seeded by (seed, epoch, sample index), not from the global
random stream, so a resumed run and a run on another number of ranks mask every sample exactly as
an uninterrupted single-process run would.
"""
import contextlib
import math
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import SimpleITK as sitk
import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from datasets.augment import finish_batch
from datasets.volume_dataset import collate_volumes
from util.checkpoint import atomic_save, load_checkpoint, plain_args, rng_state, set_rng_state
from util.dist import DistInfo, all_reduce_sum, barrier
from util.lr_sched import lr_at_step, set_lr
from util.plotting import slice_grid
from util.run_log import RunLog
from util.sampler import ResumableDistributedSampler

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' is bf16 autocast on CUDA and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def build_optimizer(model: torch.nn.Module, weight_decay: float) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) as in MAE; no weight decay on norms, biases and tokens."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95))


def masking_noise(core, indices: torch.Tensor, epoch: int, seed: int, mask_type: str,
                  device: torch.device) -> torch.Tensor:
    """Per-sample masking noise from a generator keyed on (seed, epoch, dataset index)."""
    rows = []
    for index in indices.tolist():
        generator = torch.Generator().manual_seed(hash((seed, epoch, index)) & 0x7FFF_FFFF_FFFF_FFFF)
        rows.append(core.masking_noise(1, mask_type, torch.device("cpu"), generator))
    return torch.cat(rows).to(device, non_blocking=True)


@dataclass
class StepResult:
    loss: float | None  # global mean over ranks and micro-batches; None when the step was skipped
    grad_norm: float
    reason: str = ""  # why the step was skipped
    sample: tuple | None = None  # (volume, pred, mask) of the last micro-batch, for figures


class Pretrainer:
    """Owns the model, optimizer, scaler and schedule of one pretraining run."""

    def __init__(self, args: Namespace, core: torch.nn.Module, dataset: Dataset, dist_info: DistInfo,
                 extra_state: dict):
        self.args = args
        self.core = core.to(dist_info.device)
        self.dist = dist_info
        self.extra_state = extra_state  # model name, config, preprocessing: saved with every checkpoint
        self.output_dir = Path(args.output_dir)
        self.model = self.core
        if dist_info.distributed:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.core, device_ids=device_ids, broadcast_buffers=False)
        self.sampler = ResumableDistributedSampler(dataset, num_replicas=dist_info.world_size,
                                                   rank=dist_info.rank, shuffle=True, seed=args.seed)
        self.loader = DataLoader(dataset, batch_size=args.batch_size, sampler=self.sampler,
                                 num_workers=args.num_workers, collate_fn=collate_volumes,
                                 pin_memory=dist_info.device.type == "cuda",
                                 worker_init_fn=_single_threaded_worker)
        self.steps_per_epoch = len(self.loader) // args.accum_iter
        if self.steps_per_epoch == 0:
            raise SystemExit(f"one epoch has {len(self.loader)} batches per rank, fewer than "
                             f"--accum_iter {args.accum_iter}: lower --accum_iter or --batch_size")
        self.total_steps = args.epochs * self.steps_per_epoch
        if args.max_steps is not None:
            self.total_steps = min(self.total_steps, args.max_steps)
        self.warmup_steps = round(args.warmup_epochs * self.steps_per_epoch)
        self.optimizer = build_optimizer(self.core, args.weight_decay)
        self.precision = resolve_precision(args.precision, dist_info.device)
        self.autocast_dtype = AUTOCAST_DTYPES[self.precision]
        self.scaler = torch.amp.GradScaler(dist_info.device.type) if self.precision == "fp16" else None
        self.step = 0
        self.bad_steps_in_row = 0
        self.failed_sources: dict[str, str] = {}

    # ---- checkpoints -------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.step // self.steps_per_epoch,
            "step": self.step,
            "args": plain_args(self.args),
            "rng": rng_state(),
            **self.extra_state,
        }

    def save(self, name: str) -> None:
        if self.dist.is_main:
            atomic_save(self.state(), self.output_dir / name)

    def save_encoder(self) -> None:
        if self.dist.is_main:
            atomic_save({"model": self.core.encoder_state_dict(), "args": plain_args(self.args),
                         **self.extra_state}, self.output_dir / "encoder.pth")

    def resume(self, path: Path) -> None:
        checkpoint = load_checkpoint(path)
        self.core.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        self.step = int(checkpoint["step"])

    # ---- one optimizer step ------------------------------------------------------------------

    def _forward_backward(self, batch: dict, epoch: int, last: bool, keep_sample: bool):
        """Forward (and backward when every rank's loss is finite). Returns (agreed stats, sample)."""
        device = self.dist.device
        has_data = batch["volume"] is not None
        loss = None
        sample = None
        sync = contextlib.nullcontext() if last or not self.dist.distributed else self.model.no_sync()
        with sync:
            if has_data:
                volume = finish_batch(batch, device)
                noise = masking_noise(self.core, batch["index"], epoch, self.args.seed,
                                      self.args.mask_type, device)
                with torch.autocast(device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    loss, pred, mask = self.model(volume, self.args.mask_ratio, self.args.mask_type, noise=noise)
                if keep_sample:
                    sample = (volume[0].detach(), pred[0].detach().float(), mask[0].detach())
            local = loss.detach().float() if has_data else torch.tensor(0.0, device=device)
            finite = bool(torch.isfinite(local)) if has_data else True
            stats = torch.tensor([local.item() if finite else 0.0, float(not finite), float(not has_data)],
                                 device=device, dtype=torch.float64)
            all_reduce_sum(stats)
            if stats[1] == 0 and stats[2] == 0:
                scaled = loss / self.args.accum_iter
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return stats, sample

    def optimizer_step(self, micro_batches: list[dict], epoch: int, keep_sample: bool) -> StepResult:
        loss_sum = 0.0
        sample = None
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            stats, sample = self._forward_backward(batch, epoch, last, keep_sample and last)
            if stats[2] > 0:
                self.optimizer.zero_grad(set_to_none=True)
                return StepResult(None, math.nan, "a rank had no loadable volume in its batch")
            if stats[1] > 0:
                self.optimizer.zero_grad(set_to_none=True)
                return StepResult(None, math.nan, "non-finite loss")
            loss_sum += stats[0].item() / self.dist.world_size
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.args.clip_grad if self.args.clip_grad is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.core.parameters(), max_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
        elif not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return StepResult(None, grad_norm, "non-finite gradient")
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum / len(micro_batches), grad_norm, sample=sample)

    # ---- the loop ----------------------------------------------------------------------------

    def train(self, run_log: RunLog) -> None:
        args = self.args
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        window = _LogWindow()
        epoch = self.step // self.steps_per_epoch
        while self.step < self.total_steps:
            self.sampler.set_epoch(epoch)
            self.loader.dataset.set_epoch(epoch)
            first = self.step - epoch * self.steps_per_epoch
            self.sampler.set_start(first * args.accum_iter * args.batch_size)
            batches = iter(self.loader)
            for _ in range(first, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                tick = time.perf_counter()
                micro_batches = [next(batches) for _ in range(args.accum_iter)]
                window.data_wait += time.perf_counter() - tick
                for batch in micro_batches:
                    self._note_failures(batch["failed"])
                lr = lr_at_step(self.step, args.lr, args.min_lr, self.warmup_steps, self.total_steps)
                set_lr(self.optimizer, lr)
                keep_sample = self.dist.is_main and self._is_vis_step(self.step + 1)
                result = self.optimizer_step(micro_batches, epoch, keep_sample)
                self.step += 1
                window.add(result, sum(int(b["index"].numel()) for b in micro_batches) * self.dist.world_size)
                self._guard(result)
                bar.update(1)
                if result.loss is not None:
                    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
                if self.step % args.log_every == 0 or self.step == self.total_steps:
                    run_log.scalars(window.record(self.step, self.step / self.steps_per_epoch, lr), self.step)
                    window = _LogWindow()
                if result.sample is not None:
                    self._save_figure(run_log, result.sample)
            del batches
            if self.step % self.steps_per_epoch == 0:
                finished = self.step // self.steps_per_epoch
                if finished % args.save_every == 0 or self.step == self.total_steps:
                    self.save("checkpoint-last.pth")
                if args.keep_every and finished % args.keep_every == 0:
                    self.save(f"checkpoint-{finished - 1}.pth")
            epoch += 1
        bar.close()
        self.save("checkpoint-last.pth")
        self.save_encoder()
        barrier()

    def _is_vis_step(self, step: int) -> bool:
        return step == self.total_steps or (self.args.vis_every > 0 and step % self.args.vis_every == 0)

    def _guard(self, result: StepResult) -> None:
        """Count consecutive skipped steps; stop with a checkpoint of the last good state after too many."""
        if result.loss is not None or result.reason.startswith("a rank had no"):
            self.bad_steps_in_row = 0
            return
        self.bad_steps_in_row += 1
        if self.dist.is_main:
            tqdm.write(f"step {self.step}: skipped ({result.reason}); {self.bad_steps_in_row} in a row")
        if self.bad_steps_in_row >= self.args.max_bad_steps:
            self.save("checkpoint-last.pth")
            barrier()
            raise NonFiniteLossError(
                f"{self.bad_steps_in_row} steps in a row had a {result.reason} (--max_bad_steps "
                f"{self.args.max_bad_steps}); stopped at step {self.step} and saved the last good state in "
                f"{self.output_dir / 'checkpoint-last.pth'}. Lower the learning rate, use --clip_grad, "
                f"or --precision bf16/fp32.")

    def _note_failures(self, failed: list[tuple[str, str]]) -> None:
        for source, reason in failed:
            if source not in self.failed_sources:
                self.failed_sources[source] = reason
                tqdm.write(f"warning: skipped {source}: {reason}")

    def all_failed_sources(self) -> dict[str, str]:
        """Sources that failed to load on any rank during training."""
        if not self.dist.distributed:
            return dict(self.failed_sources)
        gathered = [None] * self.dist.world_size
        torch_dist.all_gather_object(gathered, self.failed_sources)
        return {k: v for part in gathered for k, v in part.items()}

    def _save_figure(self, run_log: RunLog, sample: tuple) -> None:
        volume, pred, mask = sample
        core = self.core
        target = core.patchify(volume[None].float())
        if core.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred[None] * std + mean
        else:
            pred = pred[None]
        keep = (1 - mask)[None, :, None]
        rows = {
            "input": volume[0],
            "masked": core.unpatchify(target * keep)[0, 0],
            "reconstruction": core.unpatchify(pred * (1 - keep) + target * keep)[0, 0],
        }
        figure = slice_grid({k: v.cpu().numpy() for k, v in rows.items()}, title=f"step {self.step}")
        run_log.figure("reconstruction", figure, self.step)
        figure.savefig(self.output_dir / "reconstruction.png", dpi=100)
        plt.close(figure)


class _LogWindow:
    """Running sums between two log lines."""

    def __init__(self):
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.volumes = 0
        self.skipped = 0

    def add(self, result: StepResult, volumes: int) -> None:
        self.volumes += volumes
        if result.loss is None:
            self.skipped += 1
        else:
            self.losses.append(result.loss)
            self.grad_norms.append(result.grad_norm)

    def record(self, step: int, epoch: float, lr: float) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return {
            "step": step,
            "epoch": round(epoch, 4),
            "loss": float(np.mean(self.losses)) if self.losses else None,
            "lr": lr,
            "grad_norm": float(np.mean(self.grad_norms)) if self.grad_norms else None,
            "vol_per_s": self.volumes / elapsed,
            "data_wait_frac": min(1.0, self.data_wait / elapsed),
            "skipped_steps": self.skipped,
        }


def _single_threaded_worker(_worker_id: int) -> None:
    """Loader workers already run in parallel; more ITK threads each would oversubscribe the CPU."""
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    torch.set_num_threads(1)
