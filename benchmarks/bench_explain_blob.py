"""Do the explanations point at the evidence? A toy task where the label is whether a bright blob
is present somewhere in a noisy volume: train a model, then measure, on positive test volumes, the
share of the explanation's mass inside the blob against the blob's share of the volume.

    python benchmarks/bench_explain_blob.py --model vit3d_tiny_patch4 [--model medvit3d_tiny]

Prints JSON: test accuracy, mean mass inside the blob, the blob's mean volume share, and their ratio
(1 = no better than a uniform map).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json

import torch

from .. import models
from ..datasets.blobs import blob_volumes
from ..util.explain_check import blob_explanation_ratio


def evaluate(name: str, size: int = 24, train_count: int = 320, test_count: int = 64, epochs: int = 8,
             lr: float = 1e-3, radius: float = 3.0, seed: int = 0) -> dict:
    train_set = blob_volumes(train_count, size, radius, seed)
    test_set = blob_volumes(test_count, size, radius, seed + 1)
    options = {"img_size": size, "depth": 4} if name.startswith("vit3d") else {}
    torch.manual_seed(seed)  # initial weights and batch order: the figure is reproducible
    model = models.create_model(name, num_classes=2, **options)
    return {"model": name, **blob_explanation_ratio(model, train_set, test_set, epochs, lr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    names = args.model or ["vit3d_tiny_patch4", "medvit3d_tiny"]
    print(json.dumps({"benchmark": "explanation_blob_test", "size": args.size, "seed": args.seed,
                      "results": [evaluate(name, size=args.size, epochs=args.epochs, seed=args.seed)
                                  for name in names]}, indent=2))


if __name__ == "__main__":
    main()
