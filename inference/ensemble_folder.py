"""A cross-validated run's final model on disk: OUTPUT_DIR/final_model, its fold models (fold_<i>.pth, copies of
each fold's best.pth) and ensemble.json, which names them with their sha256 and is written last, so a folder
without it is not an ensemble. inference.load_model reads it as one classifier (models.ensemble)."""
import json
import os
import shutil
from pathlib import Path

from ..util.errors import DataError
from ..util.strict_json import write_json
from .exported import file_sha256

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
