"""The MAE pretraining loop: optimizer steps with accumulation, guards, logging and checkpoints.

Masks are a pure function of (seed, epoch, sample index) (util.keyed_random), not of the global
random stream, so a resumed run and a run on another number of ranks mask every sample exactly as
an uninterrupted single-process run would.
"""
import math
import time
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..datasets.pretrain_augment import finish_batch
from ..datasets.volume_dataset import collate_volumes, single_threaded_worker
from ..inference.checkpoints import PretrainingCheckpoint
from ..models.mae3d import encoder_weights
from ..util.atomic import atomic_write
from ..util.checkpoint import CheckpointError
from ..util.dist import DistInfo, all_reduce_sum, barrier
from ..util.errors import DataError, DivergedError, UsageError
from ..util.keyed_random import keyed_uniform
from ..util.lr_sched import lr_at_step, set_lr
from ..util.plotting import slice_grid
from ..util.preemption import PREEMPTED_FILE, PreemptionWatch
from ..util.run_log import RunLog
from ..util.sampler import ResumableDistributedSampler, ShardSampler
from ..util.train_backend import make_backend
from .encoder_probe import FeatureProbe
from .pretrain_config import PretrainConfig

NO_WEIGHT_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")
HOLDOUT_MASK_EPOCH = -1  # the held-out volumes' masks are keyed on this instead of an epoch: the same every time
MAX_NONFINITE_SHARE = 0.05  # of a run's steps skipped for non-finite values, beyond which it has diverged


class NonFiniteLossError(DivergedError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class UnreadableDataError(DataError):
    """Too many samples failed to load, or no optimizer step succeeded: the run refuses to report success."""


class Preempted(RuntimeError):
    """A stop was requested; the state after `step` is saved."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped on request ({reason}) after step {step}; the checkpoint is saved: "
                         f"run the same command again to resume")
        self.step = step


RESUME_DEFINING = ("model", "input_size", "patch_size", "in_chans", "depth", "stem_channels", "decoder_embed_dim",
                   "decoder_depth", "decoder_num_heads", "mask_ratio", "mask_type", "norm_pix_loss", "contrast_weight")


class ResumeMismatchError(UsageError):
    """The checkpoint to resume from was trained with other defining settings; the message names each flag."""


def build_optimizer(model: torch.nn.Module, weight_decay: float, fused: bool = True) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95) as in MAE; no weight decay on norms, biases and tokens. Fused: one kernel for all
    parameters instead of a loop of small operations per tensor (on CPU a quarter of a ViT-B step; docs/performance.md).
    Not under DeepSpeed, which steps the optimizer on its own partitions."""
    from timm.optim import param_groups_weight_decay

    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=NO_WEIGHT_DECAY)
    return torch.optim.AdamW(groups, betas=(0.9, 0.95), fused=fused)


def keyed_masking_noise(core, indices: torch.Tensor, epoch: int, seed: int, mask_type: str,
                        device: torch.device, view: int = 0) -> torch.Tensor:
    """Masking noise of a batch, each sample's a function of (seed, epoch, dataset index) alone; `view` > 0 gives
    other masks of the same samples (the contrastive term's second view)."""
    raw = keyed_uniform([seed, epoch] + ([view] if view else []), indices, core.noise_count(mask_type))
    return core.expand_noise(raw, mask_type).to(device, non_blocking=True)


@dataclass
class StepResult:
    loss: float | None  # global mean over ranks and micro-batches; None when the step was skipped
    grad_norm: float
    reason: str = ""  # why the step was skipped
    failed: int = 0  # samples that failed to load in this step, summed over ranks
    sample: tuple | None = None  # (volume, pred, mask) of the last micro-batch, for figures


class Pretrainer:
    """Owns the model, optimizer, backend and schedule of one pretraining run."""

    def __init__(self, config: PretrainConfig, core: torch.nn.Module, dataset: Dataset, dist_info: DistInfo,
                 checkpoint: PretrainingCheckpoint, preemption: PreemptionWatch, probe: FeatureProbe | None = None,
                 holdout: Dataset | None = None):
        self.config = config
        self.probe = probe
        self.last_probe_step = -1
        self.holdout = holdout  # volumes never trained on: their reconstruction loss every --val_every epochs
        self.last_holdout_step = -1
        self.dist = dist_info
        self.checkpoint = checkpoint  # model name, config, data, preprocessing, flags: saved with every checkpoint
        self.output_dir = Path(config.output_dir)
        self.preemption = preemption
        self.sampler = ResumableDistributedSampler(dataset, num_replicas=dist_info.world_size,
                                                   rank=dist_info.rank, shuffle=True, seed=config.seed)
        self.loader = DataLoader(dataset, batch_size=config.batch_size, sampler=self.sampler,
                                 num_workers=config.num_workers, collate_fn=collate_volumes,
                                 pin_memory=dist_info.device.type == "cuda",
                                 worker_init_fn=single_threaded_worker)
        self.steps_per_epoch = len(self.loader) // config.accum_iter
        if self.steps_per_epoch == 0:
            raise UsageError(f"one epoch has {len(self.loader)} batches per rank, fewer than "
                             f"--accum_iter {config.accum_iter}: lower --accum_iter or --batch_size")
        self.total_steps = config.epochs * self.steps_per_epoch
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        optimizer = build_optimizer(core, config.weight_decay, fused=not config.deepspeed)
        self.backend = make_backend(core, optimizer, dist_info, config.deepspeed, config.precision, config.batch_size,
                                    config.accum_iter, config.clip_grad, cpu_bf16=True)
        self.core = self.backend.module
        self.step = 0
        self.bad_steps_in_row = 0
        self.applied_steps = 0  # optimizer steps that changed the weights, over the whole run (resumes included)
        self.nonfinite_steps = 0  # steps skipped for a non-finite loss or gradient, over the whole run
        self.epoch_failures = 0  # samples of the current epoch that failed to load, over all ranks
        self.max_failures = config.max_bad_samples * len(dataset)
        self.failed_sources: dict[str, str] = {}

    # ---- checkpoints -------------------------------------------------------------------------

    def progress(self) -> PretrainingCheckpoint:
        return self.checkpoint.at(self.step, self.steps_per_epoch, self.applied_steps, self.nonfinite_steps)

    def save(self, name: str) -> None:
        """A resume checkpoint (collective under DeepSpeed, rank 0 alone otherwise)."""
        self.backend.save(self.output_dir, name, self.progress().state())

    def save_final(self) -> None:
        """Plain files any later step reads without knowing the engine: model.pth and encoder.pth."""
        weights = self.backend.full_state_dict(self.output_dir)
        if self.dist.is_main:
            state = self.progress()
            state.with_weights(weights).save(self.output_dir / "model.pth")
            state.with_weights(encoder_weights(weights)).save(self.output_dir / "encoder.pth")

    def resume_as_flagged(self, flag: str, say) -> Path | None:
        """--resume: auto (the newest checkpoint that loads, if any), none, or a path; the checkpoint resumed from."""
        if flag in ("none", ""):
            return None
        try:
            if flag == "auto":
                return self.resume_newest(say)
            path = Path(flag)
            if not path.exists():
                raise UsageError(f"--resume {path}: no such file")
            self.resume(path)
            return path
        except (CheckpointError, ResumeMismatchError) as err:
            raise UsageError(f"cannot resume: {err}") from None

    def resume_newest(self, say) -> Path | None:
        """Resume from the newest checkpoint that loads; newer ones that cannot be read are reported by path and
        reason and passed over. None when there is none at all; CheckpointError when none of them loads."""
        problems = []
        for path in self.backend.checkpoint_candidates(self.output_dir):
            try:
                self.resume(path)
            except CheckpointError as err:
                problems.append(str(err))
                say(f"warning: cannot resume from {err}")
                continue
            if problems:
                say(f"warning: resuming from the newest readable checkpoint instead: {path}")
            return path
        if problems:
            raise CheckpointError(f"no checkpoint in {self.output_dir} can be read ({'; '.join(problems)}); "
                                  f"pass --resume none to start afresh")
        return None

    def resume(self, path: Path) -> None:
        state = PretrainingCheckpoint.from_dict(self.backend.resume(path, self.check_resumable), path)
        self.step, self.applied_steps, self.nonfinite_steps = state.step, state.applied_steps, state.nonfinite_steps

    def check_resumable(self, saved: dict, path: Path) -> None:
        """A checkpoint of another model, grid, masking or target cannot continue this run: its weights would
        not fit, or its loss would change meaning mid-run (1.03 to 1.80 with --norm_pix_loss). Nor can one
        trained on volumes preprocessed otherwise (a cache rebuilt at another grid, spacing or window): the
        encoder would record a preprocessing only part of its training saw."""
        current, args = self.checkpoint.args, saved.get("args") or {}
        changed = [key for key in RESUME_DEFINING if key in args and args[key] != current.get(key)]
        if changed:
            shown = "; ".join(f"--{key} {args[key]} there, {current.get(key)} here" for key in changed)
            raise ResumeMismatchError(f"{path} was trained with other settings ({shown}); resume with the same "
                                      f"flags, or start this run in a new --output_dir")
        before, now = saved.get("preprocess"), self.checkpoint.preprocess
        if before is not None and now is not None and before != now:
            differ = [key for key in sorted(set(before) | set(now)) if before.get(key) != now.get(key)]
            shown = "; ".join(f"{key} {before.get(key)} there, {now.get(key)} here" for key in differ)
            raise ResumeMismatchError(f"{path} was trained on volumes preprocessed otherwise ({shown}); "
                                      f"{args.get('data_path') or 'the data'} has changed since: resume on the "
                                      f"data it was trained on, or start this run in a new --output_dir")

    # ---- one optimizer step ------------------------------------------------------------------

    def optimizer_step(self, micro_batches: list[dict], epoch: int, keep_sample: bool) -> StepResult:
        """Forward and backward every micro-batch on every rank, then update unless any loss was non-finite."""
        device = self.dist.device
        status = torch.tensor([float(any(b["volume"] is None for b in micro_batches)),
                               float(sum(len(b["failed"]) for b in micro_batches))], device=device)
        all_reduce_sum(status)
        failed = int(status[1].item())
        if status[0].item() > 0:  # a rank cannot run this step: all ranks skip it, before any collective
            return StepResult(None, math.nan, "a rank had no loadable volume in its batch", failed)
        loss_sum, nonfinite, sample = 0.0, False, None
        input_dtype = getattr(self.backend, "input_dtype", torch.float32)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with self.backend.accumulating(last):
                volume = finish_batch(batch, device)
                noise = keyed_masking_noise(self.core, batch["index"], epoch, self.config.seed, self.config.mask_type, device)
                views = {"second_noise": keyed_masking_noise(self.core, batch["index"], epoch, self.config.seed,
                                                             self.config.mask_type, device, view=1)} \
                    if getattr(self.core, "needs_second_view", False) else {}
                with self.backend.autocast():
                    loss, pred, mask = self.backend.model(volume.to(input_dtype), self.config.mask_ratio,
                                                          self.config.mask_type, noise=noise, **views)
                local = loss.detach().float()
                finite = bool(torch.isfinite(local))
                stats = torch.tensor([local.item() if finite else 0.0, float(not finite)], device=device,
                                     dtype=torch.float64)
                all_reduce_sum(stats)
                nonfinite |= bool(stats[1] > 0)
                loss_sum += stats[0].item() / self.dist.world_size
                self.backend.backward(loss)
            if keep_sample and last:
                sample = (volume[0].detach(), pred[0].detach().float(), mask[0].detach())
        applied, grad_norm = self.backend.finish_step(skip=nonfinite)
        if nonfinite:
            return StepResult(None, grad_norm, "non-finite loss", failed)
        if not applied:
            return StepResult(None, grad_norm, "non-finite gradient", failed)
        return StepResult(loss_sum / len(micro_batches), grad_norm, failed=failed, sample=sample)

    # ---- the loop ----------------------------------------------------------------------------

    def train(self, run_log: RunLog) -> None:
        config = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc="pretrain", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        window = _LogWindow()
        epoch = self.step // self.steps_per_epoch
        if self.step == 0:
            self._run_probe(run_log)
            self._run_holdout(run_log)
        try:  # a bar left open repaints itself after the one line a stopped run ends with
            while self.step < self.total_steps:
                self.epoch_failures = 0
                self.sampler.set_epoch(epoch)
                self.loader.dataset.set_epoch(epoch)
                first = self.step - epoch * self.steps_per_epoch
                self.sampler.set_start(first * config.accum_iter * config.batch_size)
                batches = iter(self.loader)
                for _ in range(first, self.steps_per_epoch):
                    if self.step >= self.total_steps:
                        break
                    tick = time.perf_counter()
                    micro_batches = [next(batches) for _ in range(config.accum_iter)]
                    window.data_wait += time.perf_counter() - tick
                    for batch in micro_batches:
                        self._note_failures(batch["failed"])
                    lr = lr_at_step(self.step, config.lr, config.min_lr, self.warmup_steps, self.total_steps)
                    set_lr(self.backend.optimizer, lr)
                    keep_sample = self.dist.is_main and self._is_vis_step(self.step + 1)
                    result = self.optimizer_step(micro_batches, epoch, keep_sample)
                    self.step += 1
                    self.applied_steps += result.loss is not None
                    self.nonfinite_steps += self._is_divergence(result)
                    self.epoch_failures += result.failed
                    if self.epoch_failures > self.max_failures:
                        bar.close()
                        self._stop_unreadable(f"{self.epoch_failures} samples of epoch {epoch} could not be loaded, "
                                              f"more than --max_bad_samples {self.config.max_bad_samples:g} of "
                                              f"{len(self.loader.dataset)}")
                    window.add(result, sum(int(b["index"].numel()) for b in micro_batches) * self.dist.world_size)
                    too_many_bad = self._count_bad_step(result)
                    bar.update(1)
                    if result.loss is not None:
                        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
                    if self.step % config.log_every == 0 or self.step == self.total_steps or too_many_bad:
                        run_log.scalars(window.record(self.step, self.step / self.steps_per_epoch, lr), self.step)
                        window = _LogWindow()
                    if too_many_bad:
                        self._stop_non_finite(result)
                    if result.sample is not None:
                        self._save_figure(run_log, result.sample)
                    if config.save_every_steps and self.step % config.save_every_steps == 0:
                        self.save("checkpoint-last.pth")
                    self._stop_if_requested(bar)
                del batches
                if self.step % self.steps_per_epoch == 0:
                    finished = self.step // self.steps_per_epoch
                    if finished % config.save_every == 0 or self.step == self.total_steps:
                        self.save("checkpoint-last.pth")
                    if config.keep_every and finished % config.keep_every == 0:
                        self.save(f"checkpoint-{finished - 1}.pth")
                    if self.probe and (finished % self.probe.every == 0 or self.step == self.total_steps):
                        self._run_probe(run_log)
                    if self.holdout is not None and (finished % self.config.val_every == 0 or self.step == self.total_steps):
                        self._run_holdout(run_log)
                epoch += 1
        except BaseException:
            bar.close()
            raise
        bar.close()
        if self.applied_steps == 0:
            self._stop_unreadable(f"none of the {self.step} optimizer steps changed the weights")
        self._stop_if_diverged()
        if self.probe and self.last_probe_step != self.step:
            self._run_probe(run_log)
        if self.holdout is not None and self.last_holdout_step != self.step:
            self._run_holdout(run_log)
        self.save("checkpoint-last.pth")
        self.save_final()
        barrier()

    def _run_probe(self, run_log: RunLog) -> None:
        """Probe the encoder on rank 0 (the other ranks wait) and log probe_knn_auc and probe_linear_auc."""
        if self.probe is None:
            return
        self.last_probe_step = self.step
        if self.dist.is_main:
            record = {"step": self.step, "epoch": self.step // self.steps_per_epoch,
                      **self.probe(self.core, self.dist.device)}
            run_log.scalars(record, self.step)
            tqdm.write(f"probe at step {self.step}: kNN AUC {record['probe_knn_auc']:.4f}, "
                       f"linear AUC {record['probe_linear_auc']:.4f} ({record['probe_seconds']:.1f} s)")
        barrier()

    @torch.no_grad()
    def holdout_loss(self) -> float:
        """The reconstruction loss on the held-out volumes, each with a mask fixed for the whole run, averaged over
        volumes on all ranks."""
        training = self.core.training
        self.core.eval()
        loader = DataLoader(self.holdout, batch_size=self.config.batch_size, collate_fn=collate_volumes,
                            sampler=ShardSampler(len(self.holdout), self.dist.rank, self.dist.world_size))
        device = self.dist.device
        total = torch.zeros(2, device=device, dtype=torch.float64)
        for batch in loader:
            if batch["volume"] is None:
                continue
            volume = finish_batch(batch, device)
            noise = keyed_masking_noise(self.core, batch["index"], HOLDOUT_MASK_EPOCH, self.config.seed, self.config.mask_type,
                                  device)
            with self.backend.autocast(inference=True):
                loss, _, _ = self.core(volume.to(getattr(self.backend, "input_dtype", torch.float32)),
                                       self.config.mask_ratio, self.config.mask_type, noise=noise)
            total += torch.tensor([loss.float().item() * len(volume), len(volume)], device=device, dtype=torch.float64)
        all_reduce_sum(total)
        self.core.train(training)
        return float(total[0] / total[1]) if total[1] > 0 else math.nan

    def _run_holdout(self, run_log: RunLog) -> None:
        if self.holdout is None:
            return
        self.last_holdout_step = self.step
        loss = self.holdout_loss()
        run_log.scalars({"step": self.step, "epoch": self.step // self.steps_per_epoch, "val_loss": loss}, self.step)
        if self.dist.is_main:
            tqdm.write(f"held-out reconstruction loss at step {self.step}: {loss:.4f} ({len(self.holdout)} volumes)")

    def _stop_if_requested(self, bar: tqdm) -> None:
        reason = self.preemption.requested()
        if reason is None:
            return
        bar.close()
        self.save("checkpoint-last.pth")
        if self.dist.is_main:
            atomic_write(self.output_dir / PREEMPTED_FILE, lambda tmp: tmp.write_text(f"{self.step}\n"))
        barrier()
        raise Preempted(self.step, reason)

    def _is_vis_step(self, step: int) -> bool:
        return step == self.total_steps or (self.config.vis_every > 0 and step % self.config.vis_every == 0)

    def _count_bad_step(self, result: StepResult) -> bool:
        """Count consecutive non-finite steps; True once there are --max_bad_steps of them."""
        if result.loss is not None or result.reason.startswith("a rank had no"):
            self.bad_steps_in_row = 0
            return False
        self.bad_steps_in_row += 1
        if self.dist.is_main:
            tqdm.write(f"step {self.step}: skipped ({result.reason}); {self.bad_steps_in_row} in a row")
        return self.bad_steps_in_row >= self.config.max_bad_steps

    def _stop_non_finite(self, result: StepResult) -> None:
        """Stop with a checkpoint of the last good state (skipped steps changed no weight)."""
        self.save("checkpoint-last.pth")
        barrier()
        where = self.backend.checkpoint_candidates(self.output_dir)[0]
        raise NonFiniteLossError(
            f"{self.bad_steps_in_row} steps in a row had a {result.reason} (--max_bad_steps "
            f"{self.config.max_bad_steps}); stopped at step {self.step} and saved the last good state in {where}. "
            f"Lower the learning rate, use --clip_grad, or --precision bf16/fp32.")

    def _is_divergence(self, result: StepResult) -> bool:
        """A skipped step that says the weights diverged; fp16 gradient overflows are the loss scaler's normal
        work, not divergence."""
        if result.reason == "non-finite gradient":
            return self.backend.precision != "fp16"
        return result.reason == "non-finite loss"

    def _stop_if_diverged(self) -> None:
        """A run that ended on non-finite steps, or skipped more than MAX_NONFINITE_SHARE of its steps, is no
        success: no model.pth or encoder.pth; checkpoint-last.pth keeps the last good state (skipped steps
        changed no weight)."""
        if self.bad_steps_in_row == 0 and self.nonfinite_steps <= MAX_NONFINITE_SHARE * self.step:
            return
        self.save("checkpoint-last.pth")
        barrier()
        where = self.backend.checkpoint_candidates(self.output_dir)[0]
        ending = f", the last {self.bad_steps_in_row} in a row" if self.bad_steps_in_row else ""
        raise NonFiniteLossError(
            f"the run diverged: {self.nonfinite_steps} of {self.step} steps had a non-finite loss or gradient and "
            f"were skipped{ending}; no encoder was written. The last good state is in {where}: run again with a "
            f"lower --lr (or --clip_grad, --precision fp32) in a new --output_dir, or resume it with more --epochs.")

    def _stop_unreadable(self, what: str) -> None:
        """Stop without writing model.pth or encoder.pth, naming every source that failed to load."""
        failed = self.all_failed_sources()
        listing = "".join(f"\n  {source}: {reason}" for source, reason in sorted(failed.items()))
        raise UnreadableDataError(f"{what}; no encoder was written. Unreadable volumes ({len(failed)}):"
                                  f"{listing or ' none'}")

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
        views = self.core.reconstruction(volume[None].float(), pred[None].float(), mask[None])
        rows = {name: view[0, 0] for name, view in views.items()}
        figure = slice_grid({k: v.cpu().numpy() for k, v in rows.items()}, title=f"step {self.step}")
        run_log.figure("reconstruction", figure, self.step)
        atomic_write(self.output_dir / "reconstruction.png", lambda tmp: figure.savefig(tmp, dpi=100))
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
