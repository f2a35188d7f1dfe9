"""volmae-export (issue 28): safetensors and ONNX exports of a classifier fine-tuned on real LIDC crops and of an
MAE encoder, round-tripped through volmae-predict and --finetune; refusals in one line."""
import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import lidc_classifier, run_cli, tiny_encoder
from volmae.datasets.cases import InputSpec, load_case
from volmae.inference.load_model import load_for_inference
from volmae.models.registry import create_model


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A classifier fine-tuned for one epoch on 24 real LIDC crops, with its results and test scores."""
    return lidc_classifier(tmp_path_factory.mktemp("export_classifier"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, phantom_dir):
    return tiny_encoder(tmp_path_factory.mktemp("export_encoder"), phantom_dir)


def export(checkpoint, output_dir, fmt: str, *extra: str, check: bool = True):
    return run_cli(["main_export.py", "--checkpoint", str(checkpoint), "--format", fmt, "--output_dir", str(output_dir),
                    *extra], check=check)


def predict(checkpoint, cases, output, *extra: str):
    run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", str(cases), *output, *extra])


def test_a_safetensors_export_predicts_bit_identically_and_carries_its_card(classifier, tmp_path):
    export(classifier / "ft" / "best.pth", tmp_path / "st", "safetensors")
    assert sorted(p.name for p in (tmp_path / "st").iterdir()) == ["MODEL_CARD.md", "config.json", "model.safetensors"]
    predict(classifier / "ft" / "best.pth", classifier / "cases.csv", ["--output_csv", str(tmp_path / "pth.csv")])
    predict(tmp_path / "st", classifier / "cases.csv", ["--output_csv", str(tmp_path / "st.csv")])
    assert (tmp_path / "pth.csv").read_bytes() == (tmp_path / "st.csv").read_bytes()
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    card = config["card"]
    assert card["class_names"] == ["malignant=0", "malignant=1"] and card["preprocess"]["resample"] == "spacing"
    assert "auc" in card["scores"]["test"] and "pca_logreg" in card["floors"] and card["data_seen"]["split_counts"]
    test_counts = card["data_seen"]["label_counts"]["test"]
    assert sum(test_counts.values()) == card["data_seen"]["split_counts"]["test"]
    text = (tmp_path / "st" / "MODEL_CARD.md").read_text()
    for section in ("## Model", "## Preprocessing", "## Training data", "## Scores and floors", "## Intended use",
                    "## Known limits"):
        assert section in text


def test_an_onnx_export_agrees_with_pytorch_through_onnxruntime(classifier, tmp_path):
    result = export(classifier / "ft" / "best.pth", tmp_path / "onnx", "onnx")
    assert "agree with PyTorch" in result.stdout
    record = json.loads((tmp_path / "onnx" / "config.json").read_text())["onnx"]
    assert record["max_abs_difference"] <= 1e-4 and record["checked_on"].endswith("test_scores.csv")
    predict(classifier / "ft" / "best.pth", classifier / "cases.csv", ["--output_csv", str(tmp_path / "pth.csv")])
    predict(tmp_path / "onnx" / "model.onnx", classifier / "cases.csv", ["--output_csv", str(tmp_path / "onnx.csv")])
    torch_scores, onnx_scores = pd.read_csv(tmp_path / "pth.csv"), pd.read_csv(tmp_path / "onnx.csv")
    columns = [c for c in torch_scores if c.startswith("prob_")]
    np.testing.assert_allclose(onnx_scores[columns], torch_scores[columns], atol=1e-4)
    assert (onnx_scores["pred_label"] == torch_scores["pred_label"]).all()


def asymmetric_volume(folder) -> str:
    """A volume that differs along every axis (a ramp in x, a step in y, a block near one z end), so that any
    swapped or flipped axis changes the features."""
    z, y, x = np.meshgrid(np.arange(40), np.arange(36), np.arange(32), indexing="ij")
    array = (x * 20.0 + (y > 24) * 300.0 + ((z < 8) & (x < 10)) * 500.0 - 600.0).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    path = folder / "asymmetric.nii.gz"
    sitk.WriteImage(image, str(path))
    return str(path)


def test_encoder_exports_give_the_same_embeddings_and_fine_tune_as_encoder_pth(encoder, classifier, phantom_dir,
                                                                               tmp_path):
    export(encoder, tmp_path / "st", "safetensors")
    export(encoder, tmp_path / "onnx", "onnx")
    card = json.loads((tmp_path / "st" / "config.json").read_text())["card"]
    assert card["kind"] == "encoder" and card["data_seen"]["pretraining data"]["volumes"] == 8
    cases = tmp_path / "cases.csv"
    paths = [asymmetric_volume(tmp_path), *map(str, sorted(phantom_dir.glob("*.nii.gz"))[:3])]
    pd.DataFrame({"id": [f"v{i}" for i in range(len(paths))], "path": paths}).to_csv(cases, index=False)
    for name, checkpoint in (("pth", encoder), ("st", tmp_path / "st"), ("onnx", tmp_path / "onnx" / "model.onnx")):
        predict(checkpoint, cases, ["--embeddings", str(tmp_path / f"{name}.npy")])
    reference = np.load(tmp_path / "pth.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "st.npy"), reference)
    np.testing.assert_allclose(np.load(tmp_path / "onnx.npy"), reference, atol=1e-4)
    reports = []
    for name, source in (("pth", encoder), ("st", tmp_path / "st")):
        out = run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(classifier / "labels.csv"), "--label",
                       "malignant", "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25", "--input_size",
                       "16,24,24", "--finetune", str(source), "--model", "auto", "--epochs", "1", "--bootstrap", "0",
                       "--search", "none", "--volume_cache", str(tmp_path / "cache"),
                       "--output_dir", str(tmp_path / f"ft_{name}")])
        reports.append(next(line for line in out.stdout.splitlines() if line.startswith("loaded ")))
    assert reports[0].split(" from ")[0] == reports[1].split(" from ")[0]  # the same tensors loaded, new, dropped
    assert reports[0].split("; ", 1)[1] == reports[1].split("; ", 1)[1]


def test_refused_exports_and_damaged_exports_fail_in_one_line(classifier, tmp_path):
    export(classifier / "ft" / "best.pth", tmp_path / "st", "safetensors")
    again = export(classifier / "ft" / "best.pth", tmp_path / "st", "safetensors", check=False)
    assert again.returncode == 1 and "holds an export already" in again.stderr.strip().splitlines()[-1]
    (tmp_path / "not_a_model.pth").write_bytes(b"plain text, not a checkpoint")
    foreign = export(tmp_path / "not_a_model.pth", tmp_path / "x", "onnx", check=False)
    assert foreign.returncode == 1 and "Traceback" not in foreign.stderr
    assert foreign.stderr.strip().splitlines()[-1].startswith("error: cannot export")
    weights = tmp_path / "st" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    damaged = run_cli(["main_predict.py", "--checkpoint", str(tmp_path / "st"), "--input_csv",
                       str(classifier / "cases.csv"), "--output_csv", str(tmp_path / "p.csv")], check=False)
    assert damaged.returncode == 1 and "Traceback" not in damaged.stderr
    assert "model.safetensors: unreadable" in damaged.stderr.strip().splitlines()[-1]


def test_a_monai_vit_built_from_the_export_computes_the_encoder_s_tokens(encoder, classifier, tmp_path):
    from monai.networks.nets import ViT

    result = export(encoder, tmp_path / "monai", "monai")
    assert "equal the encoder's" in result.stdout
    record = json.loads((tmp_path / "monai" / "monai_vit.json").read_text())
    vit = ViT(**record["kwargs"])
    vit.load_state_dict(torch.load(tmp_path / "monai" / "monai_vit.pt", weights_only=True), strict=True)
    for module in vit.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = record["layer_norm_eps"]
    loaded = load_for_inference(encoder, allow_encoder=True)
    spec = InputSpec.from_meta(loaded.meta)
    crop = pd.read_csv(classifier / "cases.csv")["path"].iloc[0]
    volumes = torch.stack([torch.from_numpy(load_case(path, tmp_path, spec))
                           for path in (asymmetric_volume(tmp_path), crop)])
    with torch.no_grad():
        theirs = vit.eval().norm(vit(volumes)[1][-1])
        ours = loaded.model.forward_features(volumes)
    assert theirs.shape == ours.shape
    assert float((theirs - ours).abs().max()) <= 1e-5


def test_encoders_that_do_not_map_to_monai_are_refused_in_one_line(classifier, tmp_path):
    hybrid = create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, stem_channels=8, decoder_embed_dim=64,
                          decoder_depth=1, decoder_num_heads=2)
    torch.save({"model": hybrid.state_dict(), "model_name": "mae_vit_tiny_patch16", "model_config": hybrid.config},
               tmp_path / "hybrid.pth")
    for source, words in ((tmp_path / "hybrid.pth", "convolutional stem"),
                          (classifier / "ft" / "best.pth", "takes a pretrained encoder")):
        refused = export(source, tmp_path / f"out_{source.stem}", "monai", check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert words in refused.stderr.strip().splitlines()[-1]
        assert not (tmp_path / f"out_{source.stem}" / "monai_vit.pt").exists()
