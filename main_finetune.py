"""Fine-tune a classifier on MedMNIST (3D or 2D), from a pretrained MAE encoder or from scratch.

    python main_finetune.py --data_flag adrenalmnist3d --size 28 --model vit3d_tiny_patch4 \\
        --finetune runs/mae/checkpoint-last.pth --output_dir runs/ft
    python main_finetune.py --data_flag adrenalmnist3d --model resnet18_3d --recipe medmnist ...

The checkpoint kept is the epoch with the best validation AUC; the test split is evaluated once,
with it. Metrics are the medmnist Evaluator's; scores are written in its CSV format.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from medmnist import Evaluator
from medmnist.info import DEFAULT_ROOT

import models
from datasets.medmnist_data import ArrayDataset, MedMNISTNotFound, MedMNISTSpec, load_split
from engine_finetune import Finetuner
from models.load_pretrained import CheckpointMismatchError, load_encoder
from util.checkpoint import plain_args
from util.dist import init_distributed, shutdown
from util.lr_sched import effective_lr
from util.metrics import classification_metrics, confusion
from util.plotting import confusion_figure, plt, roc_figure
from util.run_log import RunLog

RECIPES = {
    # MAE fine-tuning (facebookresearch/mae): AdamW, layer-wise lr decay, warmup + cosine, label smoothing
    "mae": {"optimizer": "adamw", "schedule": "cosine", "blr": 1e-3, "lr": None, "layer_decay": 0.75,
            "weight_decay": 0.05, "warmup_epochs": 5, "smoothing": 0.1, "drop_path": 0.1, "augment": True,
            "batch_size": 32, "epochs": 100},
    # The official MedMNIST baselines: Adam 1e-3, x0.1 at 50% and 75% of 100 epochs, batch 32, no augmentation
    "medmnist": {"optimizer": "adam", "schedule": "multistep", "blr": None, "lr": 1e-3, "layer_decay": 1.0,
                 "weight_decay": 0.0, "warmup_epochs": 0, "smoothing": 0.0, "drop_path": 0.0, "augment": False,
                 "batch_size": 32, "epochs": 100},
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_flag", default="adrenalmnist3d", help="any MedMNIST flag, 3D or 2D")
    data.add_argument("--size", type=int, default=28, help="3D: 28 or 64; 2D: 28, 64, 128 or 224")
    data.add_argument("--data_root", default=DEFAULT_ROOT, help=f"medmnist root folder (default {DEFAULT_ROOT})")
    data.add_argument("--download", action="store_true", help="download missing files with the medmnist package")
    data.add_argument("--num_workers", type=int, default=0, help="the data are in memory: 0 is usually fastest")

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
    optim.add_argument("--recipe", choices=tuple(RECIPES), default="mae")
    optim.add_argument("--optimizer", choices=("adamw", "adam"))
    optim.add_argument("--schedule", choices=("cosine", "multistep"))
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
    run.add_argument("--device", default="auto")
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags left unset take the chosen recipe's values."""
    parser = get_args_parser()
    recipe = parser.parse_known_args(argv)[0].recipe
    args = parser.parse_args(argv)
    for key, value in RECIPES[recipe].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_model(args: argparse.Namespace, spec: MedMNISTSpec) -> torch.nn.Module:
    num_classes = len(spec.class_names)
    name = args.model
    if name.startswith(("vit3d_", "vit_")):
        options = {"img_size": spec.input_size, "in_chans": spec.in_chans, "num_classes": num_classes,
                   "drop_path_rate": args.drop_path, "global_pool": args.global_pool}
        if args.patch_size:
            options["patch_size"] = args.patch_size
    elif name.startswith("timm_"):
        options = {"in_chans": spec.in_chans, "num_classes": num_classes, "drop_path_rate": args.drop_path,
                   "pretrained": args.pretrained, "pretrained_file": args.pretrained_file}
    else:
        options = {"in_chans": spec.in_chans, "num_classes": num_classes}
    model = models.create_model(name, **options)
    if model.spatial_dims != len(spec.input_size):
        raise SystemExit(f"error: {name} is a {model.spatial_dims}D model and {spec.flag} is {len(spec.input_size)}D")
    return model


def write_split_outputs(output_dir: Path, split: str, spec: MedMNISTSpec, labels: np.ndarray, scores: np.ndarray,
                        seed: int, bootstrap: int) -> dict:
    """Metrics, the Evaluator's own CSV (and its numbers as a check), and for test the two figures."""
    metrics = classification_metrics(labels, scores, spec.task, spec.class_names, bootstrap)
    evaluator = Evaluator(spec.flag, split, size=spec.size, root=spec.root)
    official = evaluator.evaluate(scores, save_folder=str(output_dir), run=f"seed{seed}")
    metrics["evaluator"] = {"auc": float(official.AUC), "acc": float(official.ACC)}
    if split == "test":
        matrix = confusion(labels, scores, spec.task, len(spec.class_names))
        if matrix is not None:
            figure = confusion_figure(matrix, spec.class_names, f"{spec.flag} test")
            figure.savefig(output_dir / "confusion_matrix.png", dpi=120)
            plt.close(figure)
        figure = roc_figure(labels, scores, spec.task, spec.class_names, f"{spec.flag} test")
        figure.savefig(output_dir / "roc_curve.png", dpi=120)
        plt.close(figure)
    return metrics


def run_seed(args, seed: int, spec: MedMNISTSpec, arrays: dict, dist_info, output_dir: Path) -> dict:
    start = time.perf_counter()
    args.seed = seed
    torch.manual_seed(seed)
    np.random.seed(seed)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(args, spec)
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
    splits = {name: ArrayDataset(*arrays[name]) for name in ("train", "val", "test")}
    trainer = Finetuner(args, model, splits, spec.task, len(spec.class_names), dist_info)
    extra = {"kind": "volmae-classifier", "model_name": args.model, "model_config": model.config,
             "class_names": spec.class_names, "task": spec.task, "data": spec.to_dict(),
             "input_size": list(spec.input_size), "args": plain_args(args)}
    run_log = RunLog(output_dir, args.log_dir or output_dir / "tensorboard", enabled=dist_info.is_main)
    selection = trainer.fit(run_log, output_dir / "best.pth", extra)
    run_log.close()
    scores = {split: trainer.predict(split) for split in ("val", "test")}
    result = {"flag": spec.flag, "size": spec.size, "model": args.model, "finetune": args.finetune,
              "recipe": args.recipe, "seed": seed, **selection}
    if dist_info.is_main:
        for split in ("val", "test"):
            result[split] = write_split_outputs(output_dir, split, spec, arrays[split][1], scores[split], seed,
                                                args.bootstrap)
        result["seconds"] = round(time.perf_counter() - start, 1)
        (output_dir / "results.json").write_text(json.dumps(result, indent=2))
        say(f"seed {seed}: best epoch {selection['best_epoch']} (val AUC {selection['best_val_auc']:.4f}); "
            f"test AUC {result['test']['auc']:.4f}, ACC {result['test']['acc']:.4f} in {result['seconds']} s")
    return result


def aggregate(results: list[dict]) -> dict:
    summary = {}
    for split in ("val", "test"):
        summary[split] = {metric: {"mean": float(np.mean([r[split][metric] for r in results])),
                                   "std": float(np.std([r[split][metric] for r in results])),
                                   "values": [r[split][metric] for r in results]} for metric in ("auc", "acc")}
    summary["seconds"] = {"mean": float(np.mean([r["seconds"] for r in results])),
                          "total": float(np.sum([r["seconds"] for r in results]))}
    return summary


def main(args: argparse.Namespace) -> None:
    dist_info = init_distributed(args.device)
    try:
        spec = MedMNISTSpec(args.data_flag, args.size, args.data_root)
        arrays = {split: load_split(spec, split, args.download) for split in ("train", "val", "test")}
    except (ValueError, MedMNISTNotFound) as err:
        raise SystemExit(f"error: {err}") from None
    if args.lr is None:
        args.lr = effective_lr(args.blr, None, args.batch_size * dist_info.world_size)
    seeds = [int(s) for s in str(args.seeds).split(",")]
    output_dir = Path(args.output_dir)
    if dist_info.is_main:
        print(f"{spec.flag} ({spec.task}, {len(spec.class_names)} classes) at {spec.size}: "
              f"{', '.join(f'{k} {len(v[0])}' for k, v in arrays.items())}; model {args.model}, recipe {args.recipe}, "
              f"lr {args.lr:.2e}, {args.epochs} epochs, seeds {seeds}")
    results = [run_seed(args, seed, spec, arrays, dist_info, output_dir / f"seed_{seed}" if len(seeds) > 1 else output_dir)
               for seed in seeds]
    if dist_info.is_main and len(seeds) > 1:
        summary = {"flag": spec.flag, "size": spec.size, "model": args.model, "finetune": args.finetune,
                   "recipe": args.recipe, "seeds": seeds, **aggregate(results)}
        (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
        test = summary["test"]
        print(f"test over {len(seeds)} seeds: AUC {test['auc']['mean']:.4f} +- {test['auc']['std']:.4f}, "
              f"ACC {test['acc']['mean']:.4f} +- {test['acc']['std']:.4f}")
    shutdown()


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
