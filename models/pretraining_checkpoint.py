"""What a pretraining run saves with its weights: in every resume checkpoint, model.pth and encoder.pth.

Written and read by this one type. The file is a plain dict (weights_only loading accepts nothing else); version 2
adds `format_version`, and version 1 files, written before it, still load: what they lack reads as its default.
Foreign MAE checkpoints (the reference systems') carry none of this; models.load_pretrained reads their weights.
"""
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..util.checkpoint import atomic_save, load_checkpoint, plain_args, readable_version
from ..util.errors import DataError

PRETRAINING_VERSION = 2


class PretrainingCheckpointError(DataError):
    """A file that is not a VolMAE pretraining checkpoint this version can read; the message names the file."""


@dataclass(frozen=True)
class PretrainingCheckpoint:
    model_name: str
    model_config: dict
    data: dict = field(default_factory=dict)  # where the volumes came from: the cache, its dtype and size
    preprocess: dict | None = None  # datasets.preprocess.PreprocessConfig.to_dict() of the cache
    args: dict = field(default_factory=dict)  # the command line as resolved (main_pretrain)
    epoch: int = 0
    step: int = 0
    applied_steps: int = 0
    nonfinite_steps: int = 0
    weights: dict | None = None

    def at(self, step: int, steps_per_epoch: int, applied_steps: int, nonfinite_steps: int) -> "PretrainingCheckpoint":
        return replace(self, epoch=step // steps_per_epoch, step=step, applied_steps=applied_steps,
                       nonfinite_steps=nonfinite_steps)

    def with_weights(self, weights: dict) -> "PretrainingCheckpoint":
        return replace(self, weights=weights)

    def state(self) -> dict:
        """Everything but the weights: what a resume checkpoint stores beside the model and optimizer."""
        return {"format_version": PRETRAINING_VERSION, "model_name": self.model_name,
                "model_config": plain_args(self.model_config), "data": plain_args(self.data),
                "preprocess": self.preprocess, "args": plain_args(self.args), "epoch": self.epoch, "step": self.step,
                "applied_steps": self.applied_steps, "nonfinite_steps": self.nonfinite_steps}

    def save(self, path: str | os.PathLike) -> None:
        if self.weights is None:
            raise ValueError("model.pth and encoder.pth are written with their weights")
        atomic_save({"model": self.weights, **self.state()}, path)

    @classmethod
    def from_dict(cls, stored: dict[str, Any], path: str | os.PathLike) -> "PretrainingCheckpoint":
        readable_version(stored, PRETRAINING_VERSION, "pretraining", path, PretrainingCheckpointError)
        if not isinstance(stored.get("model_name"), str) or not isinstance(stored.get("model_config"), dict):
            raise PretrainingCheckpointError(f"{path}: not a VolMAE pretraining checkpoint (no model_name and "
                                             f"model_config)")
        names = {f.name for f in fields(cls)} - {"weights", "applied_steps"}
        known = {key: stored[key] for key in names if stored.get(key) is not None}
        applied = stored.get("applied_steps", known.get("step", 0))  # version 1 before the count: every step applied
        weights = stored.get("model")
        if isinstance(weights, dict):  # weights saved from a DistributedDataParallel wrapper name it in every key
            weights = {key.removeprefix("module."): value for key, value in weights.items()}
        return cls(**known, applied_steps=int(applied), weights=weights)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PretrainingCheckpoint":
        return cls.from_dict(load_checkpoint(path), path)
