"""The final model of a cross-validated run: its fold models as one classifier whose prediction is the mean of
their probabilities.

It keeps the model contract (models.contract) that prediction and export use: `forward_features` passes the
volume through, and `forward_head` returns logits whose softmax (or, for multi-label tasks, sigmoid) is the
members' mean probability (for regression, the mean output), so main_predict.py's loop, CSV and thresholds are those of one model, and the ONNX
export traces it as one graph. Its state dict holds each member's weights under `members.<i>.`.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..util.errors import DataError
from ..util.exported import file_sha256
from ..util.metrics import MULTI_LABEL, REGRESSION
from ..util.strict_json import write_json

PROBABILITY_FLOOR = 1e-12  # log(0) has no float; probabilities below this are this


class ProbabilityEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module], task: str):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.task = task

    def probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """The mean over members of each member's probabilities (of each output, for regression)."""
        if self.task == REGRESSION:
            return torch.stack([member(volume).float() for member in self.members]).mean(dim=0)
        link = torch.sigmoid if self.task == MULTI_LABEL else (lambda logits: torch.softmax(logits, dim=-1))
        return torch.stack([link(member(volume).float()) for member in self.members]).mean(dim=0)

    def forward_features(self, volume: torch.Tensor) -> torch.Tensor:
        return volume

    def forward_head(self, volume: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            raise ValueError("an ensemble of fold models has no single feature vector; embed with one member")
        if self.task == REGRESSION:
            return self.probabilities(volume)
        mean = self.probabilities(volume).clamp(PROBABILITY_FLOOR, 1.0)
        if self.task == MULTI_LABEL:
            return torch.log(mean) - torch.log1p(-mean.clamp(max=1.0 - 1e-7))
        return torch.log(mean)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.forward_head(volume)


ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_FORMAT = "volmae-ensemble"
ENSEMBLE_VERSION = 1


class EnsembleError(DataError):
    """A final_model folder that cannot be used; one line naming the file and why."""


def is_ensemble(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ENSEMBLE_FILE).is_file()


def write_ensemble(folder: Path, members: list[Path], extra: dict) -> None:
    """FOLDER/fold_<i>.pth (copies of each fold's best.pth) and FOLDER/ensemble.json naming them with their
    sha256, written last: a folder without it is not an ensemble."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, member in enumerate(members):
        name = f"fold_{i}.pth"
        shutil.copyfile(member, folder / name)
        names.append(name)
    record = {"format": ENSEMBLE_FORMAT, "version": ENSEMBLE_VERSION, "combine": "mean probability of the members",
              "members": names, "sha256": {name: file_sha256(folder / name) for name in names}, **extra}
    write_json(folder / ENSEMBLE_FILE, record)


def ensemble_members(folder: Path) -> list[Path]:
    """The member checkpoints of an ensemble folder, each checked against the hash ensemble.json records."""
    path = Path(folder) / ENSEMBLE_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EnsembleError(f"{path}: unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("format") != ENSEMBLE_FORMAT or \
            record.get("version") != ENSEMBLE_VERSION or not isinstance(record.get("members"), list):
        raise EnsembleError(f"{path}: not a VolMAE ensemble of version {ENSEMBLE_VERSION}")
    members = []
    for name in record["members"]:
        member = Path(folder) / str(name)
        if Path(str(name)).name != str(name) or not member.is_file():
            raise EnsembleError(f"{path}: member {name!r} is not a file in {folder}")
        if file_sha256(member) != (record.get("sha256") or {}).get(name):
            raise EnsembleError(f"{member}: its hash differs from the one {ENSEMBLE_FILE} records: replaced or damaged")
        members.append(member)
    if not members:
        raise EnsembleError(f"{path}: no members")
    return members
