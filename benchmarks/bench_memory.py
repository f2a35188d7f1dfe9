"""Peak memory per rank for DDP and DeepSpeed ZeRO-1/2/3 with the same model and step.

    python benchmarks/bench_memory.py [--model mae_vit_large_patch16] [--input_size 32] [--nproc 2]

Each mode is a real torchrun job (gloo on CPU, nccl on CUDA) running VolMAE's training backends
(util/train_backend.py) for a few optimizer steps; every rank reports its peak: resident memory on
CPU (ru_maxrss, which includes the process' baseline, also reported), allocated memory on CUDA.
On Linux the resident high-water mark is reset after setup, so `training_peak_rss_mb` is the peak
during the optimizer steps (setup, where every rank first builds the whole model, is reported
apart). A small input keeps activations small, so the figures show what ZeRO partitions:
parameters, gradients and optimizer states. Prints JSON.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODES = {"ddp": None, "zero1": 1, "zero2": 2, "zero3": 3}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Linux: restart the resident high-water mark (VmHWM) from the current resident size."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    import torch

    from .. import models
    from ..pretraining.engine import build_optimizer
    from ..util.dist import init_distributed, shutdown
    from ..util.train_backend import make_backend

    dist_info = init_distributed("auto")
    baseline = rss_mb()
    torch.manual_seed(0)
    model = models.create_model(args.model, img_size=args.input_size)
    params = sum(p.numel() for p in model.parameters())
    optimizer = build_optimizer(model, 0.05)
    cuda = dist_info.device.type == "cuda"
    config = None
    if args.mode != "ddp":
        stage = MODES[args.mode]
        config = str(REPO / "launch" / "deepspeed" / (f"zero{stage}.json" if cuda else f"zero{stage}_cpu.json"))
    backend = make_backend(model, optimizer, dist_info, config, "bf16" if cuda else "fp32", 1, clip_grad=1.0)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_peak = rss_mb()
    gc.collect()
    resettable = reset_peak_rss()
    dtype = getattr(backend, "input_dtype", torch.float32)
    for _ in range(args.steps):
        volume = torch.rand(1, 1, args.input_size, args.input_size, args.input_size, device=dist_info.device)
        with backend.autocast():
            loss, _, _ = backend.model(volume.to(dtype), 0.75)
        backend.backward(loss)
        backend.finish_step(skip=False)
    record = {"rank": dist_info.rank, "mode": args.mode, "params_m": round(params / 1e6, 1),
              "baseline_rss_mb": round(baseline, 1), "setup_peak_rss_mb": round(setup_peak, 1),
              "training_peak_rss_mb": round(vm_hwm_mb(), 1) if resettable else None}
    if cuda:
        record["peak_cuda_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    with open(Path(args.report) / f"{args.mode}-rank{dist_info.rank}.json", "w") as f:
        json.dump(record, f)
    shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_large_patch16")
    parser.add_argument("--input_size", type=int, default=32)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="ddp", help=argparse.SUPPRESS)
    parser.add_argument("--report", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    results = {}
    with tempfile.TemporaryDirectory() as report:
        for i, mode in enumerate(args.modes.split(",")):
            command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                       f"--master_port={29800 + i}", __file__, "--worker", "--mode", mode, "--report", report,
                       "--model", args.model, "--input_size", str(args.input_size), "--steps", str(args.steps)]
            run = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                 env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.nproc))})
            if run.returncode != 0:
                results[mode] = {"error": run.stderr[-1500:]}
                continue
            ranks = [json.loads((Path(report) / f"{mode}-rank{r}.json").read_text()) for r in range(args.nproc)]
            key = "peak_cuda_allocated_mb" if "peak_cuda_allocated_mb" in ranks[0] else "training_peak_rss_mb"
            results[mode] = {"per_rank": ranks, "max_peak_mb": max(r[key] for r in ranks), "measure": key}
    ddp = results.get("ddp", {}).get("max_peak_mb")
    for result in results.values():
        if ddp and "max_peak_mb" in result:
            result["vs_ddp"] = round(result["max_peak_mb"] / ddp, 3)
    print(json.dumps({"benchmark": "memory", "model": args.model, "input_size": args.input_size,
                      "nproc": args.nproc, "results": results}, indent=2))


if __name__ == "__main__":
    main()
