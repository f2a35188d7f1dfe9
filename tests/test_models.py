"""Every registered model meets the contract (models.contract), checked over the registry as timm does:
forward and backward at a small size, a checkpoint round trip from the configuration create_model recorded,
an explanation map of the input's shape, and embeddings from forward_features."""
import inspect

import pytest
import torch

from volmae import models
from volmae.inference.predict import embed
from volmae.util.explain import explain

pytestmark = pytest.mark.fast  # in-process: `make test-fast`

# the smallest input each family takes, and arguments that keep it fast on 2 CPU cores
SMALL = {
    "vit3d": ((1, 16, 16, 16), {"img_size": 16, "depth": 1}),
    "vit_": ((1, 16, 16), {"img_size": 16, "depth": 1}),
    "vit2d": ((1, 16, 16), {"img_size": 16, "depth": 1}),
    "resnet18_3d": ((1, 8, 8, 8), {}),
    "resnet50_3d": ((1, 8, 8, 8), {}),
    "resnet18_2d": ((1, 16, 16), {}),
    "medvit3d": ((1, 16, 16, 16), {}),
    "vitmednet3d": ((1, 8, 8, 8), {"img_size": 8, "backbone": "resnet18", "depth": 1}),
    "slivit_backbone": ((3, 32, 32), {"img_size": (32, 32), "backbone": "convnext_atto"}),
    "slivit": ((1, 3, 32, 32), {"img_size": (3, 32, 32), "backbone": "convnext_atto", "depth": 1}),
    "timm_vit": ((3, 32, 32), {"in_chans": 3}),
}
CLASSIFIERS = [name for name in models.list_models() if not name.startswith("mae_")]
# one of each family and patch size is enough: the variants differ in defaults only
CHECKED = sorted({next(n for n in CLASSIFIERS if n.startswith(prefix) and (prefix != "vit3d" or "patch" in n))
                  for prefix in SMALL} | {"vit3d", "vit3d_small_patch8", "vit_tiny_patch4", "medvit3d_small"})


def small(name: str) -> tuple[tuple[int, ...], dict]:
    prefix = max((p for p in SMALL if name.startswith(p)), key=len)
    shape, options = SMALL[prefix]
    if name.startswith(("vit3d", "vit_")) and "patch" in name:
        patch = int(name.rsplit("patch", 1)[1])
        size = 16 if 16 % patch == 0 else 14
        shape = (1,) + (size,) * (len(shape) - 1)
        options = {**options, "img_size": (size,) * (len(shape) - 1)}
    return shape, options


def test_every_registered_classifier_is_covered():
    for name in CLASSIFIERS:
        assert any(name.startswith(prefix) for prefix in SMALL), f"{name}: add its small size to SMALL"


@pytest.mark.parametrize("name", CHECKED)
def test_contract(name, tmp_path):
    shape, options = small(name)
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=3, **options)
    assert isinstance(model, models.Classifier), f"{name} does not meet models.contract.Classifier"
    assert not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(type(model)).parameters.values())
    x = torch.rand(2, *shape)
    model.train()
    features = model.forward_features(x)
    logits = model.forward_head(features)
    logits.sum().backward()
    assert logits.shape == (2, 3)
    assert model.forward_head(features, pre_logits=True).dim() == 2
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.group_matcher() and isinstance(model.no_weight_decay(), set)

    model.eval()
    torch.save({"model": model.state_dict(), "model_config": model.config}, tmp_path / "model.pth")
    saved = torch.load(tmp_path / "model.pth", weights_only=True)
    again = models.create_model(name, **saved["model_config"])
    again.load_state_dict(saved["model"], strict=True)
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
        assert embed(model, model.forward_features(x), "mean").shape[0] == 2

    heat = explain(model, x, torch.zeros(2, dtype=torch.long))
    assert heat.shape == (2, *shape[1:]) and heat.min() >= 0 and heat.max() <= 1


def test_an_unknown_override_is_an_error_naming_it():
    with pytest.raises(ValueError, match="'patchsize'"):
        models.create_model("vit3d_tiny_patch4", patchsize=7)
    with pytest.raises(ValueError, match="'drop_path_rate'"):
        models.create_model("resnet18_3d", drop_path_rate=0.1)


def test_config_records_the_bound_arguments_and_leaves_out_weight_sources():
    model = models.create_model("vit3d_tiny_patch4", num_classes=5)
    assert model.config == {name: model.config[name] for name in inspect.signature(type(model)).parameters}
    assert model.config["num_classes"] == 5 and model.config["embed_dim"] == 192
    slivit = models.create_model("slivit", img_size=(3, 32, 32), backbone="convnext_atto", depth=1)
    assert "fe_path" not in slivit.config and "pretrained" not in slivit.config


def test_the_mae_and_the_classifier_share_one_encoder():
    from volmae.models.mae3d import MaskedAutoencoderViT
    from volmae.models.vit import VisionTransformer
    from volmae.models.vit_encoder import ViTEncoder

    assert issubclass(MaskedAutoencoderViT, ViTEncoder) and issubclass(VisionTransformer, ViTEncoder)
    arch = {"img_size": 16, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}
    mae = models.create_model("mae_vit_tiny_patch16", **arch, decoder_embed_dim=32, decoder_depth=1,
                              decoder_num_heads=2)
    vit = models.create_model("vit3d", **arch, stem_channels=0, global_pool="token")
    encoder_keys = {k for k in mae.state_dict() if not k.startswith(("decoder_", "mask_token"))}
    assert encoder_keys == {k for k in vit.state_dict() if not k.startswith(("head", "fc_norm"))}
    vit.load_state_dict(mae.encoder_state_dict(), strict=False)
    x = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(x), mae.forward_features(x))
