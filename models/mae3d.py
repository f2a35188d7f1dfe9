"""Masked Autoencoder ViT for 3D volumes and 2D images, one code path for both.

State-dict keys follow the TANGERINE 3D-MAE reference (`decoder_pred.0.*` included), so its
checkpoints load strictly when the decoder is built as theirs (512 wide, 8 deep, 16 heads). TANGERINE (Thoracic
Autoencoder Network Generating Embeddings for Radiological Interpretation for Numerous End-tasks) is the 3D MAE
framework of ../shared/seeds/004 and its ViT-Large pretrained on 98,000 chest CTs; REFERENCE.md, section 1.
The prediction head has no output activation: targets may be normalised (`norm_pix_loss`).
"""
import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .pos_embed import sincos_pos_embed
from .registry import register_model
from .vit_encoder import ViTEncoder

MAX_MASK_RATIO = 0.95
MASK_TYPES = ("random", "tube")

# Weights only pretraining uses: a classifier built on the encoder drops them.
PRETRAINING_ONLY_PREFIXES = ("decoder_", "mask_token", "contrast_head")

# Chosen from benchmarks/bench_model.py (docs/performance.md, "Choice of the default decoder").
DEFAULT_DECODER = {"decoder_embed_dim": 384, "decoder_depth": 4, "decoder_num_heads": 6}
REFERENCE_DECODER = {"decoder_embed_dim": 512, "decoder_depth": 8, "decoder_num_heads": 16}
# the decoder of `--model auto`, in proportion to its small encoder (models.vit.AUTO_ARCHITECTURE): with the default
# decoder, 9.5M of a 80x96x80 MAE's parameters would be decoder, 0.75M encoder
AUTO_DECODER = {"decoder_embed_dim": 96, "decoder_depth": 2, "decoder_num_heads": 3}


class MaskedAutoencoderViT(ViTEncoder):
    def __init__(self, img_size: int | Sequence[int] = 256, patch_size: int | Sequence[int] = 16,
                 in_chans: int = 1, spatial_dims: int | None = None, embed_dim: int = 1024,
                 depth: int = 24, num_heads: int = 16, decoder_embed_dim: int = 384,
                 decoder_depth: int = 4, decoder_num_heads: int = 6, mlp_ratio: float = 4.0,
                 norm_pix_loss: bool = False, input_mean: float = 0.0, input_std: float = 1.0,
                 stem_channels: int = 0, contrast_weight: float = 0.0, contrast_temperature: float = 0.2,
                 contrast_dim: int = 128, isolated_class_token: bool = False, layer_norm_eps: float = 1e-6):
        super().__init__(img_size, patch_size, in_chans, spatial_dims, embed_dim, depth, num_heads, mlp_ratio,
                         input_mean, input_std, stem_channels, learnable_pos=False,
                         isolated_class_token=isolated_class_token, layer_norm_eps=layer_norm_eps)
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        if contrast_weight < 0 or contrast_temperature <= 0:
            raise ValueError(f"contrast_weight must be >= 0 and contrast_temperature > 0, got {contrast_weight}, "
                             f"{contrast_temperature}")
        # an InfoNCE term between two differently masked views of each volume, on their mean visible token: the
        # pooled feature a classifier reads must then describe the volume, not the mask (docs/pretraining.md)
        self.contrast_weight, self.contrast_temperature = float(contrast_weight), float(contrast_temperature)
        self.contrast_head = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(),
                                           nn.Linear(embed_dim, contrast_dim)) if contrast_weight > 0 else None
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        num_patches = self.patch_embed.num_patches
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        patch_volume = math.prod(self.patch_size) * in_chans
        self.decoder_pred = nn.Sequential(nn.Linear(decoder_embed_dim, patch_volume))
        self._init_weights()

    def _init_weights(self) -> None:
        self.decoder_pos_embed.data.copy_(
            sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True))
        proj = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, *grid*patch] -> [N, L, prod(patch)*C], patch voxels first, channel last."""
        n, c = imgs.shape[:2]
        d = self.spatial_dims
        split = [n, c]
        for g, p in zip(self.grid_size, self.patch_size):
            split += [g, p]
        x = imgs.reshape(split)
        grid_axes = [2 + 2 * i for i in range(d)]
        patch_axes = [3 + 2 * i for i in range(d)]
        x = x.permute(0, *grid_axes, *patch_axes, 1)
        return x.reshape(n, self.num_patches, -1)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Exact inverse of `patchify`."""
        n = x.shape[0]
        d = self.spatial_dims
        x = x.reshape(n, *self.grid_size, *self.patch_size, self.in_chans)
        order = [0, 2 * d + 1]
        for i in range(d):
            order += [1 + i, 1 + d + i]
        x = x.permute(order)
        return x.reshape(n, self.in_chans, *(g * p for g, p in zip(self.grid_size, self.patch_size)))

    def noise_count(self, mask_type: str) -> int:
        """Random numbers per sample a mask needs: one per patch, or one per depth column for tubes."""
        if mask_type == "random":
            return self.num_patches
        if mask_type == "tube":
            if self.spatial_dims != 3:
                raise ValueError("tube masking needs a 3D model")
            return math.prod(self.grid_size[1:])
        raise ValueError(f"mask_type must be one of {MASK_TYPES}, got {mask_type!r}")

    def expand_noise(self, raw: torch.Tensor, mask_type: str) -> torch.Tensor:
        """[N, noise_count] -> [N, L] noise whose argsort gives the keep order; tube noise is shared along depth."""
        if mask_type == "tube":
            return raw[:, None].expand(-1, self.grid_size[0], -1).reshape(raw.shape[0], self.num_patches)
        return raw

    def random_masking_noise(self, n: int, mask_type: str, device: torch.device,
                             generator: torch.Generator | None = None) -> torch.Tensor:
        """[N, L] masking noise from `generator` (the global RNG if None)."""
        raw = torch.rand(n, self.noise_count(mask_type), device=device, generator=generator)
        return self.expand_noise(raw, mask_type)

    def num_visible(self, mask_ratio: float, mask_type: str) -> int:
        """Tokens kept per sample: int(L*(1-ratio)); for tubes, whole depth columns of that share."""
        if not 0.0 <= mask_ratio <= MAX_MASK_RATIO:
            raise ValueError(f"mask_ratio must be in [0, {MAX_MASK_RATIO}], got {mask_ratio}")
        if mask_type == "tube":
            plane = math.prod(self.grid_size[1:])
            keep = self.grid_size[0] * int(plane * (1 - mask_ratio))
        else:
            keep = int(self.num_patches * (1 - mask_ratio))
        if keep < 1:
            raise ValueError(f"mask_ratio {mask_ratio} leaves no visible patch on grid {self.grid_size}")
        return keep

    def draw_mask(self, n: int, mask_ratio: float, mask_type: str, device: torch.device,
                  noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random choice of visible patches: (ids_keep [N, K], mask [N, L] with 1 = removed,
        ids_restore [N, L]). `noise` ([N, L]: `random_masking_noise`, or the engine's keyed_masking_noise) fixes
        the draw; else the global RNG."""
        keep = self.num_visible(mask_ratio, mask_type)
        if noise is None:
            noise = self.random_masking_noise(n, mask_type, device, None)
        ids_shuffle = torch.argsort(noise, dim=1, stable=True)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, self.num_patches, device=device)
        mask[:, :keep] = 0
        return ids_shuffle[:, :keep], torch.gather(mask, 1, ids_restore), ids_restore

    def random_masking(self, x: torch.Tensor, mask_ratio: float, mask_type: str = "random",
                       noise: torch.Tensor | None = None):
        """Keep a per-sample random subset of tokens [N, L, E]. Returns kept tokens, mask (1 = removed), restore ids."""
        ids_keep, mask, ids_restore = self.draw_mask(x.shape[0], mask_ratio, mask_type, x.device, noise)
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])), mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, mask_type: str = "random",
                        noise: torch.Tensor | None = None):
        """Standardised inputs -> (latent of the visible patches with the class token, mask, restore ids).
        A convolutional stem sees the masked patches as zeros (ConvMAE), so nothing of them leaks."""
        ids_keep, mask, ids_restore = self.draw_mask(imgs.shape[0], mask_ratio, mask_type, imgs.device, noise)
        if self.patch_embed.stem is None:
            return self.encode(self.embed_kept(self.patchify(imgs), ids_keep)), mask, ids_restore
        x = self.embed_patches(imgs, (1 - mask).view(imgs.shape[0], *self.grid_size))
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        return self.encode(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, kept_plus_cls, dim = x.shape
        mask_tokens = self.mask_token.expand(n, ids_restore.shape[1] + 1 - kept_plus_cls, -1)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :1], patches], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def reconstruction(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """For figures, in the units of the [0, 1] input `imgs`: the input, its visible patches (masked ones
        zero), and the visible patches with the prediction in the masked ones."""
        keep = (1 - mask)[..., None]
        patches = self.patchify(self.input_norm(imgs).float())
        if self.norm_pix_loss:  # the prediction is per-patch standardised: undo it with the patch's statistics
            mean, std = patch_moments(patches)
            pred = pred * std + mean
        filled = self.unpatchify(pred * (1 - keep) + patches * keep) * self.input_norm.std + self.input_norm.mean
        return {"input": imgs, "masked": self.unpatchify(self.patchify(imgs) * keep), "reconstruction": filled}

    def patch_targets(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs.float())
        if self.norm_pix_loss:
            mean, std = patch_moments(target)
            target = (target - mean) / std
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over masked patches (over all when none is masked)."""
        per_patch = ((pred.float() - self.patch_targets(imgs)) ** 2).mean(dim=-1)
        weights = mask if mask.sum() > 0 else torch.ones_like(mask)
        return (per_patch * weights).sum() / weights.sum()

    @property
    def needs_second_view(self) -> bool:
        return self.contrast_head is not None and self.training

    def contrastive_loss(self, latent: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE between the mean visible tokens of two views: each view must pick its own volume's
        other view among the batch's."""
        a, b = (F.normalize(self.contrast_head(x[:, 1:].mean(dim=1)).float(), dim=-1) for x in (latent, other))
        logits = a @ b.T / self.contrast_temperature
        targets = torch.arange(len(a), device=a.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, mask_type: str = "random",
                noise: torch.Tensor | None = None, second_noise: torch.Tensor | None = None):
        """Loss, prediction and mask for [0, 1] inputs; prediction and loss are in standardised units. With a
        contrastive term, training adds it for a second view (masked by `second_noise`)."""
        imgs = self.input_norm(imgs)
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, mask_type, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        if self.needs_second_view:
            other, _, _ = self.forward_encoder(imgs, mask_ratio, mask_type, second_noise)
            loss = loss + self.contrast_weight * self.contrastive_loss(latent, other)
        return loss, pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return encoder_weights(self.state_dict())


def patch_moments(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (MAE's norm_pix_loss: unbiased variance + 1e-6) of [N, L, P] patches."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5


def encoder_weights(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights a classifier reuses: everything but the decoder, the mask token and the contrastive head."""
    return {k: v for k, v in state_dict.items() if not k.startswith(PRETRAINING_ONLY_PREFIXES)}


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# reference encoder defaults (256^3, 1 channel, patch 16) with our default decoder
for _size, _shape in {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                      "huge": (1280, 32, 16)}.items():
    register_model(f"mae_vit_{_size}_patch16", img_size=256, patch_size=16, in_chans=1, **DEFAULT_DECODER,
                   embed_dim=_shape[0], depth=_shape[1], num_heads=_shape[2])(MaskedAutoencoderViT)
# The encoder MONAI's UNETR takes as its `vit` (docs/export.md): ViT-B, patch 16, at UNETR's usual 96^3 (a 6^3 patch
# grid: the feature size its decoder expects), LayerNorm eps 1e-5 as MONAI's blocks, and a class token the patch
# tokens never attend to, since UNETR's ViT has none. Its patch tokens are then UNETR's, to 1e-5.
UNETR_ENCODER = {"img_size": 96, "patch_size": 16, "embed_dim": 768, "depth": 12, "num_heads": 12,
                 "isolated_class_token": True, "layer_norm_eps": 1e-5}
register_model("mae_vit_base_patch16_unetr", in_chans=1, **DEFAULT_DECODER, **UNETR_ENCODER)(MaskedAutoencoderViT)
