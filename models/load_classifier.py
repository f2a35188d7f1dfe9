"""Rebuild a model from a VolMAE checkpoint for inference: a fine-tuned classifier, or an MAE encoder.

Both come back exactly as trained: strict loading into the model the checkpoint names, built from the
configuration it carries. An MAE is kept whole; only its encoder (`forward_features`) is used, for embeddings.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from ..util.checkpoint import CheckpointError, load_checkpoint
from ..util.errors import DataError
from ..util.exported import ExportError, read_config
from .classifier_checkpoint import CLASSIFIER_KIND, ClassifierCheckpoint, ClassifierCheckpointError
from .exported_runtime import OnnxModel
from .mae3d import PRETRAINING_ONLY_PREFIXES
from .pretraining_checkpoint import PretrainingCheckpoint, PretrainingCheckpointError
from .registry import create_model


class NotAVolMAECheckpoint(DataError):
    """The file is not a checkpoint this step can use; the message says what it is and what is needed."""


@dataclass
class LoadedModel:
    model: torch.nn.Module
    meta: dict  # the checkpoint without its weights: class names, task, data, input size, preprocessing
    is_classifier: bool


def _read(path: Path) -> dict:
    try:
        checkpoint = load_checkpoint(path)
    except FileNotFoundError:
        raise NotAVolMAECheckpoint(f"{path}: no such file") from None
    except CheckpointError as err:
        raise NotAVolMAECheckpoint(str(err)) from None
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise NotAVolMAECheckpoint(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise NotAVolMAECheckpoint(f"{path}: not a VolMAE checkpoint (no 'model' weights)")
    return checkpoint


def load_onnx(path: Path, allow_encoder: bool) -> LoadedModel:
    """An ONNX export run by onnxruntime, with the preprocessing and classes of the config.json beside it."""
    try:
        config = read_config(path.parent)
    except ExportError as err:
        raise NotAVolMAECheckpoint(f"{path}: an ONNX file without a VolMAE config.json beside it ({err})") from None
    output = config.get("onnx", {}).get("output")
    if output not in ("logits", "embedding") or (output == "embedding" and not allow_encoder):
        raise NotAVolMAECheckpoint(f"{path}: an ONNX export of {output or 'an unknown output'}; predictions need "
                                   f"an exported classifier, --embeddings an exported encoder")
    return LoadedModel(OnnxModel(path, output), dict(config["checkpoint"]), output == "logits")


def load_for_inference(path: str | Path, allow_encoder: bool = False) -> LoadedModel:
    """A fine-tuned classifier; or, with `allow_encoder`, the encoder of an MAE pretraining checkpoint. Either
    may be a VolMAE export: its folder (safetensors), or its model.onnx."""
    path = Path(path)
    if path.suffix == ".onnx":
        return load_onnx(path, allow_encoder)
    checkpoint = _read(path)
    if checkpoint.get("kind") == CLASSIFIER_KIND:
        try:
            classifier = ClassifierCheckpoint.from_dict(checkpoint, path)
        except ClassifierCheckpointError as err:
            raise NotAVolMAECheckpoint(str(err)) from None
        model = create_model(classifier.model_name, **classifier.model_config)
        model.load_state_dict(classifier.weights, strict=True)
        return LoadedModel(model.eval(), classifier.meta(), True)
    if str(checkpoint.get("model_name", "")).startswith("mae_") and allow_encoder:
        try:
            mae = PretrainingCheckpoint.from_dict(checkpoint, path)
        except PretrainingCheckpointError as err:
            raise NotAVolMAECheckpoint(str(err)) from None
        model = create_model(mae.model_name, **mae.model_config)
        missing, unexpected = model.load_state_dict(mae.weights, strict=False)
        missing = [k for k in missing if not k.startswith(PRETRAINING_ONLY_PREFIXES)]  # encoder.pth has no decoder
        if missing or unexpected:
            raise NotAVolMAECheckpoint(f"{path}: weights do not fit {mae.model_name} (missing: "
                                       f"{', '.join(missing[:8]) or '-'}; unexpected: {', '.join(unexpected[:8]) or '-'})")
        return LoadedModel(model.eval(), {**mae.state(), "input_size": list(model.img_size)}, False)
    what = "an MAE pretraining checkpoint" if str(checkpoint.get("model_name", "")).startswith("mae_") else \
        "not a fine-tuned VolMAE classifier"
    hint = " (it gives embeddings with --embeddings, not predictions)" if "MAE" in what else \
        " (make one with main_finetune.py: its best.pth)"
    raise NotAVolMAECheckpoint(f"{path}: {what}{hint}")
