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
from datasets.medmnist_data import RAW_SCALE, ArrayDataset, MedMNISTNotFound, MedMNISTSpec
from datasets.task_data import (TaskData, medmnist_task, meta_image_task, meta_volume_task,
                                slivit_medmnist_task)
from datasets.transforms import VITMEDNET_AUGMENT, AugmentConfig
from engine_finetune import Finetuner
from models.load_pretrained import CheckpointMismatchError, load_encoder
from util.checkpoint import atomic_save, plain_args
from util.dist import init_distributed, shutdown
from util.explain import explain_predictions
from util.lr_sched import effective_lr
from util.metrics import REGRESSION, classification_metrics, confusion, regression_metrics
from util.plotting import confusion_figure, plt, roc_figure
from util.run_log import RunLog

HEADLINE = {False: ("auc", "acc"), True: ("r2", "pearson")}

SETUPS = ("medmnist", "vitmednet", "slivit", "slivit_backbone")
SETUP_RECIPES = {"medmnist": "mae", "vitmednet": "vitmednet", "slivit": "slivit", "slivit_backbone": "slivit"}
RECIPES = {
    # MAE fine-tuning (facebookresearch/mae): AdamW, layer-wise lr decay, warmup + cosine, label smoothing
    "mae": {"optimizer": "adamw", "schedule": "cosine", "blr": 1e-3, "lr": None, "layer_decay": 0.75,
            "weight_decay": 0.05, "warmup_epochs": 5, "smoothing": 0.1, "drop_path": 0.1, "augment": True,
            "batch_size": 32, "epochs": 100},
    # The official MedMNIST baselines: Adam 1e-3, x0.1 at 50% and 75% of 100 epochs, batch 32, no augmentation
    "medmnist": {"optimizer": "adam", "schedule": "multistep", "blr": None, "lr": 1e-3, "layer_decay": 1.0,
                 "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": False,
                 "batch_size": 32, "epochs": 100},
    # 3DViTMedNet (seed 000): Adam 1e-5, batch 6, 100 epochs, its augmentation pipeline
    "vitmednet": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 1e-5, "layer_decay": 1.0,
                  "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": True,
                  "batch_size": 6, "epochs": 100},
    # SLIViT (seed 003): Adam 5e-5, batch 4, early stopping on validation loss with patience 5
    "slivit": {"optimizer": "adam", "schedule": "constant", "blr": None, "lr": 5e-5, "layer_decay": 1.0,
               "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": False,
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
    model.add_argument("--model", default="vit3d_tiny_patch4", help="vit3d_*, vit_*, resnet18_3d, resnet50_3d, "
                       "timm_vit_base_patch16_224")
    model.add_argument("--patch_size", type=int, default=None, help="override the model's patch size")
    model.add_argument("--global_pool", choices=("avg", "token", "concat"), default="avg",
                       help="ViT feature: mean of patch tokens (default), the class token, or both (TANGERINE)")
    model.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate (recipe default)")
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
    optim.add_argument("--layer_decay", type=float)
    optim.add_argument("--weight_decay", type=float)
    optim.add_argument("--warmup_epochs", type=float)
    optim.add_argument("--smoothing", type=float, help="label smoothing")
    optim.add_argument("--class_weights", choices=("none", "balanced"), default="none")
    optim.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                       help="batched flips, rotations, scaling, translation, noise, gamma")
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


def build_model(args: argparse.Namespace, data: TaskData) -> torch.nn.Module:
    outputs = len(data.class_names)
    name = args.model
    common = {"in_chans": data.in_chans, "num_classes": outputs}
    if name.startswith(("vit3d_", "vit_")):
        options = {**common, "img_size": data.input_size, "drop_path_rate": args.drop_path,
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


def run_seed(args, seed: int, data: TaskData, dist_info, output_dir: Path) -> dict:
    start = time.perf_counter()
    args.seed = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args, data)
    say = print if dist_info.is_main else (lambda *a, **k: None)
    if args.finetune:
        try:
            report = load_encoder(model, args.finetune)
        except CheckpointMismatchError as err:
            raise SystemExit(f"error: --finetune {err}") from None
        say(f"loaded {report['loaded']} tensors from {args.finetune}; new: {', '.join(report['new']) or 'none'}; "
            f"dropped {len(report['dropped'])} (decoder and unused); pos_embed grid "
            f"{report['pos_embed_grids'][0] if report['pos_embed_grids'] else '-'} -> "
            f"{report['pos_embed_grids'][1] if report['pos_embed_grids'] else '-'}")
    splits = {name: ArrayDataset(*data.splits[name]) for name in ("train", "val", "test")}
    augment = replace(VITMEDNET_AUGMENT, elastic=args.elastic) if args.setup == "vitmednet" else AugmentConfig()
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
              "recipe": args.recipe, "seed": seed, **selection}
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
        keep = np.sort(np.random.default_rng(0).permutation(len(images))[:args.train_samples])
        data.splits["train"] = (images[keep], labels[keep])
    if args.lr is None:
        args.lr = effective_lr(args.blr, None, args.batch_size * dist_info.world_size)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    if dist_info.is_main:
        source = data.data.get("flag") or data.data.get("meta")
        print(f"{args.setup} setup, {source} ({data.task}, {len(data.class_names)} output(s)) at "
              f"{'x'.join(map(str, data.input_size))}: {', '.join(f'{k} {len(v[0])}' for k, v in data.splits.items())}; "
              f"model {args.model}, recipe {args.recipe}, lr {args.lr:.2e}, {args.epochs} epochs, seeds {seeds}")
    results = [run_seed(args, seed, data, dist_info, output_dir / f"seed_{seed}" if len(seeds) > 1 else output_dir)
               for seed in seeds]
    if dist_info.is_main and len(seeds) > 1:
        regression = data.task == REGRESSION
        summary = {"setup": args.setup, "data": data.data, "model": args.model, "finetune": args.finetune,
                   "recipe": args.recipe, "seeds": seeds, **aggregate(results, regression)}
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        test = summary["test"]
        print(f"test over {len(seeds)} seeds: " + ", ".join(
            f"{m.upper()} {test[m]['mean']:.4f} +- {test[m]['std']:.4f}" for m in HEADLINE[regression]))
    shutdown()


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
