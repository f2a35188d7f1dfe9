"""Pretrain a 3D masked autoencoder ViT on a corpus of CT/MR volumes.

    python main_pretrain.py --data_path /data/ct --model mae_vit_base_patch16 --input_size 256
    torchrun --nproc_per_node=4 main_pretrain.py --data_path /data/ct ...

Without --data_path it writes a small corpus of synthetic CT phantoms and trains on it.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import logging
import sys

import torch

from .inference.checkpoints import PretrainingCheckpoint
from .models.mae3d import PRETRAINING_ONLY_PREFIXES
from .pretraining.data import PretrainData, load_pretrain_data
from .pretraining.encoder_probe import build_probe
from .pretraining.engine import Preempted, Pretrainer
from .pretraining.flags import get_args_parser
from .pretraining.pretrain_config import PretrainConfig, build_model, check_flags, resolve_flags
from .util.atomic import make_output_folder
from .util.checkpoint import plain_args
from .util.cli import run_main
from .util.dist import DistInfo, init_distributed, shutdown
from .util.lr_sched import warmup_warning
from .util.preemption import PREEMPTED_FILE, PreemptionWatch
from .util.run_lock import lock_output_folder
from .util.run_log import RunLog
from .util.train_backend import describe_precision


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    check_flags(args)
    dist_info = init_distributed(args.device)
    try:
        return pretrain(args, dist_info, print if dist_info.is_main else (lambda *a, **k: None))
    finally:
        shutdown()


def pretrain(args: argparse.Namespace, dist_info: DistInfo, say) -> int:
    output_dir = make_output_folder(args.output_dir)
    if dist_info.is_main:
        lock_output_folder(output_dir)
    preemption = PreemptionWatch(output_dir, dist_info.device)
    if dist_info.is_main:  # a requeued run starts afresh: the stop request it answered is done
        preemption.clear()
        (output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    torch.manual_seed(args.seed + dist_info.rank)
    data = load_pretrain_data(args, dist_info)
    for note in data.notes:
        say(note)
    model_name, core = build_model(args, data.input_size, data.in_chans, data.normalization)
    resolved, schedule_note = resolve_flags(args, model_name, data.path, len(data.dataset), dist_info.world_size)
    saved_with = PretrainingCheckpoint(model_name, core.config, data.info,
                                       data.preprocess.to_dict() if data.preprocess is not None else None,
                                       plain_args(resolved))
    probe = build_probe(resolved, core, data.preprocess)
    if probe is not None:
        say(probe.describe())
    trainer = Pretrainer(PretrainConfig.from_flags(resolved), core, data.dataset, dist_info, saved_with, preemption,
                         probe, data.holdout)
    checkpoint = trainer.resume_as_flagged(resolved.resume, say)
    if checkpoint is not None:
        say(f"resumed from {checkpoint} at step {trainer.step}")
    for line in describe_run(resolved, core, data, trainer, dist_info, schedule_note):
        say(line)

    run_log = RunLog(output_dir, resolved.log_dir or output_dir / "tensorboard", enabled=dist_info.is_main)
    try:
        trainer.train(run_log)
    except Preempted as stop:
        say(str(stop))
        return preemption.exit_status()
    finally:
        run_log.close()
    failed = trainer.all_failed_sources()
    if failed:
        say(f"warning: {len(failed)} volume(s) could not be loaded during training and were skipped")
    resume_files = "deepspeed/ (resume)" if resolved.deepspeed else "checkpoint-last.pth"
    say(f"{trainer.nonfinite_steps} of {trainer.step} steps skipped for a non-finite loss or gradient")
    say(f"done: {output_dir} holds {resume_files}, model.pth, encoder.pth, log.txt, reconstruction.png, "
        f"tensorboard in {resolved.log_dir or output_dir / 'tensorboard'}")
    return 0


def describe_run(resolved: argparse.Namespace, core: torch.nn.Module, data: PretrainData, trainer: Pretrainer,
                 dist_info: DistInfo, schedule_note: str) -> list[str]:
    """The header a user checks before waiting on a run: model size, data, ranks, precision, lr and schedule."""
    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
    n_decoder = sum(p.numel() for name, p in core.named_parameters()
                    if p.requires_grad and name.startswith(PRETRAINING_ONLY_PREFIXES))
    effective_batch = resolved.batch_size * resolved.accum_iter * dist_info.world_size
    grid_note = f", grid {data.preprocess.size}, {data.preprocess.resample}" if data.preprocess is not None else ""
    held = f", {len(data.holdout)} held out for val_loss" if data.holdout is not None else ""
    kind = type(getattr(data.dataset, "dataset", data.dataset)).__name__
    engine = f"DeepSpeed ZeRO-{trainer.backend.config.get('zero_optimization', {}).get('stage', 0)}" \
        if resolved.deepspeed else ("DDP" if dist_info.distributed else "single process")
    precision = trainer.backend.precision if resolved.deepspeed \
        else describe_precision(resolved.precision, dist_info.device, cpu_bf16=True)
    lines = [
        f"model {resolved.model}: {n_params / 1e6:.2f}M trainable parameters (encoder "
        f"{(n_params - n_decoder) / 1e6:.2f}M, decoder {n_decoder / 1e6:.2f}M), grid {core.grid_size}, "
        f"{core.num_visible(resolved.mask_ratio, resolved.mask_type)}/{core.num_patches} patches visible",
        f"data: {len(data.dataset)} volumes{held} from {resolved.data_path} ({kind}{grid_note}) -> {data.input_size}; "
        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps in all",
        f"{dist_info.world_size} rank(s) on {dist_info.device} ({engine}), precision {precision}; "
        f"effective batch {effective_batch}, lr {resolved.lr:.3e}"
        f"{'; threads ' + dist_info.cpu_threads if dist_info.cpu_threads else ''}",
        f"schedule: {resolved.epochs} epochs, warmup {resolved.warmup_epochs:g} epochs ({trainer.warmup_steps} steps)"
        f"{schedule_note}",
    ]
    if warning := warmup_warning(trainer.warmup_steps, trainer.total_steps):
        lines.append(warning)
    return lines


def cli() -> None:
    """The `volmae-pretrain` command: the same as `python main_pretrain.py`."""
    sys.exit(run_main(main, get_args_parser(__doc__).parse_args(sys.argv[1:])))


if __name__ == "__main__":
    cli()
