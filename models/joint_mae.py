"""A ViT classifier fine-tuned with its MAE's masked reconstruction kept as a second loss (SSAT, Das et al.,
WACV 2024: on small sets, training both objectives together beats pretraining then fine-tuning).

The MAE's encoder modules are replaced by the classifier's own (patch embedding, class token, positions,
blocks), so both losses train one encoder; the MAE keeps its decoder and final norm. Only the classifier is
saved: what prediction loads is a plain classifier.
"""
import re

import torch
import torch.nn as nn

SHARED = ("patch_embed", "cls_token", "pos_embed", "blocks")


class ClassifierWithReconstruction(nn.Module):
    def __init__(self, classifier: nn.Module, mae: nn.Module, mask_ratio: float):
        super().__init__()
        if tuple(classifier.grid_size) != tuple(mae.grid_size) or classifier.embed_dim != mae.embed_dim:
            raise ValueError(f"the MAE (grid {tuple(mae.grid_size)}, width {mae.embed_dim}) and the classifier (grid "
                             f"{tuple(classifier.grid_size)}, width {classifier.embed_dim}) must share one encoder")
        for name in SHARED:
            ours, theirs = getattr(classifier, name), getattr(mae, name)
            if isinstance(ours, nn.Module) and ours.state_dict().keys() != theirs.state_dict().keys():
                raise ValueError(f"the MAE's {name} differs from the classifier's")
            setattr(mae, name, ours)
        self.classifier = classifier
        self.mae = mae
        self.mask_ratio = mask_ratio

    def forward(self, x: torch.Tensor, with_reconstruction: bool = False):
        """Logits; with `with_reconstruction`, also the masked reconstruction loss of the same batch."""
        logits = self.classifier(x)
        if not with_reconstruction:
            return logits
        loss, _, _ = self.mae(x, self.mask_ratio)
        return logits, loss

    def no_weight_decay(self) -> set[str]:
        return {f"classifier.{name}" for name in self.classifier.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """The classifier's layer ids under `classifier.`; the decoder (unmatched) trains at the full lr."""
        def prefixed(pattern: str) -> str:
            return re.sub(r"\^", r"^classifier\\.", pattern)

        groups = {}
        for name, rule in self.classifier.group_matcher(coarse).items():
            groups[name] = prefixed(rule) if isinstance(rule, str) else [(prefixed(p), order) for p, order in rule]
        return groups
