"""Model registry: each name is a class and the defaults of one variant, created by name as in timm.

`create_model` binds the variant's defaults and the caller's overrides to the class's signature, so a
misspelt override is an error naming it, and it records the bound arguments as the model's `config`:
`create_model(name, **model.config)` rebuilds the same architecture.
"""
import inspect
from collections.abc import Callable
from typing import Any

import torch.nn as nn

_MODELS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {}


def register_model(name: str, **defaults: Any) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register `cls` under `name` with these defaults (stack it for several variants)."""
    def register(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        unknown = sorted(set(defaults) - set(accepted(cls)))
        if unknown:
            raise TypeError(f"model {name!r}: {cls.__name__} takes no argument {', '.join(map(repr, unknown))}")
        _MODELS[name] = (cls, defaults)
        return cls

    return register


def accepted(cls: type[nn.Module]) -> tuple[str, ...]:
    return tuple(inspect.signature(cls).parameters)


def model_arguments(name: str) -> tuple[str, ...]:
    """The constructor arguments a registered model takes."""
    return accepted(_lookup(name)[0])


def _lookup(name: str) -> tuple[type[nn.Module], dict[str, Any]]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name]


def _plain(value: Any) -> Any:
    """Tuples as lists, so a configuration reads the same from a checkpoint and from results.json."""
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model; keyword arguments override the variant's defaults. The model's `config` is
    every argument of its constructor, bound; those in the class's `weight_source_args` (where the starting
    weights come from) are left out, since a checkpoint that carries the configuration carries the weights."""
    cls, defaults = _lookup(name)
    signature = inspect.signature(cls)
    unknown = sorted(set(overrides) - set(signature.parameters))
    if unknown:
        raise ValueError(f"model {name!r} takes no argument {', '.join(map(repr, unknown))}; "
                         f"it takes: {', '.join(signature.parameters)}")
    bound = signature.bind(**{**defaults, **overrides})
    bound.apply_defaults()
    model = cls(*bound.args, **bound.kwargs)
    skipped = set(getattr(cls, "weight_source_args", ()))
    model.config = {k: _plain(v) for k, v in bound.arguments.items() if k not in skipped}
    return model


def list_models(prefix: str = "") -> list[str]:
    return sorted(name for name in _MODELS if name.startswith(prefix))
