"""Rebuild a model from a VolMAE checkpoint for inference: a fine-tuned classifier, or an MAE encoder.

Both come back exactly as trained: strict loading into the model the checkpoint names, built from the
configuration it carries. An MAE is kept whole; only its encoder (`forward_features`) is used, for embeddings.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.ensemble import ProbabilityEnsemble
from ..models.mae3d import PRETRAINING_ONLY_PREFIXES
from ..models.registry import create_model
from ..util.checkpoint import CheckpointError, first_line
from ..util.errors import DataError
from .checkpoints import (
    CLASSIFIER_KIND,
    ClassifierCheckpoint,
    ClassifierCheckpointError,
    PretrainingCheckpoint,
    PretrainingCheckpointError,
    load_checkpoint,
)
from .ensemble_folder import EnsembleError, ensemble_members, is_ensemble
from .exported import CONFIG_HASH_KEY, ONNX_FILE, ExportError, check_file, export_folder, read_config
from .onnx_runtime import OnnxModel


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


def load_onnx(folder: Path, allow_encoder: bool, name: str = ONNX_FILE) -> LoadedModel:
    """An ONNX export run by onnxruntime, with the preprocessing and classes of its config.json, each file checked
    against the other's hash."""
    try:
        config = read_config(folder)
        if name not in config["files"]:
            raise ExportError(f"{folder}: an export of format {config.get('export_format', '?')} without {name}")
        output = config.get("onnx", {}).get("output")
        if output not in ("logits", "embedding"):
            raise ExportError(f"{folder / 'config.json'}: key 'onnx.output' is {output!r}, not logits or embedding")
        model = OnnxModel(folder / name, output)
        check_file(folder, config, name, model.metadata.get(CONFIG_HASH_KEY))
    except ExportError as err:
        raise NotAVolMAECheckpoint(str(err)) from None
    if output == "embedding" and not allow_encoder:
        raise NotAVolMAECheckpoint(f"{folder / name}: an ONNX export of an encoder's embedding; predictions need "
                                   f"an exported classifier (it gives --embeddings)")
    return LoadedModel(model, dict(config["checkpoint"]), output == "logits")


MAX_TOKENS = 2 ** 20  # a configuration asking for more patches than this is damaged, not a model to build


def build_from(path: Path, name: str, config: dict) -> torch.nn.Module:
    """The model a checkpoint names, built from its configuration; a configuration that cannot build it (a wrong
    type, a missing or absurd size) is one line naming the file."""
    img_size, patch_size = config.get("img_size"), config.get("patch_size")
    try:
        if img_size is not None and patch_size is not None:
            sizes = [int(v) for v in (img_size if isinstance(img_size, (list, tuple)) else [img_size] * 3)]
            patches = [int(v) for v in (patch_size if isinstance(patch_size, (list, tuple)) else [patch_size] * len(sizes))]
            tokens = 1
            for size, patch in zip(sizes, patches):
                tokens *= max(size, 1) // max(patch, 1)
            if tokens > MAX_TOKENS:
                raise ValueError(f"img_size {img_size} with patch_size {patch_size} gives {tokens:,} patches")
        return create_model(name, **config)
    except Exception as err:  # noqa: BLE001 - a damaged configuration fails in many ways inside a constructor
        raise NotAVolMAECheckpoint(f"{path}: its model_config cannot build {name} ({type(err).__name__}: "
                                   f"{first_line(err)})") from None


def check_fit(path: Path, name: str, model: torch.nn.Module, weights: dict, optional: tuple[str, ...] = ()) -> None:
    """The weights' keys and shapes against the model's, one line naming the first that differs; keys under
    `optional` may be missing (an encoder.pth has no decoder)."""
    expected = model.state_dict()
    for key, value in weights.items():
        if key not in expected:
            raise NotAVolMAECheckpoint(f"{path}: weight {key!r} has no place in {name} as configured")
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(expected[key].shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise NotAVolMAECheckpoint(f"{path}: weight {key!r} is {shape}, {name} as configured needs "
                                       f"{tuple(expected[key].shape)}")
    missing = [key for key in expected if key not in weights and not key.startswith(optional)]
    if missing:
        raise NotAVolMAECheckpoint(f"{path}: weights of {name} without {', '.join(missing[:4])}")


SHARED_META = ("model_name", "model_config", "class_names", "task", "input_size", "preprocess")


def load_ensemble(folder: Path) -> LoadedModel:
    """A cross-validated run's final_model folder: its members (fold models) as one classifier of their mean
    probability (models.ensemble). The members must agree on what they take and give."""
    try:
        members = [load_for_inference(member) for member in ensemble_members(folder)]
    except EnsembleError as err:
        raise NotAVolMAECheckpoint(str(err)) from None
    first = members[0].meta
    for i, member in enumerate(members[1:], start=1):
        differ = [key for key in SHARED_META if member.meta.get(key) != first.get(key)]
        if differ:
            raise NotAVolMAECheckpoint(f"{folder}: member {i} differs from member 0 in {', '.join(differ)}")
    model = ProbabilityEnsemble([m.model for m in members], first["task"])
    meta = {**first, "ensemble": {"members": len(members), "combine": "mean probability"}}
    return LoadedModel(model.eval(), meta, True)


def exported_ensemble(path: Path, classifier: ClassifierCheckpoint, record) -> ProbabilityEnsemble:
    """An exported ensemble's members rebuilt from the one state dict that holds them all."""
    count = record.get("members") if isinstance(record, dict) else None
    if not isinstance(count, int) or count < 1:
        raise NotAVolMAECheckpoint(f"{path}: 'ensemble.members' is {count!r}, not a count of members")
    members = []
    for i in range(count):
        prefix = f"members.{i}."
        weights = {k.removeprefix(prefix): v for k, v in classifier.weights.items() if k.startswith(prefix)}
        model = build_from(path, classifier.model_name, classifier.model_config)
        check_fit(path, f"{classifier.model_name} (member {i})", model, weights)
        model.load_state_dict(weights, strict=True)
        members.append(model)
    return ProbabilityEnsemble(members, classifier.task)


def load_for_inference(path: str | Path, allow_encoder: bool = False) -> LoadedModel:
    """A fine-tuned classifier; or, with `allow_encoder`, the encoder of an MAE pretraining checkpoint. Either
    may be a VolMAE export: its folder (safetensors), or its model.onnx."""
    path = Path(path)
    if is_ensemble(path):
        return load_ensemble(path)
    folder = export_folder(path)
    if folder is not None and (path.suffix == ".onnx" or (path.is_dir() and (folder / ONNX_FILE).is_file()
                                                           and not (folder / "model.safetensors").exists())):
        return load_onnx(folder, allow_encoder, path.name if path.suffix == ".onnx" else ONNX_FILE)
    if path.suffix == ".onnx":
        raise NotAVolMAECheckpoint(f"{path}: an ONNX file without a VolMAE config.json beside it")
    checkpoint = _read(path)
    if checkpoint.get("kind") == CLASSIFIER_KIND:
        try:
            classifier = ClassifierCheckpoint.from_dict(checkpoint, path)
        except ClassifierCheckpointError as err:
            raise NotAVolMAECheckpoint(str(err)) from None
        meta = classifier.meta()
        if "ensemble" in checkpoint:  # an exported ensemble: each member's weights under members.<i>.
            meta["ensemble"] = checkpoint["ensemble"]
            return LoadedModel(exported_ensemble(path, classifier, checkpoint["ensemble"]).eval(), meta, True)
        model = build_from(path, classifier.model_name, classifier.model_config)
        check_fit(path, classifier.model_name, model, classifier.weights)
        model.load_state_dict(classifier.weights, strict=True)
        return LoadedModel(model.eval(), meta, True)
    if str(checkpoint.get("model_name", "")).startswith("mae_") and allow_encoder:
        try:
            mae = PretrainingCheckpoint.from_dict(checkpoint, path)
        except PretrainingCheckpointError as err:
            raise NotAVolMAECheckpoint(str(err)) from None
        model = build_from(path, mae.model_name, mae.model_config)
        check_fit(path, mae.model_name, model, mae.weights, PRETRAINING_ONLY_PREFIXES)  # encoder.pth: no decoder
        model.load_state_dict(mae.weights, strict=False)
        return LoadedModel(model.eval(), {**mae.state(), "input_size": list(model.img_size)}, False)
    what = "an MAE pretraining checkpoint" if str(checkpoint.get("model_name", "")).startswith("mae_") else \
        "not a fine-tuned VolMAE classifier"
    hint = " (it gives embeddings with --embeddings, not predictions)" if "MAE" in what else \
        " (make one with main_finetune.py: its best.pth)"
    raise NotAVolMAECheckpoint(f"{path}: {what}{hint}")
