"""The exported model folder (`volmae-export`): weights as safetensors, everything else as JSON.

    DIR/model.safetensors   the state dict, loaded without pickle
    DIR/config.json         {"format", "version", "checkpoint": the checkpoint's other entries, "card": ...}
    DIR/MODEL_CARD.md       written from config.json

`load_checkpoint` reads such a folder (or its model.safetensors) as the same dict `best.pth` or
`encoder.pth` holds, so prediction and `--finetune` take it where they take a checkpoint.
"""
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_write
from .errors import DataError

EXPORT_FORMAT = "volmae-export"
EXPORT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class ExportError(DataError):
    """An exported folder that cannot be used, or a model that cannot be exported; one line naming why."""


def export_folder(path: str | os.PathLike) -> Path | None:
    """The exported folder `path` names (the folder, or a file in it), or None when it is not one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    return folder if (folder / CONFIG_FILE).is_file() and (path.is_dir() or path.suffix in (".safetensors", ".onnx")) \
        else None


def read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ExportError(f"{folder / CONFIG_FILE}: unreadable ({err})") from None
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{folder / CONFIG_FILE}: not a VolMAE export (format {config.get('format')!r})")
    if config.get("version") != EXPORT_VERSION:
        raise ExportError(f"{folder / CONFIG_FILE}: export version {config.get('version')}, this VolMAE reads "
                          f"{EXPORT_VERSION}")
    return config


def read_exported(folder: Path) -> dict:
    """The checkpoint dict of an exported folder: its JSON entries and the safetensors weights as `model`."""
    config = read_config(folder)
    try:
        weights = load_file(folder / WEIGHTS_FILE)
    except FileNotFoundError:
        raise ExportError(f"{folder}: no {WEIGHTS_FILE} (an ONNX export is run by volmae-predict, not loaded as "
                          f"weights)") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{folder / WEIGHTS_FILE}: unreadable ({err})") from None
    return {**config["checkpoint"], "model": weights}


def write_config(folder: Path, checkpoint: dict, card: dict, extra: dict | None = None) -> dict:
    """config.json: the checkpoint's entries other than its weights, the model card's facts, and `extra`
    (e.g. the ONNX graph's record)."""
    config = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
              "checkpoint": {k: v for k, v in checkpoint.items() if k != "model"}, "card": card, **(extra or {})}
    text = json.dumps(config, indent=2)
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return config


def write_weights(folder: Path, weights: dict[str, torch.Tensor]) -> Path:
    """model.safetensors; tensors that share storage (tied weights) are written as separate copies."""
    tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    path = folder / WEIGHTS_FILE
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": EXPORT_FORMAT}))
    return path
