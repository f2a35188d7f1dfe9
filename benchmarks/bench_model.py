"""Training throughput and peak memory of an MAE configuration against the reference decoder.

    python benchmarks/bench_model.py --model mae_vit_base_patch16 --input_size 256 --device cuda

Measures forward + backward + AdamW step (volumes/s), peak memory and model FLOPs per volume
(torch's FlopCounterMode), for each --decoders candidate and for the reference decoder 512x8x16,
each in a fresh child process of this run so that its peak memory is its own. Prints JSON.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import multiprocessing as mp
import os
import resource
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from .. import models
from ..models.mae3d import DEFAULT_DECODER, REFERENCE_DECODER
from ..util.cli import grid, int_tuple

H100_BF16_DENSE_TFLOPS = 989.0


def decoder_name(decoder: dict) -> str:
    return f"{decoder['decoder_embed_dim']}x{decoder['decoder_depth']}x{decoder['decoder_num_heads']}"


def parse_decoder(text: str) -> dict:
    width, depth, heads = (int(v) for v in text.split("x"))
    return {"decoder_embed_dim": width, "decoder_depth": depth, "decoder_num_heads": heads}


def measure(args: argparse.Namespace, decoder: dict) -> dict:
    """One configuration: runs in its own process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = models.create_model(args.model, img_size=grid(args.input_size), patch_size=grid(args.patch_size),
                                **decoder).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp32": None}[args.precision]
    volumes = torch.rand(args.batch_size, 1, *grid(args.input_size), device=device)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss, _, _ = model(volumes, args.mask_ratio, args.mask_type)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_volume = counter.get_total_flops() / args.batch_size
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    vol_per_s = args.batch_size * args.steps / elapsed
    result = {
        "decoder": decoder_name(decoder),
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "step_ms": round(1000 * elapsed / args.steps, 2),
        "vol_per_s": round(vol_per_s, 3),
        "tflop_per_volume": round(flops_per_volume / 1e12, 4),
        "achieved_tflops": round(flops_per_volume * vol_per_s / 1e12, 3),
    }
    if device.type == "cuda":
        result["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["mfu"] = round(flops_per_volume * vol_per_s / (args.peak_tflops * 1e12), 4)
    else:
        result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def _child(args: argparse.Namespace, decoder: dict, queue) -> None:
    try:
        queue.put(measure(args, decoder))
    except Exception as err:  # reported in the JSON instead of killing the sweep (e.g. out of memory)
        queue.put({"decoder": decoder_name(decoder), "error": f"{type(err).__name__}: {err}"[:500]})


def run_isolated(args: argparse.Namespace, decoder: dict) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(args, decoder, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mae_vit_base_patch16")
    parser.add_argument("--input_size", type=int_tuple, default=(64,))
    parser.add_argument("--patch_size", type=int_tuple, default=(16,))
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--mask_type", default="random")
    parser.add_argument("--decoders", default=decoder_name(DEFAULT_DECODER),
                        help="comma-separated WIDTHxDEPTHxHEADS candidates (the reference 512x8x16 is always run)")
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--peak_tflops", type=float, default=H100_BF16_DENSE_TFLOPS,
                        help="accelerator peak for MFU (default: H100 bf16 dense)")
    args = parser.parse_args()
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")

    reference = run_isolated(args, REFERENCE_DECODER)
    candidates = [run_isolated(args, parse_decoder(text)) for text in args.decoders.split(",")]
    ratios = {}
    for result in candidates:
        if "error" not in result and "error" not in reference:
            memory_key = "peak_mem_mb" if "peak_mem_mb" in result else "peak_rss_mb"
            ratios[result["decoder"]] = {
                "speedup_vs_reference": round(result["vol_per_s"] / reference["vol_per_s"], 3),
                "flops_vs_reference": round(result["tflop_per_volume"] / reference["tflop_per_volume"], 3),
                "memory_vs_reference": round(result[memory_key] / reference[memory_key], 3),
            }
    report = {
        "benchmark": "mae_train_step",
        "model": args.model, "input_size": list(grid(args.input_size)), "patch_size": list(grid(args.patch_size)),
        "mask_ratio": args.mask_ratio, "mask_type": args.mask_type, "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
        "precision": args.precision, "torch": torch.__version__,
        "reference": reference, "candidates": candidates, "ratios": ratios,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
