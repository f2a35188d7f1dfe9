"""Does bf16 autocast pay on this CPU? fp32 against bf16 training steps (forward, backward, AdamW) of the volumes
recipe's models, through the same backend the loops use (util.train_backend.TorchBackend), in one process.

    python benchmarks/bench_bf16.py --input_size 24,40,40 --batch_size 32 --steps 12 --rounds 3

Both the MAE pretraining step (small hybrid ViT, small decoder, mask 0.75) and the fine-tuning step (the same
encoder as a classifier) are timed, fp32 and bf16 taking turns for --rounds rounds on the same volumes. Prints JSON:
median seconds per step, volumes/s, the bf16 speedup of each, the largest relative loss difference over the steps,
and whether the CPU has native bf16 (what `--precision auto` goes by).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import statistics
import time

import torch

from .. import models
from ..models.mae3d import AUTO_DECODER
from ..models.patch_embed import auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..pretraining.engine import build_optimizer
from ..util.cli import grid, int_tuple
from ..util.dist import DistInfo
from ..util.train_backend import TorchBackend, native_cpu_bf16

CPU = DistInfo(0, 1, 0, torch.device("cpu"))


def pretraining_model(size: tuple[int, ...]) -> torch.nn.Module:
    return models.create_model("mae_vit_tiny_patch16", img_size=size, **AUTO_ARCHITECTURE, **AUTO_DECODER,
                               patch_size=auto_patch_size(size, stem=True))


def classifier(size: tuple[int, ...]) -> torch.nn.Module:
    return models.create_model("vit3d", img_size=size, num_classes=2, head_norm=True, **AUTO_ARCHITECTURE,
                               patch_size=list(auto_patch_size(size, stem=True)))


def timed_steps(kind: str, size: tuple[int, ...], precision: str, batch: torch.Tensor, labels: torch.Tensor,
                steps: int) -> tuple[list[float], list[float]]:
    """Seconds and loss of each step, from the same initial weights whatever the precision."""
    torch.manual_seed(0)
    model = pretraining_model(size) if kind == "pretrain" else classifier(size)
    backend = TorchBackend(model, build_optimizer(model, 0.05), CPU, precision, accum_iter=1, clip_grad=None)
    noise = torch.rand(len(batch), getattr(model, "num_patches", 1), generator=torch.Generator().manual_seed(1))
    seconds, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        with backend.autocast():
            if kind == "pretrain":
                loss = backend.model(batch, 0.75, noise=noise)[0].float()
            else:
                loss = torch.nn.functional.cross_entropy(backend.model(batch).float(), labels)
        backend.backward(loss)
        backend.finish_step(skip=False)
        seconds.append(time.perf_counter() - start)
        losses.append(loss.item())
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_size", type=int_tuple, default=(24, 40, 40))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per round; the first of each is not timed")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = grid(args.input_size)
    batch = torch.rand(args.batch_size, 1, *size, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (args.batch_size,), generator=torch.Generator().manual_seed(0))
    result = {"benchmark": "bf16_autocast_cpu", "input_size": size, "batch_size": args.batch_size, "steps": args.steps,
              "rounds": args.rounds, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
              "native_cpu_bf16": native_cpu_bf16(), "torch": torch.__version__}
    for kind in ("pretrain", "finetune"):
        times = {"fp32": [], "bf16": []}
        losses = {}
        for _ in range(args.rounds):
            for precision in ("fp32", "bf16"):
                seconds, losses[precision] = timed_steps(kind, size, precision, batch, labels, args.steps)
                times[precision] += seconds[1:]
        step = {p: statistics.median(t) for p, t in times.items()}
        result[kind] = {"seconds_per_step": step,
                        "volumes_per_second": {p: args.batch_size / s for p, s in step.items()},
                        "bf16_speedup": step["fp32"] / step["bf16"],
                        "losses": losses,
                        "max_relative_loss_difference": max(abs(a - b) / abs(a) for a, b in zip(losses["fp32"], losses["bf16"]))}
    print(json.dumps(result, indent=2, default=list))


if __name__ == "__main__":
    main()
