"""Does torch.compile repay its compilation in a pretraining run? Eager against compiled MAE training steps
(forward, backward, fused AdamW) of the volumes recipe's model, on random volumes, in one process.

    python benchmarks/bench_compile_pretrain.py --input_size 24,40,40 --batch_size 32 --steps 40

Prints JSON: seconds per step of each (after warm-up), the compilation's cost (the first compiled steps
beyond the steady rate) and the run length, in steps, from which compiling pays.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import time

import torch

from .. import models
from ..models.patch_embed import auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..pretraining.engine import build_optimizer
from ..util.cli import grid, int_tuple

DECODER = {"decoder_embed_dim": 96, "decoder_depth": 2, "decoder_num_heads": 3}


def step_times(model: torch.nn.Module, batch: torch.Tensor, steps: int, mask_ratio: float) -> list[float]:
    optimizer = build_optimizer(model, 0.05)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss, _, _ = model(batch, mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_size", type=int_tuple, default=(24, 40, 40))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of each, after --warmup")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    args = parser.parse_args()
    size = grid(args.input_size)
    torch.manual_seed(0)
    batch = torch.rand(args.batch_size, 1, *size)
    config = {"img_size": size, **AUTO_ARCHITECTURE, **DECODER, "patch_size": auto_patch_size(size, stem=True)}
    eager = step_times(models.create_model("mae_vit_tiny_patch16", **config), batch, args.warmup + args.steps,
                       args.mask_ratio)
    compiled_model = torch.compile(models.create_model("mae_vit_tiny_patch16", **config))
    compiled = step_times(compiled_model, batch, args.warmup + args.steps, args.mask_ratio)
    eager_step = sorted(eager[args.warmup:])[len(eager[args.warmup:]) // 2]
    compiled_step = sorted(compiled[args.warmup:])[len(compiled[args.warmup:]) // 2]
    compile_cost = sum(compiled[:args.warmup]) - args.warmup * compiled_step
    saving = eager_step - compiled_step
    print(json.dumps({
        "benchmark": "torch_compile_pretrain_step", "model": "mae_vit_tiny_patch16", "config": config,
        "batch_size": args.batch_size, "mask_ratio": args.mask_ratio, "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "seconds_per_step": {"eager": eager_step, "compiled": compiled_step},
        "speedup": eager_step / compiled_step, "compile_seconds": compile_cost,
        "steps_to_repay": compile_cost / saving if saving > 0 else None,
    }, indent=2, default=list))


if __name__ == "__main__":
    main()
