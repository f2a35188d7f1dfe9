import math

import numpy as np
import pytest
import torch

from volmae import models
from volmae.inference.load_pretrained import load_encoder
from volmae.models.mae3d import REFERENCE_DECODER
from volmae.models.patch_embed import auto_patch_size, stem_patch_size
from volmae.models.pos_embed import sincos_1d, split_embed_dim
from volmae.models.registry import create_model

pytestmark = pytest.mark.fast  # in-process: `make test-fast`


def tiny(**overrides):
    defaults = {"img_size": (16, 24, 32), "patch_size": (4, 8, 8), "embed_dim": 48, "depth": 2, "num_heads": 3,
                "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}
    return models.create_model("mae_vit_tiny_patch16", **{**defaults, **overrides})


def patchify_by_loops(imgs: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """Plain reference: visit patches in row-major grid order, flatten each voxels-first, channel last."""
    n, c, *size = imgs.shape
    grid = [s // p for s, p in zip(size, patch)]
    rows = []
    for index in np.ndindex(*grid):
        slices = tuple(slice(i * p, (i + 1) * p) for i, p in zip(index, patch))
        block = imgs[(slice(None), slice(None), *slices)]  # n, c, *patch
        rows.append(block.movedim(1, -1).reshape(n, -1))
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("img_size,patch", [((16, 24, 32), (4, 8, 8)), ((12, 20), (4, 5))])
def test_patchify_matches_plain_loops_and_unpatchify_inverts_it(img_size, patch):
    model = tiny(img_size=img_size, patch_size=patch, in_chans=2)
    imgs = torch.randn(3, 2, *img_size)
    patches = model.patchify(imgs)
    assert patches.shape == (3, math.prod(s // p for s, p in zip(img_size, patch)), math.prod(patch) * 2)
    assert torch.equal(patches, patchify_by_loops(imgs, patch))
    assert torch.equal(model.unpatchify(patches), imgs)


def test_non_cubic_grid_with_int_patch_size():
    model = models.create_model("mae_vit_tiny_patch16", img_size=(160, 192, 128), depth=1, decoder_depth=1)
    assert model.grid_size == (10, 12, 8)
    loss, pred, mask = model(torch.rand(1, 1, 160, 192, 128), mask_ratio=0.9)
    assert pred.shape == (1, 960, 16 ** 3) and torch.isfinite(loss)


def test_indivisible_grid_is_refused():
    with pytest.raises(ValueError, match="not divisible"):
        tiny(img_size=(18, 24, 32))


def test_pos_embed_encodes_each_axis_with_its_own_coordinate():
    model = tiny()
    grid = model.grid_size  # (4, 3, 4): non-cubic
    table = model.pos_embed[0, 1:].detach().numpy().reshape(*grid, -1)
    dims = split_embed_dim(48, 3)
    bounds = np.cumsum([0] + dims)
    for axis in range(3):
        block = table[..., bounds[axis]:bounds[axis + 1]]
        expected_1d = sincos_1d(dims[axis], np.arange(grid[axis]))
        for index in np.ndindex(*grid):
            np.testing.assert_allclose(block[index], expected_1d[index[axis]], atol=1e-6)
    assert np.all(model.pos_embed[0, 0].detach().numpy() == 0)


def test_embed_dims_not_divisible_by_six_are_split_evenly():
    assert split_embed_dim(1024, 3) == [342, 342, 340]
    assert sum(split_embed_dim(1280, 3)) == 1280


def test_masking_keeps_exact_count_and_differs_per_sample():
    model = tiny()
    x = torch.randn(6, model.num_patches, 48)
    for ratio in (0.0, 0.5, 0.75, 0.9, 0.95):
        kept, mask, ids_restore = model.random_masking(x, ratio)
        keep = int(model.num_patches * (1 - ratio))
        assert kept.shape == (6, keep, 48)
        assert torch.all(mask.sum(dim=1) == model.num_patches - keep)
    _, mask, _ = model.random_masking(x, 0.75)
    assert len({tuple(row.tolist()) for row in mask}) == 6


def test_kept_tokens_are_the_unmasked_ones():
    model = tiny()
    x = torch.randn(2, model.num_patches, 48)
    kept, mask, _ = model.random_masking(x, 0.75)
    for n in range(2):
        visible = x[n][mask[n] == 0]
        assert torch.equal(torch.sort(visible, dim=0).values, torch.sort(kept[n], dim=0).values)


def test_tube_mask_is_constant_along_depth():
    model = tiny()
    _, mask, _ = model.random_masking(torch.randn(4, model.num_patches, 48), 0.75, "tube")
    tubes = mask.reshape(4, *model.grid_size)
    assert torch.all(tubes == tubes[:, :1])
    plane = model.grid_size[1] * model.grid_size[2]
    assert torch.all(mask.sum(dim=1) == model.num_patches - model.grid_size[0] * int(plane * 0.25))


def test_mask_ratio_out_of_range_is_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        tiny()(torch.rand(1, 1, 16, 24, 32), mask_ratio=0.96)


def test_loss_counts_masked_patches_only():
    model = tiny()
    imgs = torch.rand(2, 1, 16, 24, 32)
    _, pred, mask = model(imgs, 0.75)
    base = model.forward_loss(imgs, pred, mask)
    changed_visible = pred + 5.0 * (1 - mask).unsqueeze(-1)
    assert torch.allclose(model.forward_loss(imgs, changed_visible, mask), base)
    changed_masked = pred + 5.0 * mask.unsqueeze(-1)
    assert model.forward_loss(imgs, changed_masked, mask) > base + 1.0
    per_patch = ((pred - model.patchify(imgs)) ** 2).mean(-1)
    assert torch.allclose(base, per_patch[mask.bool()].mean())


def test_norm_pix_loss_normalises_each_target_patch():
    model = tiny(norm_pix_loss=True)
    target = model.patch_targets(torch.rand(2, 1, 16, 24, 32) * 7 + 3)
    assert torch.allclose(target.mean(-1), torch.zeros(2, model.num_patches), atol=1e-4)
    assert torch.allclose(target.var(-1), torch.ones(2, model.num_patches), atol=1e-3)


def test_2d_model_trains_one_step():
    model = tiny(img_size=(28, 28), patch_size=4, in_chans=3)
    loss, pred, _ = model(torch.rand(2, 3, 28, 28), 0.75)
    loss.backward()
    assert pred.shape == (2, 49, 48) and model.patch_embed.proj.weight.grad is not None


def reference_state_dict_shapes(depth=24, dim=1024, dec_depth=8, dec_dim=512, tokens=4097, patch=16) -> dict:
    """The TANGERINE mae_vit_large_patch16 layout, written out from REFERENCE.md §1."""
    def blocks(prefix, n, d):
        shapes = {}
        for i in range(n):
            p = f"{prefix}.{i}."
            shapes.update({p + "norm1.weight": [d], p + "norm1.bias": [d],
                           p + "attn.qkv.weight": [3 * d, d], p + "attn.qkv.bias": [3 * d],
                           p + "attn.proj.weight": [d, d], p + "attn.proj.bias": [d],
                           p + "norm2.weight": [d], p + "norm2.bias": [d],
                           p + "mlp.fc1.weight": [4 * d, d], p + "mlp.fc1.bias": [4 * d],
                           p + "mlp.fc2.weight": [d, 4 * d], p + "mlp.fc2.bias": [d]})
        return shapes

    return {
        "cls_token": [1, 1, dim], "pos_embed": [1, tokens, dim],
        "patch_embed.proj.weight": [dim, 1, patch, patch, patch], "patch_embed.proj.bias": [dim],
        **blocks("blocks", depth, dim), "norm.weight": [dim], "norm.bias": [dim],
        "mask_token": [1, 1, dec_dim], "decoder_pos_embed": [1, tokens, dec_dim],
        "decoder_embed.weight": [dec_dim, dim], "decoder_embed.bias": [dec_dim],
        **blocks("decoder_blocks", dec_depth, dec_dim), "decoder_norm.weight": [dec_dim],
        "decoder_norm.bias": [dec_dim], "decoder_pred.0.weight": [patch ** 3, dec_dim],
        "decoder_pred.0.bias": [patch ** 3],
    }


def test_reference_checkpoint_layout_loads_strictly():
    model = models.create_model("mae_vit_large_patch16", **REFERENCE_DECODER)
    expected = reference_state_dict_shapes()
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == expected
    reference_weights = {k: torch.randn(shape) for k, shape in expected.items()}
    model.load_state_dict(reference_weights, strict=True)
    assert torch.equal(model.decoder_pred[0].weight, reference_weights["decoder_pred.0.weight"])


def test_registry_lists_every_size_and_rejects_unknown_names():
    assert {"mae_vit_tiny_patch16", "mae_vit_small_patch16", "mae_vit_base_patch16",
            "mae_vit_large_patch16", "mae_vit_huge_patch16"} <= set(models.list_models("mae_"))
    with pytest.raises(ValueError, match="unknown model"):
        models.create_model("mae_vit_gigantic")
    model = models.create_model("mae_vit_base_patch16", img_size=64, in_chans=2, decoder_depth=2)
    assert model.config["img_size"] == 64 and model.config["in_chans"] == 2 and model.img_size == (64, 64, 64)
    assert len(model.decoder_blocks) == 2 and model.config["embed_dim"] == 768


def test_stem_patch_sizes_follow_the_grid():
    assert stem_patch_size((28, 28, 28)) == (4, 4, 4)  # 7^3 tokens
    assert stem_patch_size((64, 64, 64)) == (16, 16, 16)
    assert stem_patch_size((28, 28)) == (4, 4) and stem_patch_size((64, 64)) == (8, 8)
    assert stem_patch_size((256, 256, 256)) == (16, 16, 16)
    assert auto_patch_size((28, 28, 28)) == (7, 7, 7) and auto_patch_size((28, 28, 28), stem=True) == (4, 4, 4)


def test_a_conv_stem_lets_nothing_of_the_masked_patches_reach_the_encoder():
    """ConvMAE-style masking: changing masked voxels leaves the latent unchanged; changing visible ones does not."""
    model = create_model("mae_vit_tiny_patch16", img_size=16, patch_size=4, depth=1, stem_channels=4,
                         decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    noise = model.random_masking_noise(2, "random", torch.device("cpu"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(x, 0.75, noise=noise)
        removed = mask.view(2, 1, 4, 4, 4).repeat_interleave(4, 2).repeat_interleave(4, 3).repeat_interleave(4, 4)
        masked_changed, _, _ = model.forward_encoder(x + removed * torch.randn_like(x), 0.75, noise=noise)
        visible_changed, _, _ = model.forward_encoder(x + (1 - removed) * torch.randn_like(x), 0.75, noise=noise)
    torch.testing.assert_close(masked_changed, latent)
    assert not torch.allclose(visible_changed, latent, atol=1e-3)


def test_a_classifier_with_a_stem_loads_its_mae_encoder(tmp_path):
    arch = {"img_size": 28, "patch_size": 4, "depth": 2, "embed_dim": 48, "num_heads": 3, "stem_channels": 8}
    mae = create_model("mae_vit_tiny_patch16", **arch, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": mae.encoder_state_dict(), "model_config": mae.config}, tmp_path / "encoder.pth")
    classifier = create_model("vit3d", **arch, num_classes=3)
    report = load_encoder(classifier, tmp_path / "encoder.pth")
    assert report["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(classifier.patch_embed.stem.stages[1][0].weight, mae.patch_embed.stem.stages[1][0].weight)
    assert classifier(torch.rand(2, 1, 28, 28, 28)).shape == (2, 3)


@pytest.mark.parametrize("img_size,patch,in_chans", [(16, 4, 1), ((8, 12, 16), (2, 4, 8), 2)])
def test_projecting_only_the_kept_patches_equals_projecting_all_then_keeping(img_size, patch, in_chans):
    model = models.create_model("mae_vit_tiny_patch16", img_size=img_size, patch_size=patch, in_chans=in_chans,
                                depth=1, decoder_depth=1)
    imgs = torch.rand(2, in_chans, *model.img_size)
    ids_keep, _, _ = model.draw_mask(2, 0.75, "random", torch.device("cpu"))
    all_tokens = model.embed_patches(imgs)
    expected = torch.gather(all_tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, all_tokens.shape[-1]))
    torch.testing.assert_close(model.embed_kept(model.patchify(imgs), ids_keep), expected, atol=1e-5, rtol=1e-5)


def test_the_contrastive_term_rewards_telling_volumes_apart_and_stays_out_of_the_classifier(tmp_path):
    model = tiny(contrast_weight=1.0, contrast_temperature=0.1)
    x = torch.rand(4, 1, 16, 24, 32)
    noise, other = torch.rand(4, model.num_patches), torch.rand(4, model.num_patches)
    model.train()
    with_term, _, _ = model(x, 0.75, noise=noise, second_noise=other)
    model.eval()
    reconstruction, _, _ = model(x, 0.75, noise=noise)
    assert with_term > reconstruction  # the InfoNCE term of 4 views is positive
    latent = model.forward_encoder(model.input_norm(x), 0.75, noise=noise)[0]
    same = model.contrastive_loss(latent, latent)
    shuffled = model.contrastive_loss(latent, latent[[1, 2, 3, 0]])
    assert same < shuffled  # a view matched with its own volume scores better than with another's
    torch.save({"model": model.state_dict(), "model_config": model.config}, tmp_path / "mae.pth")
    classifier = create_model("vit3d", img_size=(16, 24, 32), patch_size=(4, 8, 8), embed_dim=48, depth=2,
                              num_heads=3, stem_channels=0)
    loaded = load_encoder(classifier, tmp_path / "mae.pth")
    assert any(k.startswith("contrast_head") for k in loaded["dropped"])


def test_fine_tuning_with_the_reconstruction_loss_trains_one_shared_encoder():
    from volmae.models.joint_mae import ClassifierWithReconstruction

    mae = tiny(stem_channels=4)
    classifier = create_model("vit3d", img_size=(16, 24, 32), patch_size=(4, 8, 8), embed_dim=48, depth=2,
                              num_heads=3, stem_channels=4, num_classes=2)
    joint = ClassifierWithReconstruction(classifier, mae, mask_ratio=0.75)
    assert mae.blocks is classifier.blocks and mae.patch_embed is classifier.patch_embed
    x = torch.rand(3, 1, 16, 24, 32)
    logits, reconstruction = joint(x, with_reconstruction=True)
    reconstruction.backward()
    assert classifier.blocks[0].attn.qkv.weight.grad is not None  # the MAE loss reaches the classifier's encoder
    assert classifier.head.weight.grad is None
    torch.testing.assert_close(joint(x), classifier(x))
    fresh = create_model("vit3d", **classifier.config)
    fresh.load_state_dict(classifier.state_dict())  # what is saved is a plain classifier
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(joint, 0.05, joint.no_weight_decay(), layer_decay=0.5)
    names = {id(p): name for name, p in joint.named_parameters()}
    scales = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scales["classifier.patch_embed.proj.weight"] < scales["classifier.blocks.1.attn.qkv.weight"] < 1
    assert scales["mae.decoder_pred.0.weight"] == 1.0
    with pytest.raises(ValueError, match="share one encoder"):
        ClassifierWithReconstruction(create_model("vit3d", img_size=(16, 24, 32), patch_size=(8, 8, 8),
                                                  embed_dim=48, depth=2, num_heads=3), tiny(), 0.75)
