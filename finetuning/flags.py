"""main_finetune.py's command line; flags left unset take the recipe's values (finetuning.recipes)."""
import argparse
import math

from ..datasets.finetune_augment import PRESETS
from ..datasets.medmnist_data import DEFAULT_ROOT
from ..util.cli import (
    HelpFormatter,
    int_tuple_or_auto,
    label_columns,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    positive_int_or_auto,
    seed_list,
    share,
)
from ..util.errors import UsageError
from ..volumes.flags import add_preprocess_args
from ..volumes.preprocess import AUTO
from .recipes import PRETRAINED_LAYER_DECAY, RECIPES
from .search import SEARCH_MODES
from .setups import SETUPS


def get_args_parser(description: str = __doc__) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, epilog=recipe_table())
    data = parser.add_argument_group("data")
    data.add_argument("--setup", choices=tuple(SETUPS), default="medmnist", help="data protocol and default recipe")
    data.add_argument("--data_flag", default="adrenalmnist3d", help="any MedMNIST flag, 3D or 2D")
    data.add_argument("--size", type=positive_int, default=28, help="3D: 28 or 64; 2D: 28, 64, 128 or 224")
    data.add_argument("--data_root", default=DEFAULT_ROOT, help="medmnist root folder")
    data.add_argument("--download", action="store_true", help="download missing files with the medmnist package")
    data.add_argument("--num_workers", type=non_negative_int, default=0, help="the data are in memory: 0 is usually fastest")
    data.add_argument("--train_samples", type=positive_int, default=None,
                      help="train on a random subset of N training samples (label-efficiency studies, smoke runs)")
    meta = parser.add_argument_group("labels CSV (volumes and SLIViT setups)")
    meta.add_argument("--meta", default=None, help="labels CSV: path (volume file or DICOM folder; SLIViT also slice "
                      "folders, 2D images for slivit_backbone), label columns, the patient column, optional split "
                      "(train/val/test)")
    meta.add_argument("--label", type=label_columns, default=None, help="comma-separated label column(s): one 0/1 column is binary, "
                      "integers or names multi-class, several 0/1 columns multi-label")
    meta.add_argument("--group", default="pid", help="the patient column: no patient is in two splits "
                      "(default %(default)s); a split column, if present, wins")
    meta.add_argument("--task", choices=("auto", "binary", "multiclass", "multilabel", "reg"), default="auto",
                      help="auto: from the label columns (one 0/1 column binary, integers multi-class, several "
                           "0/1 columns multi-label)")
    meta.add_argument("--split_ratio", default=None, help="train,val,test shares of the patients when there is no "
                      "split column (default: volumes 0.7,0.15,0.15; slivit 0.85,0.15,0)")
    meta.add_argument("--split_seed", type=int, default=0, help="seed of the patient split (default %(default)s)")
    meta.add_argument("--label_case", choices=("refuse", "sensitive"), default="refuse",
                      help="class names that differ only by case (Yes, yes): refused, naming them; or kept as "
                           "separate classes (labels are stripped of spaces either way)")
    meta.add_argument("--train_fraction", type=share, default=None,
                      help="train on this fraction of the training patients (label-efficiency studies): a random "
                           "draw per seed, among patients with and without a positive label separately")
    volumes = parser.add_argument_group("volumes setup")
    volumes.add_argument("--input_size", type=int_tuple_or_auto, default="auto",
                         help="grid N or D,H,W; auto: chosen with the resampling from the headers (default)")
    volumes.add_argument("--volume_cache", default=None,
                         help="HDF5 cache of the preprocessed volumes, shared by runs on the same CSV and settings "
                              "(default OUTPUT_DIR/volume_cache)")
    volumes.add_argument("--cache_workers", type=positive_int, default=1, help="processes that decode volumes into the cache")
    volumes.add_argument("--folds", type=non_negative_int, default=0,
                         help="K >= 2: cross-validation (finetuning.cross_validation): the train and val patients in K "
                              "folds by patient, stratified by label; every choice on their pooled out-of-fold "
                              "predictions; the final model (OUTPUT_DIR/final_model) the ensemble of the K fold "
                              "models, scored once on test. 0: one train/val split (default)")
    add_preprocess_args(parser, default_resample=AUTO, allow_auto=True)
    slivit = parser.add_argument_group("SLIViT setups")
    slivit.add_argument("--split_file", default=None, help="MedMNIST split file (split,index,image_id) for a flag")
    slivit.add_argument("--slices", type=positive_int, default=None, help="slices per volume (default: the flag's depth, or 28)")
    slivit.add_argument("--sparsing", choices=("eq", "mid"), default="eq", help="evenly spaced or middle slices")
    slivit.add_argument("--slice_size", type=positive_int, default=256, help="each slice resized to S x S")
    slivit.add_argument("--backbone", default=None, help="timm backbone: convnext_tiny (slivit), resnet50 (vitmednet3d)")
    slivit.add_argument("--fe_path", default=None, help="SLIViT: backbone.pth from --setup slivit_backbone")
    slivit.add_argument("--elastic", type=non_negative_float, default=0.0, help="vitmednet setup: elastic deformation strength")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit3d_tiny_patch4", help="auto (the --finetune encoder's architecture, or "
                       "models.vit.AUTO_ARCHITECTURE with a patch size chosen from the grid), vit3d_*, vit_*, resnet18_3d, resnet50_3d, medvit3d_*, "
                       "slivit, vitmednet3d, timm_vit_base_patch16_224")
    model.add_argument("--patch_size", type=positive_int, default=None, help="override the model's patch size")
    model.add_argument("--global_pool", choices=("avg", "token", "concat", "attention"), default="avg",
                       help="ViT feature: mean of patch tokens (default), the class token, both (TANGERINE's), or a "
                            "learned query attending to the patch tokens")
    model.add_argument("--drop_path", type=non_negative_float, default=None, help="stochastic depth rate (recipe default)")
    model.add_argument("--head_norm", choices=("batch", "none"), default="batch",
                       help="ViTs: batch norm (no affine) before the head, MAE's linear-probe trick; without it a "
                            "small ViT can sit at the class prior for many epochs (docs/finetuning.md: the MedMNIST recipe)")
    model.add_argument("--finetune", default=None, help="MAE checkpoint or encoder.pth to start from")
    model.add_argument("--mae_loss_weight", type=non_negative_float, default=0.0,
                       help="keep the MAE's masked reconstruction loss while fine-tuning, at this weight against the "
                            "classification loss (SSAT); --finetune must then be the MAE with its decoder (model.pth)")
    model.add_argument("--mae_mask_ratio", type=float, default=None,
                       help="mask ratio of that loss (default: the pretraining's)")
    model.add_argument("--pretrained", action="store_true", help="timm models: timm's weights from the local cache")
    model.add_argument("--pretrained_file", default=None, help="timm models: weights from this local file")

    optim = parser.add_argument_group("optimisation (a flag left unset takes the recipe's value: see the table below)")
    optim.add_argument("--recipe", choices=tuple(RECIPES), default=None, help="default: the setup's")
    optim.add_argument("--optimizer", choices=("adamw", "adam"), help="optimizer (default: the recipe's)")
    optim.add_argument("--schedule", choices=("cosine", "multistep", "constant"), help="lr schedule (default: the recipe's)")
    optim.add_argument("--patience", type=positive_int_or_auto, default=None,
                       help="early stop after N epochs without a lower val loss; auto: a third of the epochs, at "
                            "least 10 (default: the recipe's, else auto for --setup volumes, else never)")
    optim.add_argument("--epochs", type=positive_int, help="passes over the training split (default: the recipe's)")
    optim.add_argument("--batch_size", type=positive_int, help="per rank (default: the recipe's)")
    optim.add_argument("--blr", type=non_negative_float, help="lr = blr * effective batch / 256 (default: the recipe's)")
    optim.add_argument("--lr", type=non_negative_float, help="absolute lr (overrides --blr; 0: evaluate the initial weights)")
    optim.add_argument("--min_lr", type=non_negative_float, default=1e-6, help="lr at the end of the cosine schedule")
    optim.add_argument("--layer_decay", type=share, help=f"layer-wise lr decay (default: {PRETRAINED_LAYER_DECAY} with "
                       "--finetune, else 1)")
    optim.add_argument("--probe_epochs", type=non_negative_int, default=0,
                       help="linear-probe-then-fine-tune (LP-FT): for the first N epochs only the head trains, on the "
                            "frozen encoder, so that a random head does not distort pretrained features; then every "
                            "layer trains. N >= --epochs: a head on frozen features (default: 0, every layer from "
                            "the start)")
    optim.add_argument("--weight_decay", type=non_negative_float, help="weight decay (default: the recipe's)")
    optim.add_argument("--warmup_epochs", type=non_negative_float, help="linear lr warmup (default: the recipe's)")
    optim.add_argument("--smoothing", type=non_negative_float, help="label smoothing (default: the recipe's)")
    optim.add_argument("--class_weights", choices=("none", "balanced"), default="none",
                       help="balanced: weigh the loss by inverse class frequency")
    optim.add_argument("--augment", choices=("auto", *PRESETS), default=None,
                       help="auto: chosen from the training images (masks and label maps: flips; grey levels: "
                            "full); none; flips; geometric (flips, 90-degree turns, nearest-neighbour affine); full "
                            "(the setup's pipeline: affine, noise, gamma)")
    optim.add_argument("--normalize", choices=("auto", "none"), default="auto",
                       help="ViTs from scratch: auto standardises the input with the training images' mean and std "
                            "(inside the model); with --finetune the encoder's own statistics always apply")
    optim.add_argument("--no_augment", dest="augment", action="store_const", const="none", help="--augment none")
    optim.add_argument("--no-augment", dest="augment", action="store_const", const="none",
                       help=argparse.SUPPRESS)  # the spelling before --no_augment, kept working, not shown
    optim.add_argument("--clip_grad", type=positive_float, default=None, help="max gradient norm (default: no clipping)")
    optim.add_argument("--search", choices=("auto", *SEARCH_MODES), default="auto",
                       help="settings left unset (lr, augmentation) chosen on validation among a few candidates "
                            "(finetuning.search): fallback tries them in turn until one leaves the class prior and "
                            "clears the PCA floor on validation; full trains all and keeps the best validation AUC; "
                            "auto: fallback for --setup volumes, none for the reference setups' published recipes")
    optim.add_argument("--search_budget", type=positive_int, default=4, help="candidates tried at most per seed")
    optim.add_argument("--seeds", type=seed_list, default=[0],
                       help="comma-separated; each seed is a full run, then mean and std")

    output = parser.add_argument_group("output")
    output.add_argument("--output_dir", default="./output_finetune",
                        help="best.pth, results.json, scores, curves and log.txt; one run at a time, and a folder "
                             "holding a finished run is refused unless --overwrite")
    output.add_argument("--overwrite", action="store_true",
                        help="replace the finished run in OUTPUT_DIR (its results.json goes first)")
    output.add_argument("--log_dir", default=None, help="tensorboard folder (default OUTPUT_DIR/tensorboard)")
    output.add_argument("--bootstrap", type=non_negative_int, default=1000, help="bootstrap rounds for the AUC confidence interval")
    output.add_argument("--explain", type=non_negative_int, default=0, metavar="N",
                        help="save explanations (attention rollout / Grad-CAM) of the first N test samples")

    device = parser.add_argument_group("device and distributed (ranks come from torchrun or SLURM)")
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    device.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (bf16 fine-tuning lost small lesions there: "
                             "docs/performance.md); fp16 uses a GradScaler")
    device.add_argument("--deepspeed", default=None, metavar="CONFIG.json", help="train with DeepSpeed ZeRO-1/2")
    return parser


def recipe_table() -> str:
    """The recipes' values, shown under --help: they are the defaults of the optimisation flags."""
    lines = ["recipes (the setup chooses one; --recipe overrides):"]
    for name, values in RECIPES.items():
        shown = ", ".join(f"{key} {value}" for key, value in values.items() if value is not None)
        lines.append(f"  {name}: {shown}")
    return "\n".join(lines)


def parse_args(argv: list[str], description: str = __doc__) -> argparse.Namespace:
    """The flags, those left unset filled with the chosen recipe's values; `given` lists the recipe settings the
    user set (finetuning.search never searches them)."""
    parsed = vars(get_args_parser(description).parse_args(argv))
    recipe = parsed["recipe"] or SETUPS[parsed["setup"]].recipe
    filled = {key: value if parsed.get(key) is None else parsed[key] for key, value in RECIPES[recipe].items()}
    patience = filled.get("patience", parsed["patience"])
    if patience is None and SETUPS[parsed["setup"]].early_stop:
        patience = AUTO
    if patience == AUTO:
        patience = auto_patience(filled["epochs"])
    given = sorted(key for key in RECIPES[recipe] if parsed.get(key) is not None)
    return argparse.Namespace(**{**parsed, **filled, "recipe": recipe, "given": given, "patience": patience})


def check_flags(args: argparse.Namespace) -> None:
    """The flag combinations argparse cannot refuse alone, refused before any folder is made or data is read.
    Cross-validation replaces seeds (k folds cost what k seeds cost) and needs patients to deal out."""
    if not args.folds:
        return
    if args.folds < 2:
        raise UsageError(f"--folds {args.folds}: cross-validation needs at least 2 folds (0: none)")
    if args.setup != "volumes":
        raise UsageError("--folds is for --setup volumes: the reference setups keep their published splits")
    if len(args.seeds) > 1:
        raise UsageError("--folds replaces --seeds: give one seed (the folds' deal and the initialisation)")


def auto_patience(epochs: int) -> int:
    """A third of the schedule, at least 10 epochs. Replaying the LIDC study's validation curves, this saved
    26-53% of the epochs and changed the chosen validation AUC of one run in twelve by 0.009 (docs/finetuning.md)."""
    return max(10, math.ceil(epochs / 3))
