"""What a run reports, on rank 0 only: JSON lines in `log.txt` and tensorboard scalars."""
import json
import resource
import threading
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from .atomic import DISK_FAULTS, disk_writes, fault_errno

KEPT_LOG = "the lines written before are kept"


def _drop_disk_faults(args: threading.ExceptHookArgs) -> None:
    """tensorboard's writer thread prints its disk fault before handing it to the next call, which reports it
    in one line; any other error of any thread still prints."""
    if fault_errno(args.exc_value) not in DISK_FAULTS:
        threading.__excepthook__(args)


class RunLog:
    """A full disk ends the run in one DiskWriteError naming log.txt or the tensorboard folder (tensorboard
    writes in a thread and reports its failure at the next call)."""

    def __init__(self, output_dir: str | Path, log_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.txt"
        self.log_dir = Path(log_dir)
        threading.excepthook = _drop_disk_faults
        with disk_writes(self.log_dir, KEPT_LOG):
            self.writer = SummaryWriter(log_dir=str(log_dir)) if enabled else None

    def scalars(self, record: dict, step: int) -> None:
        """Append `record` to log.txt and write its numeric fields to tensorboard."""
        if not self.enabled:
            return
        with disk_writes(self.path, KEPT_LOG), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        with disk_writes(self.log_dir, KEPT_LOG):
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"train/{key}", value, step)

    def figure(self, tag: str, figure, step: int) -> None:
        if self.enabled:
            with disk_writes(self.log_dir, KEPT_LOG):
                self.writer.add_figure(tag, figure, step, close=False)

    def close(self) -> None:
        if self.writer is not None:
            with disk_writes(self.log_dir, KEPT_LOG):
                self.writer.close()


def read_log(path: str | Path) -> list[dict]:
    """The JSON lines of a log.txt."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process and of its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
