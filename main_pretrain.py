"""Pretrain a 3D masked autoencoder ViT on a corpus of CT/MR volumes.

    python main_pretrain.py --data_path /data/ct --model mae_vit_base_patch16 --input_size 256
    torchrun --nproc_per_node=4 main_pretrain.py --data_path /data/ct ...

Without --data_path it writes a small corpus of synthetic CT phantoms and trains on it.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import logging
import math
import sys
from pathlib import Path

import torch
from medmnist.info import DEFAULT_ROOT

from . import models
from .datasets.cache import is_cache, read_meta
from .datasets.preprocess import add_preprocess_args, preprocess_config_from_args
from .datasets.pretrain_data import (
    build_pretrain_dataset,
    hold_out,
    medmnist_pretrain_dataset,
    phantom_corpus,
)
from .datasets.probe_data import ProbeDataError, csv_probe_set, medmnist_probe_set
from .engine_pretrain import (
    FeatureProbe,
    NonFiniteLossError,
    Preempted,
    PretrainConfig,
    Pretrainer,
    ResumeMismatchError,
    UnreadableDataError,
)
from .models.mae3d import AUTO_DECODER, MASK_TYPES, MAX_MASK_RATIO, PRETRAINING_ONLY_PREFIXES
from .models.patch_embed import REFERENCE_PATCH, auto_patch_size
from .models.pretraining_checkpoint import PretrainingCheckpoint
from .models.vit import AUTO_ARCHITECTURE
from .util.atomic import make_output_folder
from .util.checkpoint import CheckpointError, plain_args
from .util.cli import (
    HelpFormatter,
    grid,
    int_tuple,
    int_tuple_or_auto,
    non_negative_float,
    non_negative_float_or_auto,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_or_auto,
    run_main,
)
from .util.dist import init_distributed, shutdown
from .util.lr_sched import (
    AUTO_PRETRAIN_STEPS,
    auto_epochs,
    auto_warmup_epochs,
    effective_lr,
    optimizer_steps_per_epoch,
    warmup_warning,
)
from .util.preemption import EXIT_PREEMPTED, PREEMPTED_FILE, PreemptionWatch
from .util.run_lock import lock_output_folder
from .util.run_log import RunLog
from .util.train_backend import describe_precision

MAE_BLR = 1.5e-4  # MAE's base lr, for its ViTs at large batches
AUTO_BLR = 6e-3  # the recipes' base lr for the small --model auto (docs/results.md)
DEEPSPEED_CONFIGS = Path(__file__).resolve().parent / "launch" / "deepspeed"  # in the package: in a wheel too
AUTO_MAE = "mae_vit_tiny_patch16"  # --model auto: its encoder is then shaped by AUTO_ARCHITECTURE


def resolve_input_size(requested: tuple[int, ...] | str, data_path: str | None) -> tuple[int, ...]:
    """--input_size auto: the grid a cache was built at (so that no volume is cropped or padded again), else 256."""
    if requested != "auto":
        return requested
    if data_path is not None and is_cache(data_path):
        try:
            return tuple(read_meta(Path(data_path))["preprocess"]["size"])
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"error: --input_size auto: cannot read the grid of the cache {data_path} ({err})") from None
    return (256,)


def resolve_schedule(args: argparse.Namespace, samples: int, world_size: int) -> tuple[int, float, str]:
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


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="mae_vit_large_patch16", choices=("auto", *models.list_models("mae_")),
                       help="auto: the small hybrid ViT of models.vit.AUTO_ARCHITECTURE (convolutional stem, 4 blocks "
                            "of 96, 0.75M parameters) with --patch_size auto and a decoder of its scale "
                            "(models.mae3d.AUTO_DECODER: 2 blocks of 96), the recipes'")
    model.add_argument("--input_size", type=int_tuple_or_auto, default="auto",
                       help="N or D,H,W voxels the model sees; auto: a cache's own grid (volmae-cache --size), else 256")
    model.add_argument("--patch_size", type=patch_size_arg, default=None,
                       help="N or D,H,W voxels, or auto (chosen from the grid: models.patch_embed.auto_patch_size); "
                            "default: 16, or auto with --model auto")
    model.add_argument("--mask_ratio", type=float, default=0.75, help=f"share of patches removed, 0..{MAX_MASK_RATIO}")
    model.add_argument("--mask_type", choices=MASK_TYPES, default="random",
                       help="random patches, or tube: the same in-plane mask on every depth slab")
    model.add_argument("--norm_pix_loss", action="store_true", help="normalise each target patch (MAE's best setting)")
    model.add_argument("--depth", type=positive_int, default=None, help="encoder blocks (default: the model's)")
    model.add_argument("--stem_channels", type=non_negative_int, default=None,
                       help="convolutional stem of this many channels before the patch projection (ConvMAE-style "
                            "masked convolutions; needs power-of-two patches); 0: the reference linear patch "
                            "embedding (default: 0, or the auto architecture's with --model auto)")
    model.add_argument("--contrast_weight", type=non_negative_float, default=None,
                       help="add this times an InfoNCE term between two masked views of each volume, on the mean "
                            "visible token (default 0: MAE alone)")
    model.add_argument("--contrast_temperature", type=positive_float, default=None, help="InfoNCE temperature (default 0.2)")
    model.add_argument("--decoder_embed_dim", type=positive_int, default=None, help="default: the model's (docs/performance.md)")
    model.add_argument("--decoder_depth", type=positive_int, default=None, help="decoder blocks (default: the model's)")
    model.add_argument("--decoder_num_heads", type=positive_int, default=None, help="decoder heads (default: the model's)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--batch_size", type=positive_int, default=4, help="volumes per rank per micro-batch")
    optim.add_argument("--accum_iter", type=positive_int, default=1, help="micro-batches per optimizer step")
    optim.add_argument("--epochs", type=positive_int_or_auto, default="auto",
                       help="passes over the corpus; auto: enough for about 1,500 optimizer steps "
                            "(util.lr_sched.AUTO_PRETRAIN_STEPS: more passes over a small corpus, fewer over a large one)")
    optim.add_argument("--max_steps", type=positive_int, default=None, help="stop after this many optimizer steps "
                       "(the schedule then spans them)")
    optim.add_argument("--blr", type=positive_float, default=None,
                       help="base lr: lr = blr * effective batch / 256 (default: 6e-3 for --model auto, the recipes' "
                            "small model; 1.5e-4, MAE's, for the named ViTs)")
    optim.add_argument("--lr", type=positive_float, default=None, help="absolute lr (overrides --blr)")
    optim.add_argument("--min_lr", type=non_negative_float, default=0.0, help="lr at the end of the cosine schedule")
    optim.add_argument("--warmup_epochs", type=non_negative_float_or_auto, default="auto",
                       help="linear warmup from 0 to --lr, in epochs; auto: a tenth of the run's steps "
                            "(a warning when a warmup takes most of the run)")
    optim.add_argument("--weight_decay", type=non_negative_float, default=0.05, help="AdamW weight decay")
    optim.add_argument("--clip_grad", type=positive_float, default=None, help="max gradient norm (default: no clipping)")
    optim.add_argument("--max_bad_steps", type=non_negative_int, default=20,
                       help="stop after this many skipped (non-finite) steps in a row")
    optim.add_argument("--max_bad_samples", type=float, default=0.1,
                       help="stop, naming them, once more than this share of an epoch's samples failed to load "
                            "(rather than train on a silently shrunken corpus); 1 never stops")

    data = parser.add_argument_group("data")
    data.add_argument("--data_path", default=None,
                      help="a VolMAE cache (built by volmae-cache), or a folder of volumes, .txt of "
                           "paths or .csv with a 'path' column read on the fly; default: synthetic CT "
                           "phantoms written to OUTPUT_DIR/phantoms")
    data.add_argument("--normalize", choices=("auto", "none"), default="auto",
                      help="auto: with --data_flag, standardise inputs with the training images' mean and std "
                           "(inside the model, recorded in its config); volumes keep their windowed [0, 1], "
                           "which pretrained better on LIDC CT than standardised inputs (docs/results.md)")
    data.add_argument("--no_augment", action="store_true",
                      help="no random crop (when --input_size is smaller than a cache's grid), "
                           "left-right flip or intensity jitter")
    data.add_argument("--num_phantoms", type=positive_int, default=24, help="size of the built-in phantom corpus")
    data.add_argument("--data_flag", default=None,
                      help="pretrain on the training split of a MedMNIST set instead (2D or 3D), e.g. adrenalmnist3d")
    data.add_argument("--size", type=positive_int, default=28, help="MedMNIST image size, with --data_flag")
    data.add_argument("--train_samples", type=positive_int, default=None,
                      help="with --data_flag: pretrain on a random subset of N training images (smoke runs)")
    data.add_argument("--data_root", default=DEFAULT_ROOT, help="medmnist root folder, with --data_flag")
    data.add_argument("--num_workers", type=non_negative_int, default=4, help="data-loading processes per rank")
    data.add_argument("--val_fraction", type=float, default=0.0,
                      help="hold this share of the volumes out of training and report their reconstruction loss "
                           "(fixed masks) as val_loss every --val_every epochs; 0: none (default)")
    data.add_argument("--val_every", type=positive_int, default=10, help="epochs between held-out losses")
    add_preprocess_args(parser)

    probe = parser.add_argument_group("probes: frozen-feature kNN and linear AUCs on labelled data, at step 0 and "
                                      "every --probe_every epochs (log.txt, tensorboard)")
    probe.add_argument("--probe_data_flag", default=None, help="a MedMNIST flag: fit on its train split, score on val")
    probe.add_argument("--probe_size", type=positive_int, default=None, help="its image size (default: the pretraining grid)")
    probe.add_argument("--probe_root", default=DEFAULT_ROOT, help="medmnist root folder of --probe_data_flag")
    probe.add_argument("--probe_csv", default=None,
                       help="or your own labelled volumes: a CSV with path, label and split (train/val) columns, "
                            "preprocessed as the pretraining volumes")
    probe.add_argument("--probe_every", type=positive_int, default=10, help="epochs between probes")

    output = parser.add_argument_group("output and checkpoints")
    output.add_argument("--output_dir", default="./output_pretrain",
                        help="checkpoints, encoder.pth, log.txt and reconstruction images; one run at a time")
    output.add_argument("--log_dir", default=None, help="tensorboard folder (default OUTPUT_DIR/tensorboard)")
    output.add_argument("--resume", default="auto",
                        help="auto: OUTPUT_DIR/checkpoint-last.pth when present; a path; or 'none'")
    output.add_argument("--save_every", type=positive_int, default=1, help="epochs between checkpoint-last.pth writes")
    output.add_argument("--save_every_steps", type=non_negative_int, default=0,
                        help="also checkpoint every N optimizer steps (0: off); bounds the work a crash loses")
    output.add_argument("--keep_every", type=non_negative_int, default=20,
                        help="epochs between kept checkpoint-{epoch}.pth (0: never)")
    output.add_argument("--log_every", type=positive_int, default=10, help="optimizer steps between log lines")
    output.add_argument("--vis_every", type=non_negative_int, default=200,
                        help="steps between reconstruction images (0: only at the end)")
    output.add_argument("--seed", type=int, default=0, help="model initialisation, masks and augmentation")

    device = parser.add_argument_group("device and distributed (ranks come from torchrun or SLURM)")
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    device.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX), "
                             "fp32 elsewhere; evaluation on a CPU stays fp32; fp16 uses a GradScaler")
    device.add_argument("--deepspeed", default=None, metavar="CONFIG.json",
                        help=f"train with DeepSpeed ZeRO (configurations: {DEEPSPEED_CONFIGS}); batch size, "
                             "accumulation and clipping still come from the optimisation flags")
    return parser


def resume(args, trainer: Pretrainer, say) -> Path | None:
    """The checkpoint the run resumed from, if any; a checkpoint that cannot be used stops the run in one line."""
    if args.resume in ("none", ""):
        return None
    try:
        if args.resume == "auto":
            return trainer.resume_newest(say)
        path = Path(args.resume)
        if not path.exists():
            raise SystemExit(f"error: --resume {path}: no such file")
        trainer.resume(path)
        return path
    except (CheckpointError, ResumeMismatchError) as err:
        raise SystemExit(f"error: cannot resume: {err}") from None


def patch_size_arg(text: str) -> tuple[int, ...] | str:
    return "auto" if text == "auto" else int_tuple(text)


def resolve_patch_size(args: argparse.Namespace, input_size: tuple[int, ...], stem: bool) -> tuple[int, ...]:
    """--patch_size as given; auto (and the default under --model auto) chosen from the grid; else 16."""
    if args.patch_size == "auto" or (args.patch_size is None and args.model == "auto"):
        return auto_patch_size(input_size, stem)
    return grid(args.patch_size or (REFERENCE_PATCH,), len(input_size))


def build_probe(args: argparse.Namespace, core: torch.nn.Module, config, say) -> FeatureProbe | None:
    """The labelled set of --probe_data_flag or --probe_csv, checked against the model's grid."""
    if not (args.probe_data_flag or args.probe_csv):
        return None
    if args.probe_data_flag and args.probe_csv:
        raise SystemExit("error: give --probe_data_flag or --probe_csv, not both")
    if args.deepspeed:
        raise SystemExit("error: the probes read the whole encoder on one rank; DeepSpeed shards it: drop --probe_*")
    grid = tuple(core.img_size)
    if args.probe_every < 1:
        raise SystemExit("error: --probe_every must be at least 1 (epochs)")
    try:
        if args.probe_csv:
            if config is None:
                raise ProbeDataError("--probe_csv takes volumes; with --data_flag use --probe_data_flag")
            probe_set = csv_probe_set(Path(args.probe_csv), config, grid)
        else:
            probe_set = medmnist_probe_set(args.probe_data_flag, args.probe_size or grid[0], args.probe_root)
    except ProbeDataError as err:
        raise SystemExit(f"error: probe: {err}") from None
    if probe_set.grid != grid or probe_set.splits["train"][0].shape[1] != core.in_chans:
        raise SystemExit(f"error: probe: {probe_set.name} has images of {probe_set.splits['train'][0].shape[1:]}, "
                         f"the model takes ({core.in_chans}, {', '.join(map(str, grid))})")
    say(f"probe: {probe_set.describe()} ({probe_set.task}); kNN (cosine, k=20) and logistic regression on the "
        f"frozen encoder's mean token, every {args.probe_every} epochs")
    return FeatureProbe(probe_set, args.probe_every)


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not 0.0 <= args.max_bad_samples <= 1.0:
        raise SystemExit(f"error: --max_bad_samples is a share of the epoch, 0..1; got {args.max_bad_samples}")
    dist_info = init_distributed(args.device)
    output_dir = Path(args.output_dir)
    make_output_folder(output_dir)
    if dist_info.is_main:
        lock_output_folder(output_dir)
    preemption = PreemptionWatch(output_dir, dist_info.device)
    if dist_info.is_main:  # a requeued run starts afresh: the stop request it answered is done
        preemption.clear()
        (output_dir / PREEMPTED_FILE).unlink(missing_ok=True)
    say = print if dist_info.is_main else (lambda *a, **k: None)
    torch.manual_seed(args.seed + dist_info.rank)
    if args.data_flag:
        dataset, spec, profile = medmnist_pretrain_dataset(args.data_flag, args.size, args.data_root,
                                                           not args.no_augment, args.seed, args.train_samples)
        say(f"training images: {profile.describe()}; augmentation: "
            f"{'none' if args.no_augment else 'flips' if profile.is_label_like else 'flips and intensity jitter'}")
        input_size, in_chans, data_info, config = spec.input_size, spec.in_chans, spec.to_dict(), None
        normalization = profile.normalization if args.normalize == "auto" else {}
        data_path = f"{spec.root}/{spec.filename} (train split)"
    else:
        input_size, in_chans, normalization = grid(resolve_input_size(args.input_size, args.data_path)), 1, {}
        data_path = args.data_path or phantom_corpus(args.output_dir, args.num_phantoms, args.seed, dist_info.is_main)
        dataset, config = build_pretrain_dataset(data_path, input_size,
                                                 preprocess_config_from_args(args, input_size),
                                                 not args.no_augment, args.seed, dist_info.is_main,
                                                 Path(args.output_dir) / "skipped_sources.txt")
        data_info = {"source": "volumes", "data_path": data_path, "volumes": len(dataset)}

    holdout = None
    if args.val_fraction:
        try:
            dataset, holdout = hold_out(dataset, args.val_fraction)
        except ValueError as err:
            raise SystemExit(f"error: --val_fraction: {err}") from None
        if args.val_every < 1:
            raise SystemExit("error: --val_every must be at least 1 (epochs)")

    overrides = {"img_size": input_size, "in_chans": in_chans, "norm_pix_loss": args.norm_pix_loss, **normalization}
    if args.model == "auto":
        overrides.update({**AUTO_ARCHITECTURE, **AUTO_DECODER})
    for key in ("depth", "stem_channels", "decoder_embed_dim", "decoder_depth", "decoder_num_heads",
                "contrast_weight", "contrast_temperature"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides["patch_size"] = resolve_patch_size(args, input_size, overrides.get("stem_channels", 0) > 0)
    model_name = AUTO_MAE if args.model == "auto" else args.model
    try:
        core = models.create_model(model_name, **overrides)
        core.num_visible(args.mask_ratio, args.mask_type)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    effective_batch = args.batch_size * args.accum_iter * dist_info.world_size
    blr = args.blr if args.blr is not None else (AUTO_BLR if args.model == "auto" else MAE_BLR)
    epochs, warmup_epochs, schedule_note = resolve_schedule(args, len(dataset), dist_info.world_size)
    # the flags with every `auto` resolved: what the loop reads (PretrainConfig) and every checkpoint records
    resolved = argparse.Namespace(**{**vars(args), "model": model_name, "data_path": data_path, "blr": blr,
                                 "lr": effective_lr(blr, args.lr, effective_batch), "epochs": epochs,
                                 "warmup_epochs": warmup_epochs})
    saved_with = PretrainingCheckpoint(model_name, core.config, data_info,
                                       config.to_dict() if config is not None else None, plain_args(resolved))
    probe = build_probe(resolved, core, config, say)
    trainer = Pretrainer(PretrainConfig.from_flags(resolved), core, dataset, dist_info, saved_with, preemption, probe,
                         holdout)
    checkpoint = resume(resolved, trainer, say)
    if checkpoint is not None:
        say(f"resumed from {checkpoint} at step {trainer.step}")

    n_params = sum(p.numel() for p in core.parameters() if p.requires_grad)
    n_decoder = sum(p.numel() for name, p in core.named_parameters()
                    if p.requires_grad and name.startswith(PRETRAINING_ONLY_PREFIXES))
    say(f"model {resolved.model}: {n_params / 1e6:.2f}M trainable parameters (encoder {(n_params - n_decoder) / 1e6:.2f}M, "
        f"decoder {n_decoder / 1e6:.2f}M), grid {core.grid_size}, "
        f"{core.num_visible(resolved.mask_ratio, resolved.mask_type)}/{core.num_patches} patches visible")
    grid_note = f", grid {config.size}, {config.resample}" if config is not None else ""
    held = f", {len(holdout)} held out for val_loss" if holdout is not None else ""
    kind = type(getattr(dataset, "dataset", dataset)).__name__
    say(f"data: {len(dataset)} volumes{held} from {resolved.data_path} ({kind}{grid_note}) -> {input_size}; "
        f"{trainer.steps_per_epoch} steps/epoch, {trainer.total_steps} steps in all")
    engine = f"DeepSpeed ZeRO-{trainer.backend.config.get('zero_optimization', {}).get('stage', 0)}" \
        if resolved.deepspeed else ("DDP" if dist_info.distributed else "single process")
    say(f"{dist_info.world_size} rank(s) on {dist_info.device} ({engine}), precision "
        f"{trainer.backend.precision if resolved.deepspeed else describe_precision(resolved.precision, dist_info.device, cpu_bf16=True)}; "
        f"effective batch {effective_batch}, lr {resolved.lr:.3e}"
        f"{'; threads ' + dist_info.cpu_threads if dist_info.cpu_threads else ''}")
    say(f"schedule: {resolved.epochs} epochs, warmup {resolved.warmup_epochs:g} epochs ({trainer.warmup_steps} steps){schedule_note}")
    if warning := warmup_warning(trainer.warmup_steps, trainer.total_steps):
        say(warning)

    run_log = RunLog(output_dir, resolved.log_dir or output_dir / "tensorboard", enabled=dist_info.is_main)
    try:
        trainer.train(run_log)
    except (NonFiniteLossError, UnreadableDataError) as err:
        run_log.close()
        shutdown()
        raise SystemExit(f"error: {err}") from None
    except Preempted as stop:
        run_log.close()
        say(str(stop))
        shutdown()
        return EXIT_PREEMPTED
    run_log.close()
    failed = trainer.all_failed_sources()
    if failed:
        say(f"warning: {len(failed)} volume(s) could not be loaded during training and were skipped")
    resume_files = "deepspeed/ (resume)" if resolved.deepspeed else "checkpoint-last.pth"
    say(f"{trainer.nonfinite_steps} of {trainer.step} steps skipped for a non-finite loss or gradient")
    say(f"done: {output_dir} holds {resume_files}, model.pth, encoder.pth, log.txt, reconstruction.png, "
        f"tensorboard in {resolved.log_dir or output_dir / 'tensorboard'}")
    shutdown()
    return 0


def cli() -> None:
    """The `volmae-pretrain` command: the same as `python main_pretrain.py`."""
    sys.exit(run_main(main, get_args_parser().parse_args(sys.argv[1:])))


if __name__ == "__main__":
    cli()
