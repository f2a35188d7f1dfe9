"""Encoders that travel (issue 38): the default encoder (`--model auto`, the hybrid stem) and a classifier fine-tuned
from it as MONAI bundles that MONAI's own runner executes without VolMAE; an encoder UNETR takes as it is; a Hub
folder; the ONNX opset pinned and an fp16 graph; one-line refusals."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import lidc_patients, run_cli, run_entry
from volmae.inference.checkpoints import load_checkpoint

AUTO_PRETRAIN = ["--model", "auto", "--input_size", "32", "--num_workers", "0", "--vis_every", "0", "--epochs", "1",
                 "--batch_size", "4", "--precision", "fp32"]
# MONAI's bundle runner in a process where VolMAE cannot be imported: its editable finder and the repository's folder
# are taken off the import system first, and the run stops if `volmae` can still be found.
WITHOUT_VOLMAE = """
import importlib.util, os, runpy, sys
spec = importlib.util.find_spec("volmae")
root = os.path.dirname(spec.origin) if spec and spec.origin else None
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != root and "__editable__" not in p]
sys.path.insert(0, os.getcwd())
assert importlib.util.find_spec("volmae") is None, "VolMAE is importable"
sys.argv = ["monai.bundle", "run", "--config_file", "configs/inference.json", "--dataset_dir", sys.argv[1]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory, phantom_dir):
    """The recipe's default encoder (the small hybrid ViT) and a classifier fine-tuned from it on real LIDC crops,
    and a folder of real NIfTI crops to run them on."""
    folder = tmp_path_factory.mktemp("bundle")
    run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), *AUTO_PRETRAIN, "--output_dir", str(folder / "mae")])
    rows, _ = lidc_patients(8, 8)
    rows.to_csv(folder / "labels.csv", index=False)
    run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(folder / "labels.csv"), "--label", "malignant",
             "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25", "--input_size", "16,24,24", "--model", "auto",
             "--finetune", str(folder / "mae" / "encoder.pth"), "--epochs", "1", "--batch_size", "8", "--bootstrap",
             "0", "--search", "none", "--output_dir", str(folder / "ft")])
    (folder / "nifti").mkdir()
    for path in pd.read_csv(folder / "ft" / "test_scores.csv")["path"][:3]:
        (folder / "nifti" / os.path.basename(path)).symlink_to(path)
    cases = folder / "cases.csv"
    pd.DataFrame({"path": sorted(str(p) for p in (folder / "nifti").iterdir())}).to_csv(cases, index=False)
    return folder


def export(capsys, checkpoint, output_dir, *extra, check=True):
    result = run_entry(capsys, "main_export", ["--checkpoint", checkpoint, "--output_dir", output_dir, *extra])
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def run_bundle(bundle, data) -> pd.DataFrame:
    result = subprocess.run([sys.executable, "-c", WITHOUT_VOLMAE, str(data)], cwd=bundle, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    return pd.read_csv(bundle / "eval" / "outputs.csv").sort_values("path").reset_index(drop=True)


def test_the_default_encoder_and_its_classifier_run_as_bundles_without_volmae(models, tmp_path, capsys):
    """MONAI's runner, VolMAE not importable, on real NIfTI crops: the probabilities and embeddings volmae-predict
    gives, within 1e-4."""
    export(capsys, models / "ft" / "best.pth", tmp_path / "classifier", "--format", "monai-bundle")
    export(capsys, models / "mae" / "encoder.pth", tmp_path / "encoder", "--format", "monai-bundle")
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md", "LICENSE",
                 "scripts/network.py"):
        assert (tmp_path / "classifier" / name).is_file(), name
    inference = json.loads((tmp_path / "classifier" / "configs" / "inference.json").read_text())
    assert {"network_def", "preprocessing", "inferer", "postprocessing"} <= set(inference)
    metadata = json.loads((tmp_path / "classifier" / "configs" / "metadata.json").read_text())
    assert "auc" in metadata["volmae"]["card"]["scores"]["test"] and "pca_logreg" in metadata["volmae"]["card"]["floors"]
    assert metadata["intended_use"] and metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    run_entry(capsys, "main_predict", ["--checkpoint", models / "ft" / "best.pth", "--input_csv", models / "cases.csv",
                                       "--output_csv", tmp_path / "predicted.csv"])
    run_entry(capsys, "main_predict", ["--checkpoint", models / "mae" / "encoder.pth", "--input_csv",
                                       models / "cases.csv", "--embeddings", tmp_path / "embedded.npy"])
    predicted = pd.read_csv(tmp_path / "predicted.csv")
    bundle = run_bundle(tmp_path / "classifier", models / "nifti")
    assert [os.path.basename(p) for p in bundle["path"]] == [os.path.basename(p) for p in predicted["path"]]
    columns = ["prob_malignant=0", "prob_malignant=1"]
    np.testing.assert_allclose(bundle[columns].to_numpy(), predicted[columns].to_numpy(), atol=1e-4)
    embedded = run_bundle(tmp_path / "encoder", models / "nifti")
    np.testing.assert_allclose(embedded.iloc[:, 1:].to_numpy(), np.load(tmp_path / "embedded.npy"), atol=1e-4)


def test_unetr_takes_the_unetr_preset_s_encoder_as_it_is(phantom_dir, tmp_path, capsys):
    """The preset (ViT-B, patch 16, isolated class token, eps 1e-5) at a tiny grid: UNETR builds, loads every `vit.*`
    key of the export strictly, and its ViT's tokens are the encoder's patch tokens within 1e-5."""
    from monai.networks.nets import UNETR

    run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), "--model", "mae_vit_base_patch16_unetr",
             "--input_size", "32", "--num_workers", "0", "--vis_every", "0", "--max_steps", "1", "--epochs", "1",
             "--batch_size", "2", "--precision", "fp32", "--output_dir", str(tmp_path / "mae")])
    export(capsys, tmp_path / "mae" / "encoder.pth", tmp_path / "bundle", "--format", "monai-bundle")
    kwargs = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())["volmae"]["unetr"]["kwargs"]
    unetr = UNETR(out_channels=3, **kwargs).eval()
    weights = torch.load(tmp_path / "bundle" / "models" / "unetr_vit.pt", weights_only=True)
    theirs = {k for k in unetr.state_dict() if k.startswith("vit.")}
    assert set(weights) == theirs
    missing, unexpected = unetr.load_state_dict(weights, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("vit.")]
    encoder = load_checkpoint(tmp_path / "mae" / "encoder.pth")
    from volmae.inference.load_model import load_for_inference

    ours = load_for_inference(tmp_path / "mae" / "encoder.pth", allow_encoder=True).model
    volume = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        tokens, _ = unetr.vit(volume)
        expected = ours.forward_features(volume)[:, 1:]
    assert encoder["model_config"]["isolated_class_token"] and tokens.shape == expected.shape
    assert float((tokens - expected).abs().max()) <= 1e-5


def test_a_hub_folder_parses_and_predicts_bit_identically(models, tmp_path, capsys):
    from huggingface_hub import ModelCard, load_state_dict_from_file

    export(capsys, models / "ft" / "best.pth", tmp_path / "hf", "--format", "hf", "--license", "cc-by-4.0")
    card = ModelCard.load(tmp_path / "hf" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "cc-by-4.0" and data["library_name"] == "volmae" and "roc_auc" in data["metrics"]
    assert data["model-index"][0]["results"][0]["metrics"][0]["type"] == "roc_auc"
    weights = load_state_dict_from_file(tmp_path / "hf" / "model.safetensors")
    original = load_checkpoint(models / "ft" / "best.pth")["model"]
    assert all(torch.equal(weights[k], original[k]) for k in original)
    for name, checkpoint in (("pth", models / "ft" / "best.pth"), ("hf", tmp_path / "hf")):
        run_entry(capsys, "main_predict", ["--checkpoint", checkpoint, "--input_csv", models / "cases.csv",
                                           "--output_csv", tmp_path / f"{name}.csv"])
    assert (tmp_path / "pth.csv").read_bytes() == (tmp_path / "hf.csv").read_bytes()


def test_the_onnx_opset_is_pinned_and_an_fp16_graph_is_checked(models, tmp_path, capsys):
    export(capsys, models / "ft" / "best.pth", tmp_path / "onnx", "--format", "onnx", "--onnx_fp16")
    record = json.loads((tmp_path / "onnx" / "config.json").read_text())["onnx"]
    assert record["opset"] == 18 and record["fp16"]["max_abs_difference_to_fp32"] <= record["fp16"]["tolerance"]
    for name in ("model.onnx", "model_fp16.onnx"):
        run_entry(capsys, "main_predict", ["--checkpoint", tmp_path / "onnx" / name, "--input_csv",
                                           models / "cases.csv", "--output_csv", tmp_path / f"{name}.csv"])
    full, half = (pd.read_csv(tmp_path / f"{name}.csv")["prob_malignant=1"] for name in ("model.onnx", "model_fp16.onnx"))
    np.testing.assert_allclose(half, full, atol=1e-2)


def test_bundles_refuse_in_one_line(models, tmp_path, capsys):
    """A bundle into a folder that holds one (without --overwrite), an architecture that does not map, and a
    tampered metadata.json when VolMAE reads the bundle."""
    export(capsys, models / "ft" / "best.pth", tmp_path / "bundle", "--format", "monai-bundle")
    again = export(capsys, models / "ft" / "best.pth", tmp_path / "bundle", "--format", "monai-bundle", check=False)
    assert again.returncode == 1 and "holds an export already" in again.stderr
    export(capsys, models / "ft" / "best.pth", tmp_path / "bundle", "--format", "monai-bundle", "--overwrite")
    resnet = tmp_path / "resnet.pth"
    from volmae.inference.checkpoints import ClassifierCheckpoint
    from volmae.models import create_model

    model = create_model("resnet18_3d", num_classes=2)
    ClassifierCheckpoint("resnet18_3d", model.config, ["a", "b"], "binary-class", [16, 24, 24]).with_weights(
        model.state_dict(), 0, {}).save(resnet)
    refused = export(capsys, resnet, tmp_path / "resnet_bundle", "--format", "monai-bundle", check=False)
    assert refused.returncode == 1 and "resnet18_3d does not map to a MONAI bundle" in refused.stderr
    metadata = tmp_path / "bundle" / "configs" / "metadata.json"
    metadata.write_text(metadata.read_text().replace("Research on 3D", "Diagnosis on 3D"))
    tampered = run_entry(capsys, "main_predict", ["--checkpoint", tmp_path / "bundle", "--input_csv",
                                                  models / "cases.csv", "--output_csv", tmp_path / "p.csv"])
    assert tampered.returncode == 1 and "metadata.json: its hash differs" in tampered.stderr
