"""What a run reports, on rank 0 only: JSON lines in `log.txt` and tensorboard scalars."""
import json
import resource
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


class RunLog:
    def __init__(self, output_dir: str | Path, log_dir: str | Path, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / "log.txt"
        self.writer = SummaryWriter(log_dir=str(log_dir)) if enabled else None

    def scalars(self, record: dict, step: int) -> None:
        """Append `record` to log.txt and write its numeric fields to tensorboard."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{key}", value, step)

    def figure(self, tag: str, figure, step: int) -> None:
        if self.enabled:
            self.writer.add_figure(tag, figure, step, close=False)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_log(path: str | Path) -> list[dict]:
    """The JSON lines of a log.txt."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def cpu_seconds() -> float:
    """CPU time (user + system, all threads) of this process and of its finished children (loader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
