"""The frozen-feature probe: kNN and linear AUCs of the encoder's mean token on a labelled set, at step 0 and
every --probe_every epochs, the signal that tells whether pretraining is buying anything long before
fine-tuning would."""
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

from ..datasets.probe_data import ProbeDataError, ProbeSet, csv_probe_set, medmnist_probe_set
from ..util.errors import DataError, UsageError
from ..util.probe_scores import probe_aucs
from ..volumes.preprocess import PreprocessConfig


class FeatureProbe:
    """Scores the encoder's frozen features on a labelled set (kNN and linear probe AUCs, util.probe_scores)."""

    def __init__(self, probe_set: ProbeSet, every: int, batch_size: int = 64):
        self.probe_set = probe_set
        self.every = every  # epochs between probes (besides step 0 and the end)
        self.batch_size = batch_size

    def describe(self) -> str:
        return (f"probe: {self.probe_set.describe()} ({self.probe_set.task}); kNN (cosine, k=20) and logistic "
                f"regression on the frozen encoder's mean token, every {self.every} epochs")

    @torch.no_grad()
    def features(self, core: torch.nn.Module, images: np.ndarray, device: torch.device) -> np.ndarray:
        """Mean of the patch tokens after the encoder's final norm, no token masked: [N, E]."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.from_numpy(images[start:start + self.batch_size]).to(device)
            parts.append(core.forward_features(batch)[:, 1:].mean(dim=1).float().cpu().numpy())
        return np.concatenate(parts)

    def __call__(self, core: torch.nn.Module, device: torch.device) -> dict[str, float]:
        training = core.training
        core.eval()
        start = time.perf_counter()
        (train_x, train_y), (val_x, val_y) = self.probe_set.splits["train"], self.probe_set.splits["val"]
        scores = probe_aucs(self.features(core, train_x, device), train_y, self.features(core, val_x, device), val_y,
                            self.probe_set.task, self.probe_set.num_classes)
        core.train(training)
        return {**scores, "probe_seconds": time.perf_counter() - start}


def build_probe(args: Namespace, core: torch.nn.Module, preprocess: PreprocessConfig | None) -> FeatureProbe | None:
    """The labelled set of --probe_data_flag or --probe_csv, checked against the model's grid; None without one."""
    if not (args.probe_data_flag or args.probe_csv):
        return None
    if args.probe_data_flag and args.probe_csv:
        raise UsageError("give --probe_data_flag or --probe_csv, not both")
    if args.deepspeed:
        raise UsageError("the probes read the whole encoder on one rank; DeepSpeed shards it: drop --probe_*")
    grid = tuple(core.img_size)
    try:
        if args.probe_csv:
            if preprocess is None:
                raise ProbeDataError("--probe_csv takes volumes; with --data_flag use --probe_data_flag")
            probe_set = csv_probe_set(Path(args.probe_csv), preprocess, grid)
        else:
            probe_set = medmnist_probe_set(args.probe_data_flag, args.probe_size or grid[0], args.probe_root)
    except ProbeDataError as err:
        raise DataError(f"probe: {err}") from None
    if probe_set.grid != grid or probe_set.splits["train"][0].shape[1] != core.in_chans:
        raise DataError(f"probe: {probe_set.name} has images of {probe_set.splits['train'][0].shape[1:]}, "
                        f"the model takes ({core.in_chans}, {', '.join(map(str, grid))})")
    return FeatureProbe(probe_set, args.probe_every)
