"""Parsers for command-line values shared by the entry points."""
import argparse


def int_tuple(text: str) -> tuple[int, ...]:
    """'64' -> (64,), '160,192,128' -> (160, 192, 128)."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int or comma-separated ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def float_tuple(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def grid(values: tuple[int, ...], dims: int = 3) -> tuple[int, ...]:
    """One value means a cube (square); otherwise there must be one per axis."""
    if len(values) == 1:
        return values * dims
    if len(values) != dims:
        raise SystemExit(f"expected 1 or {dims} comma-separated sizes, got {','.join(map(str, values))}")
    return values


def int_tuple_or_auto(text: str) -> tuple[int, ...] | str:
    """'auto', or what `int_tuple` takes."""
    return "auto" if text == "auto" else int_tuple(text)
