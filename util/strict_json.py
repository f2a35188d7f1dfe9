"""JSON that every reader accepts: Python's json writes NaN and Infinity bare, which strict parsers (JavaScript's
JSON.parse, jq, Go, Rust's serde) refuse. An undefined score (an AUC on one class) is written as null."""
import json
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, inf) replaced by None, tuples as lists, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    if hasattr(value, "item") and hasattr(value, "dtype"):  # a numpy scalar
        return finite(value.item())
    return value


def dumps(value: Any, **kwargs) -> str:
    return json.dumps(finite(value), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented strict JSON, written atomically."""
    text = dumps(value, indent=2)
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
