"""The contract every registered classifier meets; code outside models/ relies on this and nothing else.

    features = model.forward_features(x)          # tokens [N, T, E] (class token first) or maps [N, C, *grid]
    pooled = model.forward_head(features, pre_logits=True)   # [N, F]: what the head sees (embeddings)
    logits = model.forward_head(features)         # [N, num_classes]; model(x) is the same
    model.no_weight_decay()                       # parameter names kept out of weight decay
    model.group_matcher()                         # timm's layer ids for layer-wise lr decay
    model.explain_method                          # "rollout" (attention blocks) or "grad_cam" (a feature map)
    model.cam_layer                               # the submodule it reads, by name (model.get_submodule)

For "rollout", `cam_layer` names the list of blocks whose `attn` (timm's Attention) is rolled out, the
tokens start with one class token, and `grid_size` is the patch grid. For "grad_cam", `cam_layer` names the
module whose output is the feature map; a 2D backbone run over the slices of a volume (N*S maps) is read
as one map per slice, stacked along depth. `config` is set by `create_model` (models.registry).
ClassifierBase gives the defaults a small model can keep; docs/contributing.md: "Adding a model".
"""
from typing import Literal, Protocol, runtime_checkable

import torch
import torch.nn as nn

ROLLOUT = "rollout"
GRAD_CAM = "grad_cam"


@runtime_checkable
class Classifier(Protocol):
    num_classes: int
    spatial_dims: int
    explain_method: Literal["rollout", "grad_cam"]
    cam_layer: str

    def forward_features(self, x: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def no_weight_decay(self) -> set[str]: ...

    def group_matcher(self, coarse: bool = False) -> dict: ...


class ClassifierBase(nn.Module):
    """Defaults for the contract: Grad-CAM, weight decay on every weight, one lr group per top-level module
    (in definition order), and forward = forward_head(forward_features(x))."""

    explain_method: Literal["rollout", "grad_cam"] = GRAD_CAM
    cam_layer: str = ""

    def no_weight_decay(self) -> set[str]:
        return set()

    def group_matcher(self, coarse: bool = False) -> dict:
        names = [name for name, _ in self.named_children()]
        return {f"layer{i}": rf"^{name}\." for i, name in enumerate(names)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
