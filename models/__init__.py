"""Architectures, created by name: `models.create_model('mae_vit_base_patch16', img_size=64)`.

Every classifier meets models.contract.Classifier. Each module of this package is imported here, so its
`@register_model` classes are registered: adding a model is one new file (docs/contributing.md: "Adding a model").
"""
import importlib
import pkgutil

from .contract import GRAD_CAM, ROLLOUT, Classifier, ClassifierBase
from .registry import create_model, list_models, model_arguments, register_model

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["GRAD_CAM", "ROLLOUT", "Classifier", "ClassifierBase", "create_model", "list_models", "model_arguments",
           "register_model"]
