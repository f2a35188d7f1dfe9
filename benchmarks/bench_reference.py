"""Our pretraining step against the TANGERINE reference implementation (its models_mae.py).

    python benchmarks/bench_reference.py --reference_dir ~/src/3D-MAE-MedImaging --input_size 128
    python benchmarks/bench_reference.py --profile step_trace.json --input_size 128 --mask_ratio 0.9

The reference is read from a local clone given by path (never vendored or downloaded). Each measurement
runs in a fresh process, and the configurations take turns, round after round, so slow drift of a shared
machine hits all of them alike:

  reference   the reference MAE (decoder 512x8x16): forward, backward, AdamW step
  equal       ours with the reference's architecture and decoder, through the real engine step
              (pretraining.engine.Pretrainer.optimizer_step: keyed masks, guards, clipping, AdamW)
  default     ours with the default decoder 384x4x6, same engine step

for every --mask_ratios value. Prints JSON: volumes/s per run, the median per configuration, and the
ratios of `equal` and `default` to `reference`.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ("reference", "equal", "default")
ENCODERS = {"mae_vit_base_patch16": (768, 12, 12), "mae_vit_large_patch16": (1024, 24, 16),
            "mae_vit_tiny_patch16": (192, 12, 3)}


def reference_model(reference_dir: Path, args: argparse.Namespace):
    """The reference MaskedAutoencoderViT with the benchmark's encoder, its own decoder and norm."""
    from functools import partial

    import torch.nn as nn

    sys.path.insert(0, str(reference_dir))  # its modules import `patch_three_d` and `util.pos_embed` by name
    import models_mae

    embed_dim, depth, heads = ENCODERS[args.model]
    return models_mae.MaskedAutoencoderViT(
        img_size=args.input_size, patch_size=args.patch_size, in_chans=1, embed_dim=embed_dim, depth=depth,
        num_heads=heads, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6))


def time_reference(args: argparse.Namespace) -> float:
    import torch

    torch.manual_seed(0)
    model = reference_model(Path(args.reference_dir), args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    volumes = torch.rand(args.batch_size, 1, *(args.input_size,) * 3)

    def step():
        loss, _, _ = model(volumes, args.mask_ratio)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return timed(step, args)


def our_step(args: argparse.Namespace, decoder: dict):
    """One call = one optimizer step of our engine (Pretrainer.optimizer_step) on a fixed batch."""
    import numpy as np
    import torch

    from .. import models
    from ..datasets.volume_dataset import ArrayPretrainDataset, collate_volumes
    from ..inference.checkpoints import PretrainingCheckpoint
    from ..pretraining.engine import Pretrainer
    from ..pretraining.flags import get_args_parser
    from ..pretraining.pretrain_config import PretrainConfig
    from ..util.dist import init_distributed
    from ..util.preemption import PreemptionWatch

    torch.manual_seed(0)
    output_dir = tempfile.mkdtemp(prefix="bench_reference_")
    run = get_args_parser().parse_args([
        "--batch_size", str(args.batch_size), "--mask_ratio", str(args.mask_ratio), "--num_workers", "0",
        "--precision", "fp32", "--output_dir", output_dir, "--epochs", "1", "--warmup_epochs", "0", "--lr", "1e-4"])
    core = models.create_model(args.model, img_size=args.input_size, patch_size=args.patch_size, **decoder)
    images = (np.random.default_rng(0).random((args.batch_size * 4, 1, *(args.input_size,) * 3)) * 65535)
    dataset = ArrayPretrainDataset(images.astype(np.uint16), "random")
    dist_info = init_distributed("cpu")
    trainer = Pretrainer(PretrainConfig.from_flags(run), core, dataset, dist_info,
                         PretrainingCheckpoint(args.model, core.config), PreemptionWatch(Path(output_dir), dist_info.device))
    batch = collate_volumes([dataset[i] for i in range(args.batch_size)])
    return lambda: trainer.optimizer_step([batch], 0, keep_sample=False)


def profile(args: argparse.Namespace, decoder: dict, trace: Path) -> list[dict]:
    """torch.profiler over --steps of our step: the operators that take the time, and a Chrome trace."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step = our_step(args, decoder)
    step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    prof.export_chrome_trace(str(trace))
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return [{"op": e.key, "calls": e.count, "self_ms_per_step": round(e.self_cpu_time_total / 1000 / args.steps, 1),
             "share": round(e.self_cpu_time_total / total, 3)} for e in top]


def timed(step, args: argparse.Namespace) -> float:
    """Volumes per second over --steps steps after --warmup."""
    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    return args.batch_size * args.steps / (time.perf_counter() - start)


def child(args: argparse.Namespace) -> None:
    from ..models.mae3d import DEFAULT_DECODER, REFERENCE_DECODER

    if args.config == "reference":
        speed = time_reference(args)
    else:
        speed = timed(our_step(args, REFERENCE_DECODER if args.config == "equal" else DEFAULT_DECODER), args)
    print(json.dumps({"vol_per_s": speed}))


def run_child(args: argparse.Namespace, config: str, mask_ratio: float) -> float:
    command = [sys.executable, __file__, "--child", "--config", config, "--mask_ratio", str(mask_ratio),
               "--reference_dir", args.reference_dir, "--model", args.model, "--input_size", str(args.input_size),
               "--patch_size", str(args.patch_size), "--batch_size", str(args.batch_size), "--steps",
               str(args.steps), "--warmup", str(args.warmup)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["vol_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_dir", default=None, help="a local clone of niccolo246/3D-MAE-MedImaging")
    parser.add_argument("--model", choices=tuple(ENCODERS), default="mae_vit_base_patch16")
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--mask_ratios", default="0.75,0.9")
    parser.add_argument("--rounds", type=int, default=2, help="turns of every configuration, interleaved")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--mask_ratio", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--profile", default=None, metavar="TRACE.json",
                        help="instead: profile our step with the reference decoder at --mask_ratio (default 0.9)")
    args = parser.parse_args()
    if args.profile:
        from ..models.mae3d import REFERENCE_DECODER

        args.mask_ratio = args.mask_ratio or 0.9
        print(json.dumps({"profile": "pretraining_step", "model": args.model, "input_size": args.input_size,
                          "mask_ratio": args.mask_ratio, "trace": args.profile,
                          "top_ops": profile(args, REFERENCE_DECODER, Path(args.profile))}, indent=2))
        return
    if args.child:
        child(args)
        return
    if not args.reference_dir or not (Path(args.reference_dir) / "models_mae.py").exists():
        raise SystemExit(f"error: {args.reference_dir} has no models_mae.py (clone niccolo246/3D-MAE-MedImaging)")
    report = {"benchmark": "pretraining_step_vs_reference", "model": args.model, "input_size": args.input_size,
              "patch_size": args.patch_size, "batch_size": args.batch_size, "steps": args.steps,
              "precision": "fp32", "device": f"cpu ({os.cpu_count()} cores)", "masks": {}}
    for mask_ratio in (float(v) for v in args.mask_ratios.split(",")):
        runs = {config: [] for config in CONFIGS}
        for _ in range(args.rounds):
            for config in CONFIGS:
                runs[config].append(round(run_child(args, config, mask_ratio), 4))
        median = {config: statistics.median(values) for config, values in runs.items()}
        report["masks"][str(mask_ratio)] = {
            "vol_per_s": runs, "median_vol_per_s": median,
            "equal_vs_reference": round(median["equal"] / median["reference"], 3),
            "default_vs_reference": round(median["default"] / median["reference"], 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
