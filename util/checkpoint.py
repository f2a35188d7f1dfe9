"""Torch files as plain dicts of tensors and Python values, written atomically, read with weights_only.

A checkpoint is written atomically (util.atomic): a crash at any moment leaves either the old file or
the new one, never half of one. Loading always uses `weights_only=True`: a checkpoint is untrusted input.
"""
import os
import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write
from .errors import DataError


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: _save(obj, tmp))


class _WriteErrorKeeper:
    """A file that remembers the first OSError its writes raised: torch's zip writer turns it into a
    RuntimeError ('unexpected pos') that no longer says the disk was full."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.file.flush()


def _save(obj: Any, tmp: Path) -> None:
    """Through a Python file, so that a full disk raises OSError(ENOSPC), not torch's 'unexpected pos'."""
    with open(tmp, "wb") as f:
        keeper = _WriteErrorKeeper(f)
        try:
            torch.save(obj, keeper)
            f.flush()
        except RuntimeError:
            if keeper.error is not None:
                raise keeper.error from None
            raise


class CheckpointError(DataError):
    """A checkpoint that cannot be used; the message names the file and the reason, in one line."""


def readable_version(stored: dict, newest: int, what: str, path: str | os.PathLike, error: type[Exception]) -> int:
    """A checkpoint type's `format_version` (1 where a file predates it), or `error` for one written by a newer
    VolMAE, whose fields this version cannot know."""
    version = stored.get("format_version", 1)
    if not isinstance(version, int) or version > newest:
        raise error(f"{path}: {what} format version {version}; this VolMAE reads up to {newest}: update VolMAE")
    return version


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return re.sub(r"\s+", " ", text[0]) if text else type(err).__name__


def load_torch_file(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True; a missing file stays FileNotFoundError, anything else that stops the
    load (truncation, corruption, a pickle that asks for code) becomes a one-line CheckpointError. VolMAE's own
    checkpoint types and exported folders are read by inference.checkpoints.load_checkpoint."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: refused: weights_only loading found more than tensors and plain values "
                              f"(a crafted or foreign file: {first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {first_line(err)})") from None


def resume_candidates(folder: str | os.PathLike) -> list[Path]:
    """checkpoint-last.pth, then the kept checkpoint-N.pth from the newest epoch down: the order in which
    `--resume auto` tries them when the newer ones cannot be read."""
    folder = Path(folder)
    kept = [(int(m.group(1)), path) for path in folder.glob("checkpoint-*.pth")
            if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", path.name))]
    last = folder / "checkpoint-last.pth"
    return ([last] if last.is_file() else []) + [path for _, path in sorted(kept, reverse=True)]


def plain_args(args: dict | object) -> dict:
    """Arguments as builtins only (tuples become lists), so `weights_only` loading accepts them."""
    items = args if isinstance(args, dict) else vars(args)

    def plain(value):
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        return str(value)

    return {key: plain(value) for key, value in items.items()}


def rng_state() -> dict:
    """Every random stream a run touches, as tensors and builtins."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
