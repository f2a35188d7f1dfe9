"""Which model a fine-tuning run builds, with which arguments, and from which pretrained weights.

Nothing here knows an architecture: the run offers what it knows (data shape, recipe, flags) and each
model takes the arguments its constructor names (models.model_arguments). Flags a user sets for the model
(--patch_size, --backbone, --fe_path, --pretrained_file) are passed as given, so one the model does not
take is an error naming it.
"""
from dataclasses import dataclass

import torch

from ..datasets.data_profile import DataProfile
from ..datasets.task_data import TaskData
from ..inference.checkpoints import PretrainingCheckpoint, PretrainingCheckpointError, load_checkpoint
from ..inference.load_pretrained import CheckpointMismatchError, load_encoder
from ..models import create_model, model_arguments
from ..models.joint_mae import ClassifierWithReconstruction
from ..models.patch_embed import auto_patch_size
from ..models.vit import AUTO_ARCHITECTURE
from ..util.errors import DataError, UsageError

EXPLICIT_MODEL_FLAGS = ("patch_size", "backbone", "fe_path", "pretrained_file")


@dataclass(frozen=True)
class ModelConfig:
    """The classifier a run builds and the weights it starts from (finetuning.finetune_config resolves it)."""
    name: str
    architecture: dict  # --model auto's choice; empty for a named model
    normalization: dict  # input_mean / input_std the model applies inside; empty where it takes [0, 1] as it is
    finetune: str | None
    pretrained: bool
    drop_path: float
    global_pool: str
    head_norm: str
    explicit: dict  # the model flags the user set (EXPLICIT_MODEL_FLAGS), passed as given
    mae_loss_weight: float
    mae_mask_ratio: float | None


def pretrained_config(path: str | None) -> dict | None:
    """The model_config a --finetune checkpoint carries (VolMAE checkpoints do; others, e.g. TANGERINE's, not)."""
    if not path:
        return None
    try:
        config = load_checkpoint(path).get("model_config")
    except Exception as err:  # torch raises several types for files that are not checkpoints
        raise DataError(f"--finetune {path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    return config if isinstance(config, dict) else None


def auto_architecture(finetune: str | None, input_size: tuple[int, ...], encoder: dict | None) -> tuple[str, dict]:
    """`--model auto`: a ViT shaped as the pretrained encoder of --finetune; without one, the small hybrid ViT
    of models.vit.AUTO_ARCHITECTURE with the patch size chosen from the data's grid, as `main_pretrain.py
    --model auto` builds it, so that a from-scratch baseline has the MAE's architecture."""
    name = "vit3d" if len(input_size) == 3 else "vit2d"
    if not finetune:
        stem = AUTO_ARCHITECTURE["stem_channels"] > 0
        return name, {**AUTO_ARCHITECTURE, "patch_size": list(auto_patch_size(input_size, stem))}
    keys = ("embed_dim", "depth", "num_heads", "mlp_ratio", "patch_size", "stem_channels")
    if encoder is None or not all(k in encoder for k in keys[:-1]):
        raise UsageError(f"--model auto takes the architecture from a VolMAE checkpoint's model_config; "
                         f"{finetune} has none: name the model (e.g. --model vit3d_base_patch16)")
    shape = {k: encoder.get(k, 0) if k == "stem_channels" else encoder[k] for k in keys}
    kept = {k: encoder[k] for k in ("isolated_class_token", "layer_norm_eps") if k in encoder}  # the blocks' own math
    return name, {**shape, **kept}


def input_normalization(model_name: str, finetune: str | None, normalize: str, profile: DataProfile,
                        encoder: dict | None) -> dict:
    """Models that standardise their [0, 1] input inside (those taking input_mean/input_std: the ViTs) get the
    pretrained encoder's statistics (it learned with them), else, with --normalize auto, the training images'.
    Others (convolutional, with batch norm) take [0, 1] as it is."""
    if "input_mean" not in model_arguments(model_name):
        return {}
    if finetune:
        return {k: encoder[k] for k in ("input_mean", "input_std") if encoder and k in encoder}
    return profile.normalization if normalize == "auto" else {}


def model_options(config: ModelConfig, data: TaskData) -> dict:
    """The model's constructor arguments: what the run offers, where the model takes it, plus the
    model flags the user set."""
    offered = {"in_chans": data.in_chans, "num_classes": len(data.class_names), "img_size": list(data.input_size),
               "drop_path_rate": config.drop_path, "global_pool": config.global_pool,
               "head_norm": config.head_norm == "batch", "pretrained": config.pretrained,
               **config.normalization, **config.architecture}
    accepted = set(model_arguments(config.name))
    return {**{k: v for k, v in offered.items() if k in accepted}, **config.explicit}


def build_model(config: ModelConfig, data: TaskData, say) -> torch.nn.Module:
    """The classifier, with the --finetune encoder's weights loaded when one is given."""
    try:
        model = create_model(config.name, **model_options(config, data))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if model.spatial_dims != len(data.input_size):
        raise UsageError(f"{config.name} is a {model.spatial_dims}D model and the data are "
                         f"{len(data.input_size)}D")
    if config.finetune:
        try:
            loaded = load_encoder(model, config.finetune)
        except CheckpointMismatchError as err:
            raise DataError(f"--finetune {err}") from None
        grids = loaded["pos_embed_grids"]
        say(f"loaded {loaded['loaded']} tensors from {config.finetune}; new: {', '.join(loaded['new']) or 'none'}; "
            f"dropped {len(loaded['dropped'])} (decoder and unused); pos_embed grid "
            f"{grids[0] if grids else '-'} -> {grids[1] if grids else '-'}")
    return model


def with_reconstruction(config: ModelConfig, model: torch.nn.Module, say) -> torch.nn.Module:
    """With --mae_loss_weight, the classifier joined to its MAE's decoder (models.joint_mae), so that fine-tuning
    keeps the masked reconstruction loss; the MAE, decoder included, comes from --finetune."""
    if not config.mae_loss_weight:
        return model
    if not config.finetune:
        raise UsageError("--mae_loss_weight keeps the MAE's loss: give the pretraining run with --finetune")
    needs = (f"--mae_loss_weight needs the MAE with its decoder: --finetune {config.finetune} has none (give "
             f"main_pretrain.py's model.pth or a checkpoint-*.pth, not encoder.pth)")
    try:
        checkpoint = PretrainingCheckpoint.load(config.finetune)
    except PretrainingCheckpointError:
        raise UsageError(needs) from None
    weights = checkpoint.weights or {}
    if not checkpoint.model_name.startswith("mae_") or not any(k.startswith("decoder_") for k in weights):
        raise UsageError(needs)
    mae = create_model(checkpoint.model_name, **{**checkpoint.model_config, "contrast_weight": 0.0})
    mae.load_state_dict({k: v for k, v in weights.items() if not k.startswith("contrast_head")}, strict=True)
    mask_ratio = config.mae_mask_ratio if config.mae_mask_ratio is not None else \
        float(checkpoint.args.get("mask_ratio", 0.75))
    try:
        joint = ClassifierWithReconstruction(model, mae, mask_ratio)
    except ValueError as err:
        raise UsageError(f"--mae_loss_weight: {err}") from None
    say(f"fine-tuning keeps the MAE's reconstruction loss (weight {config.mae_loss_weight:g}, mask ratio {mask_ratio:g})")
    return joint
