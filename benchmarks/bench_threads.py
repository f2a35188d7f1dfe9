"""What torch's default threads cost when another process shares the cores: fine-tuning steps of the recipe's
classifier with one thread per core (torch's default) against the count util.threads chooses, first on idle cores,
then with a busy process holding one core, in one run.

    python benchmarks/bench_threads.py --input_size 24,40,40 --batch_size 32 --steps 8

Prints JSON: volumes/s of each thread count, idle and shared, and the thread count util.threads.choose_threads gives
for each situation (from the load the busy process adds).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import multiprocessing
import os
import statistics
import time

import torch

from .. import models
from ..models.patch_embed import auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..pretraining.engine import build_optimizer
from ..util.cli import grid, int_tuple
from ..util.threads import available_cores, choose_threads


def spin(stop) -> None:
    """Other work: one core kept busy until told to stop."""
    while not stop.is_set():
        sum(range(10_000))


def volumes_per_second(threads: int, size: tuple[int, ...], batch_size: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.create_model("vit3d", img_size=size, num_classes=2, head_norm=True, **AUTO_ARCHITECTURE,
                                patch_size=list(auto_patch_size(size, stem=True)))
    optimizer = build_optimizer(model, 0.05)
    batch, labels = torch.rand(batch_size, 1, *size), torch.randint(0, 2, (batch_size,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        torch.nn.functional.cross_entropy(model(batch), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_size", type=int_tuple, default=(24, 40, 40))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    size, cores = grid(args.input_size), available_cores()
    counts = sorted({cores, 1})
    result = {"benchmark": "cpu_threads_shared_cores", "input_size": size, "batch_size": args.batch_size,
              "cores": cores, "idle": {}, "one_core_busy": {},
              "chosen_threads": {"idle": choose_threads(cores, 1, 0.0), "one_core_busy": choose_threads(cores, 1, 1.0)}}
    for threads in counts:
        result["idle"][threads] = volumes_per_second(threads, size, args.batch_size, args.steps)
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=spin, args=(stop,))
    busy.start()
    try:
        for threads in counts:
            result["one_core_busy"][threads] = volumes_per_second(threads, size, args.batch_size, args.steps)
    finally:
        stop.set()
        busy.join()
    result["load_average_after"] = os.getloadavg()[0]
    print(json.dumps(result, indent=2, default=list))


if __name__ == "__main__":
    main()
