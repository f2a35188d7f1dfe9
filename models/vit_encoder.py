"""The ViT encoder shared by the MAE (models.mae3d) and the ViT classifiers (models.vit), 2D and 3D.

One class owns the weights both use, under the MAE's key names (`patch_embed.proj`, `cls_token`,
`pos_embed`, `blocks.*`, `norm`), so a pretrained encoder loads into a classifier by name alone.
Inputs in [0, 1] are standardised inside (`input_mean`, `input_std`: configuration, not weights).
"""
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .patch_embed import InputNorm, PatchEmbed
from .pos_embed import sincos_pos_embed


class ViTEncoder(nn.Module):
    """Patch embedding (optionally after a convolutional stem), class token, sin-cos positions, blocks and,
    with `final_norm`, a LayerNorm after them. The MAE keeps its positions fixed (`learnable_pos=False`);
    classifiers start from the same table and learn it.

    `isolated_class_token`: the patch tokens never attend to the class token (it still reads them all), so the
    patch tokens are what a ViT without a class token computes: MONAI's UNETR, whose ViT has none, then takes
    the encoder as it is. `layer_norm_eps`: 1e-6 as MAE; MONAI's blocks use 1e-5 and set no other."""

    def __init__(self, img_size: int | Sequence[int], patch_size: int | Sequence[int], in_chans: int,
                 spatial_dims: int | None, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
                 input_mean: float, input_std: float, stem_channels: int, drop_path_rate: float = 0.0,
                 final_norm: bool = True, learnable_pos: bool = True, isolated_class_token: bool = False,
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        if spatial_dims is None:
            spatial_dims = 3 if isinstance(img_size, int) else len(img_size)
        self.spatial_dims = spatial_dims
        self.embed_dim = embed_dim
        self.input_norm = InputNorm(input_mean, input_std)
        self.isolated_class_token = isolated_class_token
        norm_layer = partial(nn.LayerNorm, eps=layer_norm_eps)
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, spatial_dims, stem_channels)
        self.img_size = self.patch_embed.img_size
        self.patch_size = self.patch_embed.patch_size
        self.grid_size = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_pos_embed(embed_dim, self.grid_size, cls_token=True)[None]
        self.pos_embed = nn.Parameter(table, requires_grad=learnable_pos)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, drop_path=rate)
            for rate in rates])
        self.norm = norm_layer(embed_dim) if final_norm else nn.Identity()

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, x: torch.Tensor, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Standardised input -> positioned patch tokens [N, L, E]; `visible` masks a stem (models.patch_embed)."""
        return self.patch_embed(x, visible) + self.pos_embed[:, 1:]

    def embed_kept(self, patches: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Patchified input [N, L, prod(patch) * C] (patch voxels first, channel last: the MAE's patchify)
        -> positioned tokens of the kept patches [N, K, E]. Without a stem the projection is a linear map of
        each patch alone, so a masked patch need not be projected at all: at 90% masking a tenth of the work."""
        if self.patch_embed.stem is not None:
            raise ValueError("a convolutional stem sees neighbouring patches: use embed_patches with `visible`")
        kept = torch.gather(patches, 1, ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))
        proj = self.patch_embed.proj
        weight = proj.weight.movedim(1, -1).reshape(proj.weight.shape[0], -1)
        return F.linear(kept, weight, proj.bias) + self.pos_embed[0, 1:][ids_keep]

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """Positioned patch tokens [N, K, E] -> [N, 1 + K, E]: class token prepended, blocks, final norm."""
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(patches.shape[0], -1, -1)
        x = torch.cat([cls, patches], dim=1)
        mask = self.attention_mask(x.shape[1], x.device)
        for block in self.blocks:
            x = block(x, attn_mask=mask)
        return self.norm(x)

    def attention_mask(self, tokens: int, device: torch.device) -> torch.Tensor | None:
        """None (every token sees every other), or with `isolated_class_token` [T, T], True where a token may
        attend: the patch tokens' rows leave out the class token's column."""
        if not self.isolated_class_token:
            return None
        mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
        mask[1:, 0] = False
        return mask

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] input, every patch: tokens [N, 1 + L, E], class token first."""
        return self.encode(self.embed_patches(self.input_norm(x)))

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ids for timm's layer-wise lr decay: stem first, then each block, norms and head last."""
        return {"stem": r"^cls_token|^pos_embed|^patch_embed",
                "blocks": [(r"^blocks\.(\d+)", None), (r"^norm|^fc_norm", (99999,))]}

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}
