"""DeepSpeed checkpoints read only through `torch.load(weights_only=True)`.

DeepSpeed's checkpoint engine and its zero_to_fp32 consolidation unpickle with `weights_only=False`,
so a crafted file in a checkpoint folder would run code. Here every file of the tag folder is first
loaded with `weights_only=True`, allowing only the few plain-data classes DeepSpeed itself stores
(its ZeRO stage enum, loss scalers, fragment addresses); DeepSpeed's own loads then go through a
checkpoint engine that uses `weights_only=True` too.
"""
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_torch_file


def deepspeed_safe_globals() -> list:
    """Classes DeepSpeed pickles into its checkpoints that hold data only (found with
    torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 checkpoints)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def tag_folder(folder: Path, tag: str | None = None) -> Path:
    """The folder of `tag`, or of the tag DeepSpeed's `latest` file names."""
    if tag is None:
        latest = folder / "latest"
        if not latest.is_file():
            raise CheckpointError(f"{folder}: no 'latest' file naming a DeepSpeed checkpoint")
        tag = latest.read_text().strip()
    path = folder / tag
    if "/" in tag or tag in ("", ".", "..") or not path.is_dir():
        raise CheckpointError(f"{folder}: 'latest' names {tag!r}, which is not a checkpoint folder beside it")
    return path


def validate_deepspeed_checkpoint(folder: Path, tag: str | None = None) -> dict:
    """Load every file of the checkpoint with weights_only=True before DeepSpeed touches any; the client state
    saved with the model (VolMAE's step, args ...), or CheckpointError naming the first file that is refused."""
    path = tag_folder(Path(folder), tag)
    files = sorted(p for p in path.iterdir() if p.is_file())
    if not files:
        raise CheckpointError(f"{path}: an empty DeepSpeed checkpoint folder")
    client = {}
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        for file in files:
            state = load_torch_file(file)
            if file.name.endswith("model_states.pt"):
                client = state
    return client


def use_weights_only_loading(engine) -> None:
    """Give a DeepSpeed engine a checkpoint engine whose loads are weights_only=True."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    current = engine.checkpoint_engine
    if isinstance(current, TorchCheckpointEngine):
        current.__class__ = WeightsOnlyCheckpointEngine
    else:
        raise CheckpointError(f"DeepSpeed uses a {type(current).__name__} checkpoint engine; VolMAE reads only "
                              f"its torch checkpoints, through weights_only loading")


def consolidated_fp32_weights(folder: Path) -> dict[str, torch.Tensor]:
    """DeepSpeed's zero_to_fp32 consolidation of the latest checkpoint, after every file passed validation."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    validate_deepspeed_checkpoint(folder)
    return get_fp32_state_dict_from_zero_checkpoint(str(folder))
