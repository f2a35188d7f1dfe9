"""Prediction throughput of main_predict.py at 64^3 and 256^3.

    python benchmarks/bench_predict.py [--quick] [--models vit3d_tiny_patch16,vit3d_base_patch16]

For each model and grid: a classifier checkpoint in best.pth's format (random weights: speed does
not depend on them), then (a) end to end, `main_predict.py` on a CSV of CT-sized .nii.gz phantoms
(read, reorient, resample, window, predict), and (b) the model's forward pass alone on random
inputs. Prints JSON with volumes/s for both.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from .. import models
from ..inference.checkpoints import ClassifierCheckpoint
from ..volumes.preprocess import PreprocessConfig
from ..volumes.sources import list_sources
from .ct_sources import FULL_SOURCE, QUICK_SOURCE, ct_sources

REPO = Path(__file__).resolve().parents[1]


def classifier_checkpoint(path: Path, name: str, grid: int) -> torch.nn.Module:
    model = models.create_model(name, img_size=grid, num_classes=2)
    ClassifierCheckpoint(name, model.config, ["negative", "positive"], "binary-class", [grid] * 3,
                         PreprocessConfig(size=(grid,) * 3).to_dict(), {"source": "volumes"},
                         weights=model.state_dict()).save(path)
    return model


@torch.no_grad()
def forward_rate(model: torch.nn.Module, grid: int, batch: int, device: str, repeats: int) -> float:
    model = model.to(device).eval()
    x = torch.rand(batch, 1, grid, grid, grid, device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
        model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            model(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--grids", default="64,256")
    parser.add_argument("--models", default="vit3d_tiny_patch16,vit3d_base_patch16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--work_dir", default=os.environ.get("VOLMAE_BENCH_DIR", "/tmp/volmae_bench"))
    args = parser.parse_args()
    source_size, count = (QUICK_SOURCE, 3) if args.quick else (FULL_SOURCE, args.count)
    sources = list_sources(ct_sources(Path(args.work_dir), count, source_size))
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        cases = Path(tmp) / "cases.csv"
        pd.DataFrame({"id": range(len(sources)), "path": sources}).to_csv(cases, index=False)
        for grid in (int(g) for g in args.grids.split(",")):
            for name in args.models.split(","):
                checkpoint = Path(tmp) / f"{name}_{grid}.pth"
                model = classifier_checkpoint(checkpoint, name, grid)
                out = subprocess.run([sys.executable, "main_predict.py", "--checkpoint", str(checkpoint),
                                      "--input_csv", str(cases), "--output_csv", str(Path(tmp) / "pred.csv"),
                                      "--overwrite", "--batch_size", "2", "--num_workers", "2", "--device", args.device],
                                     cwd=REPO, capture_output=True, text=True, check=True)
                end_to_end = float(re.search(r"([\d.]+) volumes/s", out.stdout).group(1))
                results.append({"model": name, "grid": grid, "end_to_end_vol_per_s": end_to_end,
                                "model_only_vol_per_s": round(forward_rate(model, grid, 2, args.device,
                                                                           1 if grid > 128 else 5), 3)})
    print(json.dumps({"benchmark": "predict", "device": args.device, "cpu_count": os.cpu_count(),
                      "sources": f"{count} x {'x'.join(map(str, source_size))} int16 .nii.gz", "results": results},
                     indent=2))


if __name__ == "__main__":
    main()
