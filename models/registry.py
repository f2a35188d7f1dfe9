"""Model registry: variants are small factory functions, created by name as in timm."""
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name."""
    if factory.__name__ in _MODELS:
        raise ValueError(f"model {factory.__name__!r} is registered twice")
    _MODELS[factory.__name__] = factory
    return factory


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model; keyword arguments override the variant's defaults."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _MODELS[name](**overrides)


def list_models(prefix: str = "") -> list[str]:
    return sorted(name for name in _MODELS if name.startswith(prefix))
