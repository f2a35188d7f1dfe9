"""The flags of main_pretrain.py: MAE's names (--model --batch_size --accum_iter --blr --epochs --warmup_epochs
--mask_ratio --norm_pix_loss --output_dir --log_dir --resume --num_workers) and VolMAE's, in groups."""
import argparse
from pathlib import Path

from .. import models
from ..datasets.medmnist_data import DEFAULT_ROOT
from ..models.mae3d import MASK_TYPES, MAX_MASK_RATIO
from ..util.cli import (
    HelpFormatter,
    int_tuple,
    int_tuple_or_auto,
    non_negative_float,
    non_negative_float_or_auto,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_or_auto,
)
from ..volumes.flags import add_preprocess_args

DEEPSPEED_CONFIGS = Path(__file__).resolve().parent.parent / "launch" / "deepspeed"  # in the package: in a wheel too


def patch_size_arg(text: str) -> tuple[int, ...] | str:
    return "auto" if text == "auto" else int_tuple(text)


def get_args_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
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
