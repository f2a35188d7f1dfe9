"""Rebuild a model from a VolMAE checkpoint for inference: a fine-tuned classifier, or an MAE encoder.

Classifiers come back exactly as trained (strict loading from the model name and configuration the
checkpoint carries). An MAE checkpoint gives its encoder as a ViT with the encoder's final norm,
for embeddings only.
"""
from dataclasses import dataclass
from pathlib import Path

import torch

import models
from models.load_pretrained import load_encoder
from models.vit import VisionTransformer
from util.checkpoint import load_checkpoint

CLASSIFIER_KIND = "volmae-classifier"


class NotAVolMAECheckpoint(ValueError):
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
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise NotAVolMAECheckpoint(f"{path}: not a readable PyTorch checkpoint ({type(err).__name__})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise NotAVolMAECheckpoint(f"{path}: not a VolMAE checkpoint (no 'model' weights)")
    return checkpoint


def load_for_inference(path: str | Path, allow_encoder: bool = False) -> LoadedModel:
    """A fine-tuned classifier; or, with `allow_encoder`, the encoder of an MAE pretraining checkpoint."""
    path = Path(path)
    checkpoint = _read(path)
    meta = {k: v for k, v in checkpoint.items() if k != "model"}
    if checkpoint.get("kind") == CLASSIFIER_KIND:
        model = models.create_model(checkpoint["model_name"], **checkpoint["model_config"])
        model.load_state_dict(checkpoint["model"], strict=True)
        return LoadedModel(model.eval(), meta, True)
    if str(checkpoint.get("model_name", "")).startswith("mae_") and allow_encoder:
        config = checkpoint["model_config"]
        encoder = VisionTransformer(
            img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
            embed_dim=config["embed_dim"], depth=config["depth"], num_heads=config["num_heads"],
            mlp_ratio=config["mlp_ratio"], num_classes=1, global_pool="token",
            input_mean=config.get("input_mean", 0.0), input_std=config.get("input_std", 1.0))
        load_encoder(encoder, path)
        meta["input_size"] = config["img_size"]
        return LoadedModel(encoder.eval(), meta, False)
    what = "an MAE pretraining checkpoint" if str(checkpoint.get("model_name", "")).startswith("mae_") else \
        "not a fine-tuned VolMAE classifier"
    hint = " (it gives embeddings with --embeddings, not predictions)" if "MAE" in what else \
        " (make one with main_finetune.py: its best.pth)"
    raise NotAVolMAECheckpoint(f"{path}: {what}{hint}")
