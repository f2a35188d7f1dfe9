"""Fine-tuning throughput: our loop (finetuning.engine.Finetuner) against a bare PyTorch loop of the same
model, batch and optimizer (no augmentation, logging or evaluation), and evaluation speed.

    python benchmarks/bench_finetune.py --input_sizes 28,64
    python benchmarks/bench_finetune.py --eval_models vit3d,medvit3d_tiny,vitmednet3d --input_sizes 28,64

Training: samples/s of each loop over --epochs epochs of --samples random volumes, the two loops taking
turns for --rounds rounds; overhead = 1 - ours / bare. Evaluation: volumes/s of Finetuner.predict (the
validation and test pass) per model and grid. Prints JSON.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import statistics
import time

import numpy as np
import torch

from .. import models
from ..datasets.array_dataset import ArrayDataset
from ..datasets.finetune_augment import NO_AUGMENT
from ..finetuning.engine import Finetuner
from ..finetuning.finetune_config import TrainingConfig
from ..models.patch_embed import auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..util.dist import init_distributed

TASK = "binary-class"


def model_for(name: str, size: int) -> torch.nn.Module:
    grid = (size,) * 3
    if name == "vit3d":  # what --model auto trains from scratch
        return models.create_model("vit3d", img_size=grid, num_classes=2, head_norm=True, **AUTO_ARCHITECTURE,
                                   patch_size=list(auto_patch_size(grid, stem=True)))
    options = {"img_size": grid} if "img_size" in models.model_arguments(name) else {}
    return models.create_model(name, num_classes=2, **options)


def data(samples: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(samples, 1, size, size, size), dtype=np.uint8)
    return images, rng.integers(0, 2, size=(samples, 1)).astype(np.int64)


def training_config(batch_size: int, epochs: int) -> TrainingConfig:
    return TrainingConfig(seed=0, epochs=epochs, batch_size=batch_size, lr=1e-4, min_lr=1e-6, warmup_epochs=5,
                          weight_decay=0.05, layer_decay=1.0, optimizer="adamw", schedule="cosine", smoothing=0.0,
                          clip_grad=None, class_weights="none", patience=None, precision="fp32", deepspeed=None,
                          num_workers=0, mae_loss_weight=0.0)


def ours(name: str, size: int, images: np.ndarray, labels: np.ndarray, batch_size: int, epochs: int) -> float:
    torch.manual_seed(0)
    model = model_for(name, size)
    splits = {split: ArrayDataset(images, labels) for split in ("train", "val", "test")}
    trainer = Finetuner(training_config(batch_size, epochs), model, splits, TASK, 2, init_distributed("cpu"), NO_AUGMENT)
    start = time.perf_counter()
    for epoch in range(epochs):
        trainer.train_epoch(epoch)
    return len(images) * epochs / (time.perf_counter() - start)


def bare(name: str, size: int, images: np.ndarray, labels: np.ndarray, batch_size: int, epochs: int,
         compiled: bool = False) -> float:
    """The same model, AdamW and batches, written as plainly as PyTorch allows; `compiled`: through
    torch.compile, its compilation included (it happens in the first step)."""
    torch.manual_seed(0)
    model = model_for(name, size)
    if compiled:
        model = torch.compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels[:, 0])
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for batch in torch.randperm(len(x_all)).split(batch_size):
            x = x_all[batch].float() / 255
            loss = torch.nn.functional.cross_entropy(model(x), y_all[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return len(images) * epochs / (time.perf_counter() - start)


def evaluation(name: str, size: int, samples: int, batch_size: int) -> float:
    """Volumes/s of Finetuner.predict on one split: the median of 3 passes after a warm-up pass."""
    torch.manual_seed(0)
    images, labels = data(samples, size)
    splits = {split: ArrayDataset(images, labels) for split in ("train", "val", "test")}
    trainer = Finetuner(training_config(batch_size, 1), model_for(name, size), splits, TASK, 2, init_distributed("cpu"),
                        NO_AUGMENT)
    trainer.predict("val")
    speeds = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.predict("val")
        speeds.append(samples / (time.perf_counter() - start))
    return statistics.median(speeds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit3d", help="vit3d: the small ViT --model auto trains")
    parser.add_argument("--input_sizes", default="28,64")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time the bare loop under torch.compile")
    parser.add_argument("--eval_models", default="", help="comma-separated models to time evaluation for")
    parser.add_argument("--eval_samples", type=int, default=32)
    args = parser.parse_args()
    report = {"benchmark": "finetune_loop", "device": f"cpu ({os.cpu_count()} cores)",
              "threads": torch.get_num_threads(), "torch": torch.__version__, "training": {}, "evaluation": {}}
    for size in (int(s) for s in args.input_sizes.split(",")):
        samples = args.samples if size <= 32 else max(args.batch_size * 2, args.samples // 4)
        images, labels = data(samples, size)
        if not args.eval_models:
            runs = {"bare": [], "ours": [], **({"bare_compiled": []} if args.compile else {})}
            for _ in range(args.rounds):
                runs["bare"].append(round(bare(args.model, size, images, labels, args.batch_size, args.epochs), 3))
                runs["ours"].append(round(ours(args.model, size, images, labels, args.batch_size, args.epochs), 3))
                if args.compile:
                    runs["bare_compiled"].append(round(bare(args.model, size, images, labels, args.batch_size,
                                                            args.epochs, compiled=True), 3))
            median = {k: statistics.median(v) for k, v in runs.items()}
            report["training"][str(size)] = {"model": args.model, "samples": samples, "samples_per_s": runs,
                                             "median": median, "overhead": round(1 - median["ours"] / median["bare"], 4)}
        for name in filter(None, args.eval_models.split(",")):
            speed = evaluation(name, size, args.eval_samples, args.batch_size)
            report["evaluation"].setdefault(name, {})[str(size)] = round(speed, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
