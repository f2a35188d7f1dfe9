"""ViT classifiers (2D and 3D) built on the MAE encoder's layout, so pretrained encoders load as is.

Keys: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.*` as in the MAE; then by pooling
  avg    mean of the patch tokens -> `fc_norm` (the MAE fine-tuning default)
  token  the class token -> `norm`
  concat [class token, mean of patch tokens] -> `fc_norm` of width 2E (TANGERINE's classifier)
and `head` (with `head_norm`, a batch norm without affine before it). The positional embedding is
learnable here, initialised with the fixed sin-cos table; `stem_channels` puts a convolutional stem
before the patch projection (models.patch_embed.ConvStem).
Inputs in [0, 1] are standardised inside the model (`input_mean`, `input_std`, part of its configuration,
taken from the pretrained encoder), so every caller feeds the same [0, 1] data.
"""
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block

from models.patch_embed import InputNorm, PatchEmbed, to_tuple
from models.pos_embed import sincos_pos_embed
from models.registry import register_model

POOLINGS = ("avg", "token", "concat")


class VisionTransformer(nn.Module):
    def __init__(self, img_size: int | Sequence[int] = 28, patch_size: int | Sequence[int] = 4,
                 in_chans: int = 1, spatial_dims: int | None = None, num_classes: int = 2,
                 embed_dim: int = 192, depth: int = 12, num_heads: int = 3, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.0, drop_rate: float = 0.0, global_pool: str = "avg",
                 input_mean: float = 0.0, input_std: float = 1.0, stem_channels: int = 0, head_norm: bool = False):
        super().__init__()
        if global_pool not in POOLINGS:
            raise ValueError(f"global_pool must be one of {POOLINGS}, got {global_pool!r}")
        if spatial_dims is None:
            spatial_dims = 3 if isinstance(img_size, int) else len(img_size)
        self.spatial_dims = spatial_dims
        self.global_pool = global_pool
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.config = {
            "img_size": list(to_tuple(img_size, spatial_dims, "img_size")),
            "patch_size": list(to_tuple(patch_size, spatial_dims, "patch_size")),
            "in_chans": in_chans, "spatial_dims": spatial_dims, "num_classes": num_classes,
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": mlp_ratio,
            "drop_path_rate": drop_path_rate, "drop_rate": drop_rate, "global_pool": global_pool,
            "input_mean": input_mean, "input_std": input_std, "stem_channels": stem_channels,
            "head_norm": head_norm,
        }
        self.input_norm = InputNorm(input_mean, input_std)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, spatial_dims, stem_channels)
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)[None])
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, drop_path=rate)
            for rate in rates])
        self.norm = norm_layer(embed_dim) if global_pool == "token" else nn.Identity()
        self.feature_dim = 2 * embed_dim if global_pool == "concat" else embed_dim
        self.fc_norm = norm_layer(self.feature_dim) if global_pool != "token" else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        # MAE's linear-probe trick: batch norm without affine before the head removes what every sample shares
        # (positions, empty patches), so the head sees the part that varies from the first step
        self.head_norm = nn.BatchNorm1d(self.feature_dim, affine=False, eps=1e-6) if head_norm else nn.Identity()
        self.head = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # as MAE fine-tuning: start near uniform
        nn.init.zeros_(self.head.bias)

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay: stem first, then each block, norms and head last."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm|^fc_norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 1 + L, E] after the last block: class token first."""
        x = self.patch_embed(self.input_norm(x)) + self.pos_embed[:, 1:]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return self.norm(tokens)[:, 0]
        mean = tokens[:, 1:].mean(dim=1)
        feature = torch.cat([tokens[:, 0], mean], dim=-1) if self.global_pool == "concat" else mean
        return self.fc_norm(feature)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled, normalised feature the head sees: [N, feature_dim]."""
        return self.pool(self.forward_tokens(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.head_norm(self.forward_features(x))))


SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
PATCHES = (2, 4, 7, 8, 14, 16)
# What `--model auto` builds when no pretrained encoder dictates the architecture: a small hybrid ViT (a
# convolutional stem of 16 channels, 96 wide, 4 deep), its patch from `auto_patch_size` (README: recipes).
AUTO_ARCHITECTURE = {"embed_dim": 96, "depth": 4, "num_heads": 3, "stem_channels": 16}


def _register(prefix: str, size: str, patch: int, dims: int, default_img: int) -> None:
    embed_dim, depth, num_heads = SIZES[size]

    def factory(**overrides) -> VisionTransformer:
        kwargs = {"img_size": (default_img,) * dims, "patch_size": patch, "in_chans": 1,
                  "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, **overrides}
        return VisionTransformer(**kwargs)

    factory.__name__ = f"{prefix}_{size}_patch{patch}"
    factory.__doc__ = f"{dims}D ViT-{size} classifier, patch {patch}, MAE encoder layout."
    register_model(factory)


for _patch in PATCHES:
    for _size in SIZES:
        _register("vit3d", _size, _patch, 3, 28)
    for _size in ("tiny", "small", "base"):
        _register("vit", _size, _patch, 2, 28)


@register_model
def vit3d(**overrides) -> VisionTransformer:
    """3D ViT of any width, depth, patch and stem (AUTO_ARCHITECTURE, patch 4, unless overridden): `--model auto`."""
    return VisionTransformer(**{"img_size": (28,) * 3, "spatial_dims": 3, **AUTO_ARCHITECTURE, **overrides})


@register_model
def vit2d(**overrides) -> VisionTransformer:
    """2D ViT of any width, depth, patch and stem (AUTO_ARCHITECTURE, patch 4, unless overridden): `--model auto`."""
    return VisionTransformer(**{"img_size": (28,) * 2, "spatial_dims": 2, **AUTO_ARCHITECTURE, **overrides})
