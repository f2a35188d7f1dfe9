"""A VolMAE ViT encoder as MONAI's `monai.networks.nets.ViT` (the encoder of MONAI's UNETR and ViT classifier):
the keyword arguments that build it and the encoder's weights under its key names.

The map is one to one for a plain patch embedding (`mae_vit_*` without a stem): MONAI's `conv` patch
embedding is VolMAE's `patch_embed.proj`, its SABlock keeps timm's qkv layout (q, k, v; then heads), and its
MLP is timm's. Three things are folded so that the MONAI ViT computes what VolMAE's encoder does:
- MONAI adds no position to the class token: VolMAE's class-token position goes into `cls_token`;
- VolMAE standardises the input inside the model: the mean and std go into the patch projection;
- VolMAE's LayerNorms use eps 1e-6, MONAI's 1e-5 and no argument sets it: `layer_norm_eps` in the kwargs'
  sidecar says to set it after building (`set_layer_norm_eps`), which makes the hidden states equal.
The class token exists in MONAI's ViT only with `classification=True`; its head is MONAI's own, new.
"""
import torch
from torch import nn

from ..util.errors import DataError

VOLMAE_LAYER_NORM_EPS = 1e-6
BLOCK_KEYS = {"norm1": "norm1", "attn.qkv": "attn.qkv", "attn.proj": "attn.out_proj", "norm2": "norm2",
              "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}


class UnmappableEncoder(DataError):
    """The encoder has parts MONAI's ViT does not (a convolutional stem, other blocks); the message says which."""


def monai_vit_kwargs(config: dict) -> dict:
    """`ViT(**kwargs)` for an encoder of this model_config; refused for a hybrid stem."""
    if config.get("stem_channels"):
        raise UnmappableEncoder(f"a convolutional stem of {config['stem_channels']} channels before the patch "
                                f"projection (a hybrid ViT) has no counterpart in MONAI's ViT, whose patch "
                                f"embedding is one convolution; export it as safetensors or onnx instead")
    img_size, patch_size = config["img_size"], config["patch_size"]
    dims = len(img_size) if isinstance(img_size, (list, tuple)) else 3
    return {"in_channels": int(config.get("in_chans", 1)), "img_size": _per_axis(img_size, dims),
            "patch_size": _per_axis(patch_size, dims), "hidden_size": int(config["embed_dim"]),
            "mlp_dim": int(round(config["embed_dim"] * config.get("mlp_ratio", 4.0))),
            "num_layers": int(config["depth"]), "num_heads": int(config["num_heads"]), "proj_type": "conv",
            "pos_embed_type": "learnable", "classification": True, "qkv_bias": True, "spatial_dims": dims}


def _per_axis(value, dims: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * dims


def monai_vit_weights(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The encoder's weights under MONAI ViT key names (the classification head and the unused cross-attention
    norms are not among them: take those from a freshly built ViT)."""
    depth = int(config["depth"])
    known = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    known |= {f"blocks.{i}.{name}.{kind}" for i in range(depth) for name in BLOCK_KEYS for kind in ("weight", "bias")}
    extra = sorted(k for k in weights if k not in known)
    if extra:
        raise UnmappableEncoder(f"tensors with no counterpart in MONAI's ViT: {', '.join(extra[:6])}")
    mean, std = float(config.get("input_mean", 0.0)), float(config.get("input_std", 1.0))
    weight, bias = weights["patch_embed.proj.weight"].float(), weights["patch_embed.proj.bias"].float()
    folded_weight = weight / std  # conv((x - mean) / std) = conv'(x)
    folded_bias = bias - (mean / std) * weight.sum(dim=tuple(range(1, weight.dim())))
    pos = weights["pos_embed"].float()
    mapped = {"cls_token": weights["cls_token"].float() + pos[:, :1],
              "patch_embedding.position_embeddings": pos[:, 1:].clone(),
              "patch_embedding.patch_embeddings.weight": folded_weight,
              "patch_embedding.patch_embeddings.bias": folded_bias,
              "norm.weight": weights["norm.weight"], "norm.bias": weights["norm.bias"]}
    for i in range(depth):
        for ours, theirs in BLOCK_KEYS.items():
            for kind in ("weight", "bias"):
                mapped[f"blocks.{i}.{theirs}.{kind}"] = weights[f"blocks.{i}.{ours}.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in mapped.items()}


def set_layer_norm_eps(model: nn.Module, eps: float = VOLMAE_LAYER_NORM_EPS) -> nn.Module:
    """VolMAE's LayerNorm eps on every LayerNorm of a built MONAI ViT."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = eps
    return model


UNETR_PATCH = 16  # UNETR fixes its ViT's patch at 16 per axis
UNETR_DEPTH = 12  # its decoder reads the hidden states of blocks 3, 6 and 9 of 12
MONAI_LAYER_NORM_EPS = 1e-5


def unetr_kwargs(config: dict) -> dict:
    """`UNETR(**kwargs, out_channels=...)` whose `vit` takes this encoder; refused, naming the reason, for an
    encoder UNETR cannot take as it is (models.mae3d.UNETR_ENCODER is one it can)."""
    vit = monai_vit_kwargs(config)
    reasons = []
    if any(p != UNETR_PATCH for p in vit["patch_size"]):
        reasons.append(f"patch {vit['patch_size']} (UNETR's is {UNETR_PATCH} per axis)")
    if vit["num_layers"] != UNETR_DEPTH:
        reasons.append(f"{vit['num_layers']} blocks (UNETR's decoder reads blocks 3, 6 and 9 of {UNETR_DEPTH})")
    if not config.get("isolated_class_token"):
        reasons.append("a class token the patch tokens attend to (UNETR's ViT has none)")
    if float(config.get("layer_norm_eps", VOLMAE_LAYER_NORM_EPS)) != MONAI_LAYER_NORM_EPS:
        reasons.append(f"LayerNorm eps {config.get('layer_norm_eps', VOLMAE_LAYER_NORM_EPS)} (MONAI's is "
                       f"{MONAI_LAYER_NORM_EPS})")
    if reasons:
        raise UnmappableEncoder(f"UNETR cannot take it as it is: {'; '.join(reasons)}; pretrain with --model "
                                f"mae_vit_base_patch16_unetr for an encoder it can")
    return {"in_channels": vit["in_channels"], "img_size": vit["img_size"], "hidden_size": vit["hidden_size"],
            "mlp_dim": vit["mlp_dim"], "num_heads": vit["num_heads"], "proj_type": "conv", "qkv_bias": True,
            "spatial_dims": vit["spatial_dims"]}


def unetr_vit_weights(weights: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """The encoder as UNETR's `vit.*` state dict: MONAI's ViT keys without the class token (the patch tokens never
    attended to it: models.vit_encoder, isolated_class_token)."""
    unetr_kwargs(config)
    mapped = {f"vit.{key}": value for key, value in monai_vit_weights(weights, config).items() if key != "cls_token"}
    width = int(config["embed_dim"])
    for i in range(int(config["depth"])):  # MONAI builds these LayerNorms unused (no cross-attention): their init
        mapped[f"vit.blocks.{i}.norm_cross_attn.weight"] = torch.ones(width)
        mapped[f"vit.blocks.{i}.norm_cross_attn.bias"] = torch.zeros(width)
    return mapped
