"""Models as exported by volmae-export: the module traced to ONNX, and an ONNX file run back through
onnxruntime behind the same `forward_features` / `forward_head` contract (models.contract) that
main_predict.py uses, so that its loop, CSV and embeddings are the same for both."""
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .exported import ExportError

ONNX_INPUT = "volume"


class PooledEmbedding(nn.Module):
    """An encoder's embedding as main_predict.py's `--embedding_type mean` gives it: the mean of the patch tokens
    (the class token left out), or the head's pooling of a feature map."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        features = self.model.forward_features(volume)
        if features.dim() == 3:
            return features[:, 1:].mean(dim=1)
        return self.model.forward_head(features, pre_logits=True)


class OnnxModel(nn.Module):
    """An exported ONNX graph (the classifier's logits, or an encoder's pooled embedding) run by onnxruntime on
    the CPU. `forward_features` passes the volume through; `forward_head` runs the graph."""

    def __init__(self, path: Path, output: str):
        super().__init__()
        import onnxruntime

        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types for files it cannot load
            raise ExportError(f"{path}: not a loadable ONNX graph ({type(err).__name__}: "
                              f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
        self.output = output  # "logits" or "embedding"
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.half = self.session.get_inputs()[0].type == "tensor(float16)"  # an fp16 graph takes fp16 volumes

    def forward_features(self, volume: torch.Tensor) -> torch.Tensor:
        return volume

    def forward_head(self, volume: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if pre_logits != (self.output == "embedding"):
            raise ValueError(f"this ONNX export gives {self.output}; export the encoder for embeddings, the "
                             f"classifier for predictions")
        array = volume.detach().cpu().float().numpy()
        result = self.session.run(None, {ONNX_INPUT: array.astype(np.float16) if self.half else array})[0]
        return torch.from_numpy(np.asarray(result, dtype=np.float32))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.forward_head(volume, pre_logits=self.output == "embedding")
