"""The one conversion from stored arrays to model inputs: unsigned integers use their full range
(uint8 / 255, uint16 / 65535: MedMNIST's files, the cache), floats are taken as they are."""
import numpy as np
import torch

INTEGER_TOPS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
TORCH_TOPS = {torch.uint8: 255.0, torch.uint16: 65535.0}


def to_unit_float(stored: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Stored integers or floats -> float32 in [0, 1], as a numpy array or a tensor like the input."""
    if isinstance(stored, torch.Tensor):
        top = TORCH_TOPS.get(stored.dtype)
        return stored.float() * (1.0 / top) if top else stored.float()
    top = INTEGER_TOPS.get(stored.dtype)
    if top:
        return stored.astype(np.float32) * np.float32(1.0 / top)
    return stored.astype(np.float32, copy=False)
