"""The final model of a cross-validated run: its fold models as one classifier whose prediction is the mean of
their probabilities.

It keeps the model contract (models.contract) that prediction and export use: `forward_features` passes the
volume through, and `forward_head` returns logits whose softmax (or, for multi-label tasks, sigmoid) is the
members' mean probability (for regression, the mean output), so main_predict.py's loop, CSV and thresholds are those of one model, and the ONNX
export traces it as one graph. Its state dict holds each member's weights under `members.<i>.`. The folder it is
kept in on disk is inference.ensemble_folder's.
"""
import torch
from torch import nn

from ..util.metrics import MULTI_LABEL, REGRESSION

PROBABILITY_FLOOR = 1e-12  # log(0) has no float; probabilities below this are this


class ProbabilityEnsemble(nn.Module):
    def __init__(self, members: list[nn.Module], task: str):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)
        self.task = task

    @property
    def explain_method(self) -> str:
        """How its members are explained (util.explain averages their maps)."""
        return self.members[0].explain_method

    def probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """The mean over members of each member's probabilities (of each output, for regression)."""
        if self.task == REGRESSION:
            return torch.stack([member(volume).float() for member in self.members]).mean(dim=0)
        link = torch.sigmoid if self.task == MULTI_LABEL else (lambda logits: torch.softmax(logits, dim=-1))
        return torch.stack([link(member(volume).float()) for member in self.members]).mean(dim=0)

    def forward_features(self, volume: torch.Tensor) -> torch.Tensor:
        return volume

    def forward_head(self, volume: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits:
            raise ValueError("an ensemble of fold models has no single feature vector; embed with one member")
        if self.task == REGRESSION:
            return self.probabilities(volume)
        mean = self.probabilities(volume).clamp(PROBABILITY_FLOOR, 1.0)
        if self.task == MULTI_LABEL:
            return torch.log(mean) - torch.log1p(-mean.clamp(max=1.0 - 1e-7))
        return torch.log(mean)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.forward_head(volume)

