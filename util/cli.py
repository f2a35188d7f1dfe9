"""Parsers for command-line values shared by the entry points, and how a main ends on an error the user can act on."""
import argparse
import signal
import sys
from collections.abc import Callable

from .errors import UsageError, VolMAEError
from .signals import Stopped, exit_status, restore_handler, stop_on_signals

STOPPED_LINE = ("stopped by {}: what was complete is kept, nothing half-written is left; run the same command "
                "again to go on")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and shows each flag's default after its help. A default
    that means "chosen later" (None) or an off switch (False) is left to the help text to explain."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or action.required or "default" in text
                or action.default is None or action.default is False or action.default == argparse.SUPPRESS):
            return text
        shown = ",".join(map(str, action.default)) if isinstance(action.default, (tuple, list)) else str(action.default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def int_tuple(text: str) -> tuple[int, ...]:
    """'64' -> (64,), '160,192,128' -> (160, 192, 128)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def grid(values: tuple[int, ...], dims: int = 3) -> tuple[int, ...]:
    """One value means a cube (square); otherwise there must be one per axis."""
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise UsageError(f"expected 1 or {dims} comma-separated sizes, got {','.join(map(str, values))}")
    return values


def grid_or_auto(values: tuple[int, ...] | str, dims: int = 3) -> tuple[int, ...] | None:
    """`--input_size` resolved: None for auto (chosen later from the data), else the grid (`grid`)."""
    return None if values == "auto" else grid(values, dims)


def label_columns(text: str) -> list[str]:
    """'malignant' -> ['malignant'], 'a, b' -> ['a', 'b']: the label column(s) a labels CSV is read with."""
    columns = [c.strip() for c in text.split(",") if c.strip()]
    if not columns:
        raise argparse.ArgumentTypeError(f"expected one or more comma-separated column names, got {text!r}")
    return columns


def int_tuple_or_auto(text: str) -> tuple[int, ...] | str:
    """'auto', or what `int_tuple` takes."""
    return "auto" if text == "auto" else int_tuple(text)


def _number(kind: type, text: str) -> int | float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") \
            from None


def positive_int(text: str) -> int:
    """At least 1: a size, count or period that 0 or a negative would silently turn into another meaning."""
    value = _number(int, text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """0 or more, where 0 has a documented meaning (never, none, off)."""
    value = _number(int, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(float, text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(float, text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, got {text}")
    return value


def positive_int_or_auto(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def non_negative_float_or_auto(text: str) -> float | str:
    return "auto" if text == "auto" else non_negative_float(text)


def share(text: str) -> float:
    """A share in (0, 1]: a fraction of the data, or a decay factor."""
    value = _number(float, text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be above 0 and at most 1, got {text}")
    return value


def seed_list(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a repeated seed would train the same model twice and count it twice."""
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer seeds, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds must differ, got {text!r}")
    return seeds


def run_main(entry: Callable[..., int | None], *args) -> int:
    """A main's exit status: an error the user can act on (a `VolMAEError`: bad data, flags that cannot work,
    a disk that refuses a write, an output another run wrote meanwhile) becomes one line on stderr naming the
    file, row or flag, and status 1, instead of a traceback. Library code raises these errors and never ends
    the process itself; the mains' entry code passes this status to `sys.exit`. Ctrl-C and SIGTERM end in one
    line and status 130 or 143 (util.signals), after every `finally` on the way has run."""
    previous = stop_on_signals()
    try:
        status = entry(*args)
    except VolMAEError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{STOPPED_LINE.format('Ctrl-C')}", file=sys.stderr)
        return exit_status(signal.SIGINT)
    except Stopped as stop:
        print(STOPPED_LINE.format(stop), file=sys.stderr)
        return exit_status(stop.signum)
    finally:
        restore_handler(previous)
    return 0 if status is None else status
