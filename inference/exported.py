"""The exported model folder (`volmae-export`): weights as safetensors or ONNX, everything else as JSON, each
file tied to the others by hashes.

    DIR/model.safetensors   the state dict, loaded without pickle (or DIR/model.onnx, or MONAI's files)
    DIR/config.json         {"format", "version", "checkpoint": the checkpoint's other entries, "card": ...,
                             "config_sha256", "files": {name: sha256 of every other file written}}
    DIR/MODEL_CARD.md       written from config.json

The ties run both ways. `config_sha256` is the hash of the model's definition in config.json (`checkpoint`
and `card`: the model, its classes and its preprocessing); the weights file carries the same hash in its own
metadata (safetensors metadata, ONNX metadata_props), and config.json records the hash of every file. An
edited preprocessing, a weights file swapped for another model's or a file cut short is refused on reading
in one line naming the file, never used. `files` is also what the folder holds: a later `--overwrite` replaces
a folder only when every entry in it is one of these.

`load_checkpoint` reads such a folder (its model.safetensors, or its config.json) as the same dict `best.pth`
or `encoder.pth` holds, so prediction and `--finetune` take it where they take a checkpoint.
"""
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..util.atomic import atomic_write
from ..util.checkpoint import load_torch_file
from ..util.errors import DataError
from ..util.strict_json import finite

EXPORT_FORMAT = "volmae-export"
EXPORT_VERSION = 2
CONFIG_FILE = "config.json"
CARD_FILE = "MODEL_CARD.md"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
BUNDLE_WEIGHTS = "models/model.pt"  # a MONAI bundle's (inference.monai_bundle)
CONFIG_HASH_KEY = "volmae_config_sha256"  # in the weights file's own metadata
DEFINITION_KEYS = ("checkpoint", "card")  # the part of config.json the hash covers: what the weights mean


class ExportError(DataError):
    """An exported folder that cannot be used, or a model that cannot be exported; one line naming why."""


def export_folder(path: str | os.PathLike) -> Path | None:
    """The exported folder `path` names (the folder, its config.json or a weights file in it), or None when it
    is not one."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    named = path.is_dir() or path.suffix in (".safetensors", ".onnx") or path.name == CONFIG_FILE
    return folder if named and (folder / CONFIG_FILE).is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def definition_sha256(config: dict) -> str:
    """The hash of what the weights mean: config.json's `checkpoint` and `card`, in a canonical JSON form."""
    text = json.dumps({key: config.get(key) for key in DEFINITION_KEYS}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def read_config(folder: Path) -> dict:
    """config.json of an export, its shape checked: each problem is one line naming the file and the key."""
    path = folder / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{path}: unreadable ({err})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ExportError(f"{path}: not a VolMAE export (format {found!r})")
    if config.get("version") != EXPORT_VERSION:
        raise ExportError(f"{path}: export version {config.get('version')}, this VolMAE reads {EXPORT_VERSION} "
                          f"(older exports carry no hashes): export the checkpoint again")
    checkpoint = config.get("checkpoint")
    if not isinstance(checkpoint, dict):
        raise ExportError(f"{path}: key 'checkpoint' is missing or not an object")
    for key, kind in (("model_name", str), ("model_config", dict)):
        if not isinstance(checkpoint.get(key), kind):
            raise ExportError(f"{path}: key 'checkpoint.{key}' is missing or not a {kind.__name__}")
    if not isinstance(config.get("files"), dict) or not isinstance(config.get("config_sha256"), str):
        raise ExportError(f"{path}: keys 'files' and 'config_sha256' are missing: not a whole export")
    if definition_sha256(config) != config["config_sha256"]:
        raise ExportError(f"{path}: 'checkpoint' or 'card' was edited after the export (its hash no longer "
                          f"matches config_sha256); export the checkpoint again rather than editing it")
    return config


def check_file(folder: Path, config: dict, name: str, embedded_hash: str | None) -> Path:
    """`name` of an export, checked against config.json: its own hash, and the config hash it carries."""
    path = folder / name
    recorded = config["files"].get(name)
    if recorded is None:
        raise ExportError(f"{folder / CONFIG_FILE}: lists no {name} in 'files' (it lists {', '.join(config['files'])})")
    if not path.is_file():
        raise ExportError(f"{path}: missing (config.json lists it)")
    if file_sha256(path) != recorded:
        raise ExportError(f"{path}: its hash differs from the one config.json records: the file was replaced or "
                          f"damaged after the export")
    if embedded_hash != config["config_sha256"]:
        raise ExportError(f"{path}: carries config hash {str(embedded_hash)[:12]}, config.json is "
                          f"{config['config_sha256'][:12]}: this weights file belongs to another export")
    return path


def verify_files(folder: Path, config: dict, skip: tuple[str, ...] = ()) -> None:
    """Every file config.json lists (but `skip`, checked where it is read) is there and has the hash it records:
    an edited metadata, script or card is refused as a swapped weights file is."""
    for name, recorded in config["files"].items():
        if name in skip:
            continue
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path}: missing (config.json lists it)")
        if file_sha256(path) != recorded:
            raise ExportError(f"{path}: its hash differs from the one config.json records: the file was edited, "
                              f"replaced or damaged after the export")


def read_exported(folder: Path) -> dict:
    """The checkpoint dict of an exported folder: its JSON entries and the weights as `model` (model.safetensors, or
    a MONAI bundle's models/model.pt), every file checked against config.json first."""
    config = read_config(folder)
    verify_files(folder, config, skip=(WEIGHTS_FILE,))
    if BUNDLE_WEIGHTS in config["files"]:
        return {**config["checkpoint"], "model": load_torch_file(folder / BUNDLE_WEIGHTS)}
    if WEIGHTS_FILE not in config["files"]:
        kind = "an ONNX export (volmae-predict runs its model.onnx)" if ONNX_FILE in config["files"] else \
            f"an export of format {config.get('export_format', 'other than safetensors')}"
        raise ExportError(f"{folder}: {kind}; it has no {WEIGHTS_FILE} to load as weights")
    path = folder / WEIGHTS_FILE
    try:
        with safe_open(path, framework="pt") as f:
            embedded = (f.metadata() or {}).get(CONFIG_HASH_KEY)
            check_file(folder, config, WEIGHTS_FILE, embedded)
            weights = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise ExportError(f"{path}: unreadable ({err})") from None
    return {**config["checkpoint"], "model": weights}


def owned_entries(folder: Path) -> set[str] | None:
    """The names an export in `folder` wrote (config.json lists them), or None when the folder holds no VolMAE
    export of this version."""
    try:
        config = read_config(folder)
    except ExportError:
        return None
    return {CONFIG_FILE, *(Path(name).parts[0] for name in config["files"])}


def refuse_folder(folder: Path, overwrite: bool) -> None:
    """Before any work: an export goes into a new or empty folder, or with `overwrite` replaces a folder that
    holds only an earlier export's files. Anything else in it (a run's outputs, a user's files) is never
    touched: the export is refused in one line naming them."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ExportError(f"--output_dir {folder} is a file")
    entries = {entry.name for entry in folder.iterdir()}
    if not entries:
        return
    owned = owned_entries(folder)
    foreign = sorted(entries - (owned or set()))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ExportError(f"--output_dir {folder} holds files no export of this VolMAE wrote ({shown}); export "
                          f"into a new or empty folder")
    if not overwrite:
        raise ExportError(f"--output_dir {folder} holds an export already; choose another --output_dir or add "
                          f"--overwrite to replace it")


def write_config(folder: Path, config: dict, files: list[str]) -> dict:
    """config.json: `config` (format, version, checkpoint, card, ...) with `config_sha256` and the hash of each of
    `files`, written last."""
    config = finite({**config, "config_sha256": definition_sha256(config),
                     "files": {name: file_sha256(folder / name) for name in files}})
    text = json.dumps(config, indent=2, allow_nan=False)
    atomic_write(folder / CONFIG_FILE, lambda tmp: tmp.write_text(text))
    return config


def export_config(checkpoint: dict, card: dict, extra: dict | None = None) -> dict:
    """config.json's content before its hashes: the checkpoint's entries other than its weights, the model card's
    facts, and `extra` (e.g. the ONNX graph's record)."""
    return finite({"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                   "checkpoint": {k: v for k, v in checkpoint.items() if k != "model"}, "card": card, **(extra or {})})


def write_weights(folder: Path, weights: dict[str, torch.Tensor], config_hash: str) -> Path:
    """model.safetensors, carrying the hash of the config it belongs to; tensors that share storage (tied weights)
    are written as separate copies."""
    tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
    path = folder / WEIGHTS_FILE
    metadata = {"format": "pt", "exported_by": EXPORT_FORMAT, CONFIG_HASH_KEY: config_hash}  # "pt": the Hub's tools
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return path
