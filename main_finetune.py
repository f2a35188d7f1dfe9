"""Fine-tune a classifier, from a pretrained MAE encoder or from scratch, in the reference setups.

    python main_finetune.py --data_flag adrenalmnist3d --size 28 --model vit3d_tiny_patch4 \\
        --finetune runs/mae/checkpoint-last.pth --output_dir runs/ft
    python main_finetune.py --data_flag adrenalmnist3d --model resnet18_3d --recipe medmnist ...
    python main_finetune.py --setup vitmednet --data_flag adrenalmnist3d --size 64 --model vitmednet3d ...
    python main_finetune.py --setup slivit --meta meta.csv --label AMD --model slivit --fe_path backbone.pth ...
    python main_finetune.py --setup slivit_backbone --meta kermany.csv --label NORMAL,DRUSEN,CNV,DME ...

Setups: medmnist (MedMNIST 2D/3D as published), vitmednet (MedMNIST3D with 3DViTMedNet's recipe and
augmentation), slivit (slice stacks from a meta CSV of volumes, or from a MedMNIST3D flag),
slivit_backbone (SLIViT's 2D ConvNeXt pretraining). The checkpoint kept is the epoch with the best
validation AUC (R2 for regression); the test split is evaluated once, with it. Metrics are the medmnist
Evaluator's; on MedMNIST's own splits the scores are also written in its CSV format.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from medmnist import Evaluator
from medmnist.info import DEFAULT_ROOT

import models
from datasets.medmnist_data import RAW_SCALE, ArrayDataset, MedMNISTNotFound, MedMNISTSpec, subset_indices
from datasets.task_data import (TaskData, medmnist_task, meta_image_task, meta_volume_task,
                                slivit_medmnist_task)
from datasets.data_profile import DataProfile, choose_augment, profile_images
from datasets.transforms import PRESETS, VITMEDNET_AUGMENT, AugmentConfig, describe, preset
from engine_finetune import Finetuner
from models.load_pretrained import CheckpointMismatchError, load_encoder
from models.patch_embed import auto_patch_size
from models.vit import AUTO_ARCHITECTURE
from util.checkpoint import atomic_save, load_checkpoint, plain_args
from util.dist import init_distributed, shutdown
from util.explain import explain_predictions
from util.lr_sched import effective_lr
from util.metrics import REGRESSION, classification_metrics, confusion, regression_metrics, stays_at_prior
from util.plotting import confusion_figure, plt, roc_figure
from util.run_log import RunLog, cpu_seconds

HEADLINE = {False: ("auc", "acc"), True: ("r2", "pearson")}

SETUPS = ("medmnist", "vitmednet", "slivit", "slivit_backbone")
SETUP_RECIPES = {"medmnist": "mae", "vitmednet": "vitmednet", "slivit": "slivit", "slivit_backbone": "slivit"}
# Layer-wise lr decay only makes sense for pretrained layers; a model trained from scratch gets one lr.
PRETRAINED_LAYER_DECAY = 0.75
RECIPES = {
    # MAE fine-tuning (facebookresearch/mae), re-tuned on AdrenalMNIST3D and BreastMNIST (README: recipes):
    # AdamW, layer-wise lr decay when pretrained (None: 0.75 with --finetune, 1.0 without), warmup + cosine
    "mae": {"optimizer": "adamw", "schedule": "cosine", "blr": 2.4e-3, "lr": None, "layer_decay": None,
            "weight_decay": 0.05, "warmup_epochs": 5, "smoothing": 0.0, "drop_path": 0.1, "augment": "auto",
            "batch_size": 32, "epochs": 30},
    # The official MedMNIST baselines: Adam 1e-3, x0.1 at 50% and 75% of 100 epochs, batch 32, no augmentation
    "medmnist": {"optimizer": "adam", "schedule": "multistep", "blr": None, "lr": 1e-3, "layer_decay": 1.0,
                 "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "none",
                 "batch_size": 32, "epochs": 100},
    # 3DViTMedNet (seed 000): Adam 1e-5, batch 6, 100 epochs, its augmentation pipeline
    "vitmednet": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 1e-5, "layer_decay": 1.0,
                  "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "auto",
                  "batch_size": 6, "epochs": 100},
    # SLIViT (seed 003): Adam 5e-5, batch 4, early stopping on validation loss with patience 5
    "slivit": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 5e-5, "layer_decay": 1.0,
               "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": "none",
               "batch_size": 4, "epochs": 100, "patience": 5},
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--setup", choices=SETUPS, default="medmnist", help="data protocol and default recipe")
    data.add_argument("--data_flag", default="adrenalmnist3d", help="any MedMNIST flag, 3D or 2D")
    data.add_argument("--size", type=int, default=28, help="3D: 28 or 64; 2D: 28, 64, 128 or 224")
    data.add_argument("--data_root", default=DEFAULT_ROOT, help=f"medmnist root folder (default {DEFAULT_ROOT})")
    data.add_argument("--download", action="store_true", help="download missing files with the medmnist package")
    data.add_argument("--num_workers", type=int, default=0, help="the data are in memory: 0 is usually fastest")
    data.add_argument("--train_samples", type=int, default=None,
                      help="train on a random subset of N training samples (label-efficiency studies, smoke runs)")
    slivit = parser.add_argument_group("SLIViT setups")
    slivit.add_argument("--meta", default=None, help="meta CSV: pid, path (volume, DICOM or slice folder; 2D "
                        "images for slivit_backbone), label columns, optional split (train/val/test)")
    slivit.add_argument("--label", default=None, help="comma-separated label column(s)")
    slivit.add_argument("--task", choices=("auto", "binary", "multiclass", "multilabel", "reg"), default="auto")
    slivit.add_argument("--split_ratio", default="0.85,0.15,0", help="train,val,test by patient when no split column")
    slivit.add_argument("--split_file", default=None, help="MedMNIST split file (split,index,image_id) for a flag")
    slivit.add_argument("--slices", type=int, default=None, help="slices per volume (default: the flag's depth, or 28)")
    slivit.add_argument("--sparsing", choices=("eq", "mid"), default="eq", help="evenly spaced or middle slices")
    slivit.add_argument("--slice_size", type=int, default=256, help="each slice resized to S x S")
    slivit.add_argument("--backbone", default=None, help="timm backbone: convnext_tiny (slivit), resnet50 (vitmednet3d)")
    slivit.add_argument("--fe_path", default=None, help="SLIViT: backbone.pth from --setup slivit_backbone")
    slivit.add_argument("--elastic", type=float, default=0.0, help="vitmednet setup: elastic deformation strength")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="vit3d_tiny_patch4", help="auto (the --finetune encoder's architecture, or "
                       "models.vit.AUTO_ARCHITECTURE with a patch size chosen from the grid), vit3d_*, vit_*, resnet18_3d, resnet50_3d, medvit3d_*, "
                       "slivit, vitmednet3d, timm_vit_base_patch16_224")
    model.add_argument("--patch_size", type=int, default=None, help="override the model's patch size")
    model.add_argument("--global_pool", choices=("avg", "token", "concat"), default="avg",
                       help="ViT feature: mean of patch tokens (default), the class token, or both (TANGERINE)")
    model.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (recipe default)")
    model.add_argument("--head_norm", choices=("batch", "none"), default="batch",
                       help="ViTs: batch norm (no affine) before the head, MAE's linear-probe trick; without it a "
                            "small ViT can sit at the class prior for many epochs (README: recipes)")
    model.add_argument("--finetune", default=None, help="MAE checkpoint or encoder.pth to start from")
    model.add_argument("--pretrained", action="store_true", help="timm models: timm's weights from the local cache")
    model.add_argument("--pretrained_file", default=None, help="timm models: weights from this local file")

    optim = parser.add_argument_group("optimisation (defaults from --recipe)")
    optim.add_argument("--recipe", choices=tuple(RECIPES), default=None, help="default: the setup's")
    optim.add_argument("--optimizer", choices=("adamw", "adam"))
    optim.add_argument("--schedule", choices=("cosine", "multistep", "constant"))
    optim.add_argument("--patience", type=int, default=None, help="early stop after N epochs without a lower val loss")
    optim.add_argument("--epochs", type=int)
    optim.add_argument("--batch_size", type=int, help="per rank")
    optim.add_argument("--blr", type=float, help="lr = blr * effective batch / 256 (cosine recipes)")
    optim.add_argument("--lr", type=float, help="absolute lr (overrides --blr)")
    optim.add_argument("--min_lr", type=float, default=1e-6)
    optim.add_argument("--layer_decay", type=float, help=f"default: {PRETRAINED_LAYER_DECAY} with --finetune, else 1")
    optim.add_argument("--weight_decay", type=float)
    optim.add_argument("--warmup_epochs", type=float)
    optim.add_argument("--smoothing", type=float, help="label smoothing")
    optim.add_argument("--class_weights", choices=("none", "balanced"), default="none")
    optim.add_argument("--augment", choices=("auto", *PRESETS), default=None,
                       help="auto: chosen from the training images (masks and label maps: flips; grey levels: "
                            "full); none; flips; geometric (flips, 90-degree turns, nearest-neighbour affine); full "
                            "(the setup's pipeline: affine, noise, gamma)")
    optim.add_argument("--normalize", choices=("auto", "none"), default="auto",
                       help="ViTs from scratch: auto standardises the input with the training images' mean and std "
                            "(inside the model); with --finetune the encoder's own statistics always apply")
    optim.add_argument("--no-augment", dest="augment", action="store_const", const="none", help="--augment none")
    optim.add_argument("--clip_grad", type=float, default=None)
    optim.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto")
    optim.add_argument("--deepspeed", default=None, metavar="CONFIG.json", help="train with DeepSpeed ZeRO-1/2")

    run = parser.add_argument_group("run")
    run.add_argument("--seeds", default="0", help="comma-separated; each seed is a full run, then mean and std")
    run.add_argument("--output_dir", default="./output_finetune")
    run.add_argument("--log_dir", default=None, help="tensorboard folder (default OUTPUT_DIR/tensorboard)")
    run.add_argument("--bootstrap", type=int, default=1000, help="bootstrap rounds for the AUC confidence interval")
    run.add_argument("--explain", type=int, default=0, metavar="N",
                     help="save explanations (attention rollout / Grad-CAM) of the first N test samples")
    run.add_argument("--device", default="auto")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags left unset take the chosen recipe's values."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.recipe = args.recipe or SETUP_RECIPES[args.setup]
    for key, value in RECIPES[args.recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


VIT_PREFIXES = ("vit3d", "vit2d", "vit_")


def pretrained_config(path: str | None) -> dict | None:
    """The model_config a --finetune checkpoint carries (VolMAE checkpoints do; others, e.g. TANGERINE's, not)."""
    if not path:
        return None
    try:
        config = load_checkpoint(path).get("model_config")
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise SystemExit(f"error: --finetune {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    return config if isinstance(config, dict) else None


def auto_architecture(args: argparse.Namespace, data: TaskData, encoder: dict | None) -> tuple[str, dict]:
    """`--model auto`: a ViT shaped as the pretrained encoder of --finetune; without one, the small hybrid ViT
    of models.vit.AUTO_ARCHITECTURE with the patch size chosen from the data's grid, as `main_pretrain.py
    --model auto` builds it, so that a from-scratch baseline has the MAE's architecture."""
    name = "vit3d" if len(data.input_size) == 3 else "vit2d"
    if not args.finetune:
        stem = AUTO_ARCHITECTURE["stem_channels"] > 0
        return name, {**AUTO_ARCHITECTURE, "patch_size": list(auto_patch_size(data.input_size, stem))}
    keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "stem_channels")
    if encoder is None or not all(k in encoder for k in keys[:-1]):
        raise SystemExit(f"error: --model auto takes the architecture from a VolMAE checkpoint's model_config; "
                         f"{args.finetune} has none: name the model (e.g. --model vit3d_base_patch16)")
    return name, {k: encoder.get(k, 0) if k == "stem_channels" else encoder[k] for k in keys}


def input_normalization(args: argparse.Namespace, profile: DataProfile, encoder: dict | None) -> dict:
    """ViTs standardise their [0, 1] input inside the model: with the pretrained encoder's statistics (it
    learned with them), else, with --normalize auto, the training images' mean and std. Other models
    (convolutional, with batch norm) take [0, 1] as it is."""
    if not args.model.startswith(VIT_PREFIXES):
        return {}
    if args.finetune:
        return {k: encoder[k] for k in ("input_mean", "input_std") if encoder and k in encoder}
    return profile.normalization if args.normalize == "auto" else {}


def build_model(args: argparse.Namespace, data: TaskData) -> torch.nn.Module:
    outputs = len(data.class_names)
    name = args.model
    common = {"in_chans": data.in_chans, "num_classes": outputs}
    if name.startswith(VIT_PREFIXES):
        options = {**common, **args.architecture, **args.normalization, "head_norm": args.head_norm == "batch",
                   "img_size": data.input_size, "drop_path_rate": args.drop_path,
                   "global_pool": args.global_pool, **({"patch_size": args.patch_size} if args.patch_size else {})}
    elif name.startswith("timm_"):
        options = {**common, "drop_path_rate": args.drop_path, "pretrained": args.pretrained,
                   "pretrained_file": args.pretrained_file}
    elif name in ("slivit", "slivit_backbone"):
        options = {**common, "img_size": data.input_size, "backbone": args.backbone or "convnext_tiny",
                   "pretrained": args.pretrained, "drop_path_rate": args.drop_path,
                   **({"fe_path": args.fe_path} if name == "slivit" and args.fe_path else {})}
    elif name == "vitmednet3d":
        options = {**common, "img_size": data.input_size, "backbone": args.backbone or "resnet50",
                   "drop_path_rate": args.drop_path}
    else:
        options = {**common, "drop_path_rate": args.drop_path} if name.startswith("medvit3d") else common
    model = models.create_model(name, **options)
    if model.spatial_dims != len(data.input_size):
        raise SystemExit(f"error: {name} is a {model.spatial_dims}D model and the data are {len(data.input_size)}D")
    return model


def build_task_data(args: argparse.Namespace, output_dir: Path) -> TaskData:
    labels = [c.strip() for c in (args.label or "").split(",") if c.strip()]
    ratio = tuple(float(v) for v in args.split_ratio.split(","))
    if args.setup == "slivit_backbone":
        if not args.meta or not labels:
            raise SystemExit("error: --setup slivit_backbone needs --meta and --label (the one-hot pathology columns)")
        return meta_image_task(Path(args.meta), labels, ratio, args.slice_size, 0, output_dir)
    if args.setup == "slivit" and args.meta:
        if not labels:
            raise SystemExit("error: --setup slivit with --meta needs --label")
        return meta_volume_task(Path(args.meta), labels, args.task, ratio, args.slices or 28, args.sparsing,
                                args.slice_size, 0, output_dir)
    spec = MedMNISTSpec(args.data_flag, args.size, args.data_root)
    if args.setup == "slivit":
        return slivit_medmnist_task(spec, args.slices or args.size, args.sparsing, args.slice_size, args.download,
                                    args.split_file)
    if args.setup == "vitmednet" and not spec.is_3d:
        raise SystemExit(f"error: the 3DViTMedNet setup takes MedMNIST3D flags; {spec.flag} is 2D")
    return medmnist_task(spec, args.download)


def write_split_outputs(output_dir: Path, split: str, data: TaskData, labels: np.ndarray, scores: np.ndarray,
                        seed: int, bootstrap: int) -> dict:
    """Metrics and scores; on MedMNIST's own splits also the Evaluator's CSV (and its numbers, as a check);
    for test, the confusion matrix and ROC figures."""
    if data.task == REGRESSION:
        metrics = regression_metrics(labels, scores, data.class_names)
    else:
        metrics = classification_metrics(labels, scores, data.task, data.class_names, bootstrap)
        metrics["at_prior"] = stays_at_prior(scores, data.task)
    table = pd.DataFrame(scores, columns=[f"score_{name}" for name in data.class_names])
    for i, column in enumerate(np.asarray(labels).T):
        table.insert(i, f"label_{i}" if labels.shape[1] > 1 else "label", column)
    table.to_csv(output_dir / f"{split}_scores.csv", index_label="index")
    if data.medmnist is not None:
        spec = data.medmnist
        evaluator = Evaluator(spec.flag, split, size=spec.size, root=spec.root)
        official = evaluator.evaluate(scores, save_folder=str(output_dir), run=f"seed{seed}")
        metrics["evaluator"] = {"auc": float(official.AUC), "acc": float(official.ACC)}
    if split == "test" and data.task != REGRESSION:
        matrix = confusion(labels, scores, data.task, len(data.class_names))
        if matrix is not None:
            figure = confusion_figure(matrix, data.class_names, f"{data.data.get('flag', 'test')} test")
            figure.savefig(output_dir / "confusion_matrix.png", dpi=120)
            plt.close(figure)
        figure = roc_figure(labels, scores, data.task, data.class_names, "test")
        figure.savefig(output_dir / "roc_curve.png", dpi=120)
        plt.close(figure)
    return metrics


def write_explanations(output_dir: Path, trainer: Finetuner, data: TaskData, scores: np.ndarray, count: int) -> None:
    """Explanations of the first `count` test samples, for the class each was predicted: explain/testNNN*."""
    images = torch.from_numpy(data.splits["test"][0][:count]).float() * RAW_SCALE
    explain_predictions(trainer.core.cpu(), images, scores[:count], data.task, data.class_names,
                        output_dir / "explain", [f"test{i:03d}" for i in range(len(images))])


def resolve_augment(args: argparse.Namespace, profile: DataProfile) -> tuple[AugmentConfig, dict]:
    """The run's augmentation, and a record of what was chosen and why (printed and kept in results.json)."""
    full = replace(VITMEDNET_AUGMENT, elastic=args.elastic) if args.setup == "vitmednet" else AugmentConfig()
    name, why = (args.augment, "set by the recipe or the command line") if args.augment != "auto" \
        else choose_augment(profile)
    config = preset(name, full)
    return config, {"preset": name, "requested": args.augment, "reason": why, "does": describe(config)}


def run_seed(args, seed: int, data: TaskData, dist_info, output_dir: Path, augment: AugmentConfig,
             report: dict) -> dict:
    start, cpu_start = time.perf_counter(), cpu_seconds()
    args.seed = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args, data)
    say = print if dist_info.is_main else (lambda *a, **k: None)
    if args.finetune:
        try:
            loaded = load_encoder(model, args.finetune)
        except CheckpointMismatchError as err:
            raise SystemExit(f"error: --finetune {err}") from None
        grids = loaded["pos_embed_grids"]
        say(f"loaded {loaded['loaded']} tensors from {args.finetune}; new: {', '.join(loaded['new']) or 'none'}; "
            f"dropped {len(loaded['dropped'])} (decoder and unused); pos_embed grid "
            f"{grids[0] if grids else '-'} -> {grids[1] if grids else '-'}")
    splits = {name: ArrayDataset(*data.splits[name]) for name in ("train", "val", "test")}
    trainer = Finetuner(args, model, splits, data.task, len(data.class_names), dist_info, augment)
    extra = {"kind": "volmae-classifier", "model_name": args.model, "model_config": model.config,
             "class_names": data.class_names, "task": data.task, "data": data.data, "setup": args.setup,
             "input_size": list(data.input_size), "args": plain_args(args)}
    run_log = RunLog(output_dir, args.log_dir or output_dir / "tensorboard", enabled=dist_info.is_main)
    selection = trainer.fit(run_log, output_dir / "best.pth", extra)
    run_log.close()
    evaluated = [split for split in ("val", "test") if len(data.splits[split][0])]
    scores = {split: trainer.scores(split) for split in evaluated}
    result = {"setup": args.setup, "data": data.data, "model": args.model, "finetune": args.finetune,
              "model_config": model.config, "recipe": args.recipe, "seed": seed, **report, **selection}
    if dist_info.is_main:
        for split in evaluated:
            result[split] = write_split_outputs(output_dir, split, data, data.splits[split][1], scores[split], seed,
                                                args.bootstrap)
        if args.setup == "slivit_backbone":
            atomic_save({"backbone": trainer.core.backbone.state_dict(), "backbone_name": model.config["backbone"],
                         "class_names": data.class_names}, output_dir / "backbone.pth")
        if args.explain and "test" in scores:
            write_explanations(output_dir, trainer, data, scores["test"], args.explain)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
        (output_dir / "results.json").write_text(json.dumps(result, indent=2))
        shown = evaluated[-1]
        headline = ", ".join(f"{k.upper()} {result[shown][k]:.4f}" for k in HEADLINE[data.task == REGRESSION])
        say(f"seed {seed}: best epoch {selection['best_epoch']}; {shown} {headline} in {result['seconds']} s"
            f"{'' if shown == 'test' else ' (no test split)'}")
    return result


def aggregate(results: list[dict], regression: bool) -> dict:
    summary = {}
    for split in ("val", "test"):
        summary[split] = {metric: {"mean": float(np.mean([r[split][metric] for r in results])),
                                   "std": float(np.std([r[split][metric] for r in results])),
                                   "values": [r[split][metric] for r in results]} for metric in HEADLINE[regression]}
    summary["seconds"] = {"mean": float(np.mean([r["seconds"] for r in results])),
                          "total": float(np.sum([r["seconds"] for r in results]))}
    summary["cpu_seconds"] = {"mean": float(np.mean([r["cpu_seconds"] for r in results])),
                              "total": float(np.sum([r["cpu_seconds"] for r in results]))}
    summary["collapsed_seeds"] = [r["seed"] for r in results if r.get("collapsed")]
    summary["collapsed"] = bool(summary["collapsed_seeds"])
    return summary


def main(args: argparse.Namespace) -> None:
    dist_info = init_distributed(args.device)
    output_dir = Path(args.output_dir)
    try:
        data = build_task_data(args, output_dir)
    except (ValueError, MedMNISTNotFound) as err:
        raise SystemExit(f"error: {err}") from None
    if args.train_samples:
        images, labels = data.splits["train"]
        keep = subset_indices(len(images), args.train_samples)
        data.splits["train"] = (images[keep], labels[keep])
    encoder = pretrained_config(args.finetune)
    args.architecture = {}
    if args.model == "auto":
        args.model, args.architecture = auto_architecture(args, data, encoder)
    profile = profile_images(*data.splits["train"], scale=RAW_SCALE)
    args.normalization = input_normalization(args, profile, encoder)
    if args.layer_decay is None:
        args.layer_decay = PRETRAINED_LAYER_DECAY if args.finetune else 1.0
    if args.lr is None:
        args.lr = effective_lr(args.blr, None, args.batch_size * dist_info.world_size)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    if dist_info.is_main:
        source = data.data.get("flag") or data.data.get("meta")
        print(f"{args.setup} setup, {source} ({data.task}, {len(data.class_names)} output(s)) at "
              f"{'x'.join(map(str, data.input_size))}: {', '.join(f'{k} {len(v[0])}' for k, v in data.splits.items())}; "
              f"model {args.model}{' ' + json.dumps(args.architecture) if args.architecture else ''}, recipe "
              f"{args.recipe}, lr {args.lr:.2e}, {args.epochs} epochs, seeds {seeds}")
    augment, augment_report = resolve_augment(args, profile)
    report = {"data_profile": profile.to_dict(), "augment": augment_report}
    if dist_info.is_main:
        print(f"training data: {profile.describe()}")
        if args.normalization:
            print(f"input standardisation inside the model: mean {args.normalization['input_mean']:.4f}, std "
                  f"{args.normalization['input_std']:.4f} ({'the encoder' if args.finetune else 'training images'})")
        print(f"augmentation: {augment_report['preset']} ({augment_report['does']})"
              f"{': ' + augment_report['reason'] if args.augment == 'auto' else ''}")
    results = [run_seed(args, seed, data, dist_info, output_dir / f"seed_{seed}" if len(seeds) > 1 else output_dir,
                        augment, report) for seed in seeds]
    if dist_info.is_main and len(seeds) > 1:
        regression = data.task == REGRESSION
        summary = {"setup": args.setup, "data": data.data, "model": args.model, "finetune": args.finetune,
                   "recipe": args.recipe, "seeds": seeds, **report, **aggregate(results, regression)}
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        test = summary["test"]
        print(f"test over {len(seeds)} seeds: " + ", ".join(
            f"{m.upper()} {test[m]['mean']:.4f} +- {test[m]['std']:.4f}" for m in HEADLINE[regression]))
    shutdown()


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
