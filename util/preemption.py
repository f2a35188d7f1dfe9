"""Stopping cleanly when a cluster asks: SIGUSR1 or SIGTERM, or a stop file on the shared filesystem.

SLURM sends the batch script a warning signal before preemption or the time limit
(`#SBATCH --signal=B:USR1@120`); the script touches OUTPUT_DIR/STOP, which every rank on every node
sees. A process signalled directly (`kill -USR1 PID`, srun without torchrun) sees the signal itself.
The training loop asks after every optimizer step; all ranks agree, finish that step, write a
checkpoint and exit: with EXIT_PREEMPTED on a cluster's request (SIGUSR1, the stop file), and with 143, as a
shell reports SIGTERM, where this rank was sent SIGTERM itself (`kill PID`).
"""
import signal
from pathlib import Path

import torch

from .dist import all_reduce_sum
from .signals import exit_status

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on request, resume by running the same command again
STOP_FILE = "STOP"
PREEMPTED_FILE = "PREEMPTED"  # written by rank 0 after the checkpoint: the batch script requeues when it exists


class PreemptionWatch:
    def __init__(self, output_dir: Path, device: torch.device):
        self.stop_file = Path(output_dir) / STOP_FILE
        self.device = device
        self.signalled = None
        self.signum = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.signalled = signal.Signals(signum).name
        self.signum = signum

    def exit_status(self) -> int:
        """143 where this rank was sent SIGTERM, else EXIT_PREEMPTED (a cluster's request: resume later)."""
        return exit_status(self.signum) if self.signum == signal.SIGTERM else EXIT_PREEMPTED

    def requested(self) -> str | None:
        """The reason to stop, agreed by all ranks (any rank's signal or the stop file)."""
        local = self.signalled or ("stop file" if self.stop_file.exists() else None)
        flag = torch.tensor([1.0 if local else 0.0], device=self.device)
        all_reduce_sum(flag)
        return (local or "another rank was signalled") if flag.item() > 0 else None

    def clear(self) -> None:
        """A resumed run starts without the previous run's stop request."""
        self.stop_file.unlink(missing_ok=True)
