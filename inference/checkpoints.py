"""The checkpoint files VolMAE writes and reads, in one place: a fine-tuned classifier (best.pth) and a
pretraining run's state (every resume checkpoint, model.pth and encoder.pth), each one versioned type written and
read by itself, and `load_checkpoint`, which opens any of them, or a `volmae-export` folder, as the same dict.

Each file is a plain dict (weights_only loading accepts nothing else). Version 2 of both types adds
`format_version` (and, for a classifier, `run`: the resolved run configuration); version 1 files, written before
it, still load: what they lack reads as its default. Foreign MAE checkpoints (the reference systems') carry none
of this; inference.load_pretrained reads their weights.
"""
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..util.checkpoint import CheckpointError, atomic_save, load_torch_file, plain_args, readable_version
from ..util.errors import DataError
from .exported import ExportError, export_folder, read_exported


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint as a dict: a torch file (util.checkpoint.load_torch_file: weights_only, one-line errors), or
    a folder written by volmae-export (its folder, config.json or model.safetensors) read without pickle."""
    folder = export_folder(path)
    if folder is not None:
        try:
            return read_exported(folder)
        except ExportError as err:
            raise CheckpointError(str(err)) from None
    if Path(path).suffix.lower() == ".json" and Path(path).is_file():
        raise CheckpointError(f"{path}: a JSON file without a VolMAE export beside it, not a checkpoint; give an "
                              f"export's folder, a best.pth or an encoder.pth")
    return load_torch_file(path)


# ---- best.pth: a fine-tuned classifier -------------------------------------------------------------------------

CLASSIFIER_KIND = "volmae-classifier"
CHECKPOINT_VERSION = 2
_REQUIRED = ("model", "model_name", "model_config", "class_names", "task", "input_size")


class ClassifierCheckpointError(DataError):
    """A file that is not a classifier this version can read; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ClassifierCheckpoint:
    model_name: str
    model_config: dict
    class_names: list
    task: str
    input_size: list
    preprocess: dict | None = None  # volumes.preprocess.PreprocessConfig.to_dict(); None for MedMNIST arrays
    data: dict = field(default_factory=dict)
    setup: str | None = None
    run: dict = field(default_factory=dict)  # finetuning.finetune_config.FinetuneRun.to_dict() of the chosen candidate
    args: dict = field(default_factory=dict)  # the command line as parsed
    weights: dict | None = None
    epoch: int | None = None
    val_scores: dict = field(default_factory=dict)  # the selection score of `epoch`: val_auc, or val_r2

    def with_weights(self, weights: dict, epoch: int, val_scores: dict) -> "ClassifierCheckpoint":
        return replace(self, weights=weights, epoch=epoch, val_scores=dict(val_scores))

    def to_dict(self) -> dict:
        if self.weights is None:
            raise ValueError("a classifier checkpoint is written with its weights")
        return {"kind": CLASSIFIER_KIND, "format_version": CHECKPOINT_VERSION, "model": self.weights,
                "model_name": self.model_name, "model_config": plain_args(self.model_config),
                "class_names": list(self.class_names), "task": self.task, "input_size": list(self.input_size),
                "preprocess": self.preprocess, "data": plain_args(self.data), "setup": self.setup,
                "run": plain_args(self.run), "args": plain_args(self.args), "epoch": self.epoch, **self.val_scores}

    def save(self, path: str | os.PathLike) -> None:
        atomic_save(self.to_dict(), path)

    def meta(self) -> dict:
        """Everything but the weights, as the file stores it: what prediction, export and model cards read."""
        return {k: v for k, v in self.to_dict().items() if k != "model"}

    @classmethod
    def from_dict(cls, stored: dict[str, Any], path: str | os.PathLike) -> "ClassifierCheckpoint":
        if stored.get("kind") != CLASSIFIER_KIND:
            raise ClassifierCheckpointError(f"{path}: not a fine-tuned VolMAE classifier")
        readable_version(stored, CHECKPOINT_VERSION, "classifier", path, ClassifierCheckpointError)
        missing = [key for key in _REQUIRED if key not in stored]
        if missing:
            raise ClassifierCheckpointError(f"{path}: a classifier checkpoint without {', '.join(missing)}")
        names = {f.name for f in fields(cls)} - {"weights", "val_scores"}
        known = {key: stored[key] for key in names if stored.get(key) is not None}
        scores = {key: stored[key] for key in ("val_auc", "val_r2") if key in stored}
        return cls(**known, weights=stored["model"], val_scores=scores)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ClassifierCheckpoint":
        return cls.from_dict(load_checkpoint(path), path)

# ---- a pretraining run: resume checkpoints, model.pth, encoder.pth ----------------------------------------------

PRETRAINING_VERSION = 2


class PretrainingCheckpointError(DataError):
    """A file that is not a VolMAE pretraining checkpoint this version can read; the message names the file."""


@dataclass(frozen=True)
class PretrainingCheckpoint:
    model_name: str
    model_config: dict
    data: dict = field(default_factory=dict)  # where the volumes came from: the cache, its dtype and size
    preprocess: dict | None = None  # volumes.preprocess.PreprocessConfig.to_dict() of the cache
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
