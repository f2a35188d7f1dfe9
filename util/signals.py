"""Stopping on Ctrl-C (SIGINT) or `kill` (SIGTERM) in one line, with what is complete kept.

Python turns SIGINT into KeyboardInterrupt; SIGTERM, by default, ends the process at once, so no `finally`
runs: temporaries stay, a lock record names a dead run, and nothing says why the run ended. `stop_on_signals`
makes SIGTERM raise `Stopped` instead, so both unwind through the same `finally` blocks (a half-written file
is removed, a run log is closed) up to `util.cli.run_main`, which prints one line and exits 130 or 143,
the statuses a shell gives a process those signals ended.
"""
import signal
import threading


class Stopped(BaseException):
    """SIGTERM (or another stop signal) arrived; a BaseException, like KeyboardInterrupt, so that no
    `except Exception` of a library swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_status(signum: int) -> int:
    """128 + the signal number, as a shell reports a process a signal ended: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + signum


def _raise_stopped(signum, _frame) -> None:
    raise Stopped(signum)


def stop_on_signals():
    """From now on SIGTERM raises Stopped in the main thread (SIGINT raises KeyboardInterrupt, as always); the
    handler it replaces, for the caller to put back (a main run inside a notebook or a test). A handler installed
    later, such as a training loop's that checkpoints first, takes over from this one. Only the main thread may
    install handlers: elsewhere (a main run in a worker thread) this does nothing and returns None."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_stopped)


def restore_handler(previous) -> None:
    """Put back what stop_on_signals replaced."""
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
