"""best.pth: a fine-tuned classifier with what it takes to use it, written and read by this one type.

The file is a plain dict (weights_only loading accepts nothing else). Version 2 adds `format_version` and `run`
(the resolved run configuration); version 1 files, written before it, still load: what they lack reads as empty.
"""
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any

from ..util.checkpoint import atomic_save, load_checkpoint, plain_args, readable_version
from ..util.errors import DataError

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
    preprocess: dict | None = None  # datasets.preprocess.PreprocessConfig.to_dict(); None for MedMNIST arrays
    data: dict = field(default_factory=dict)
    setup: str | None = None
    run: dict = field(default_factory=dict)  # finetuning.run_config.FinetuneRun.to_dict() of the chosen candidate
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
