"""Issue 7: the SLIViT and 3DViTMedNet setups, MedViT-3D, and explanations that point at the evidence."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import run_cli, shared_path
from volmae import models
from volmae.datasets.blobs import blob_volumes
from volmae.datasets.slices import slice_indices
from volmae.util.explain_check import blob_explanation_ratio


@pytest.mark.parametrize("name,options", [
    ("medvit3d_tiny", {}), ("medvit3d_small", {}),
    ("vitmednet3d", {}), ("slivit", {"backbone": "convnext_atto"}), ("vit3d_tiny_patch4", {"depth": 2}),
])
@pytest.mark.parametrize("grid", [(28, 28, 28), (64, 64, 64), (16, 24, 32)])
def test_every_model_runs_forward_and_backward(name, options, grid):
    if name == "vitmednet3d" and grid != (28, 28, 28):
        options = {"backbone": "resnet18"}  # ResNet-50 on 3 x 64 slices of 64^2 is minutes on 2 CPU cores
    if name.startswith(("vitmednet3d", "slivit", "vit3d")):
        options = {**options, "img_size": grid}
    model = models.create_model(name, num_classes=3, **options)
    x = torch.rand(1, 1, *grid)
    logits = model(x)
    logits.sum().backward()
    assert logits.shape == (1, 3)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_slivit_makes_one_token_per_slice():
    model = models.create_model("slivit", img_size=(7, 32, 32), backbone="convnext_atto", num_classes=2)
    x = torch.rand(2, 1, 7, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, 1 + 7, 256)
        single = model.slice_features(x[:, :, 3:4])  # a slice's feature depends on that slice alone
        torch.testing.assert_close(model.slice_features(x)[:, 3], single[:, 0], atol=1e-5, rtol=1e-5)


def test_slice_selection():
    assert slice_indices(100, 5, "eq") == [0, 25, 50, 74, 99]
    assert slice_indices(100, 4, "mid") == [48, 49, 50, 51]
    assert slice_indices(3, 5, "eq") == [0, 0, 1, 2, 2]


def test_vitmednet_shifted_copies_move_one_voxel():
    from volmae.models.vitmednet3d import shifted_copies

    x = torch.rand(1, 1, 5, 6, 7)
    copies = shifted_copies(x)
    assert copies.shape == (1, 7, 5, 6, 7)
    assert torch.equal(copies[0, 1, 1:], x[0, 0, :-1]) and torch.equal(copies[0, 2, :-1], x[0, 0, 1:])
    assert torch.equal(copies[0, 5, :, :, 1:], x[0, 0, :, :, :-1])


@pytest.fixture(scope="module")
def slivit_data(tmp_path_factory):
    """A meta CSV over the shared volumes (files, the DICOM series, and a folder of PNG slices) with
    made-up labels, and a Kermany-style CSV of 2D images with one-hot pathology columns."""
    folder = tmp_path_factory.mktemp("slivit")
    volumes = shared_path("volumes")
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(volumes / "example_ct_sm.nii.gz")))
    (folder / "slices").mkdir()
    for k, plane in enumerate(array):
        png = np.clip((plane + 1000) / 2000 * 255, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(png), str(folder / "slices" / f"b_scan_{k}.png"))
    names = ["example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "ch2.nii.gz",
             "example_seg.nii.gz", "example_ct_dicom"]
    rows = [{"pid": f"p{i}", "path": str(volumes / n), "AMD": i % 2, "thickness": 0.3 * i} for i, n in enumerate(names)]
    rows += [{"pid": "p6", "path": "slices", "AMD": 1, "thickness": 2.0},
             {"pid": "p0", "path": str(volumes / "example_ct.nii.gz"), "AMD": 0, "thickness": 0.1}]
    pd.DataFrame(rows).to_csv(folder / "meta.csv", index=False)
    images = []
    for k in range(16):
        png = np.clip((array[k % len(array)] + 1000) / 2000 * 255, 0, 255).astype(np.uint8)
        sitk.WriteImage(sitk.GetImageFromArray(png), str(folder / f"oct{k}.png"))
        images.append({"F_Name": f"oct{k}.png", "Path": str(folder / f"oct{k}.png"),
                       **{p: int(k % 4 == j) for j, p in enumerate(("NORMAL", "DRUSEN", "CNV", "DME"))}})
    pd.DataFrame(images).to_csv(folder / "kermany.csv", index=False)
    return folder


def finetune(out: Path, *args: str) -> dict:
    run_cli(["main_finetune.py", "--epochs", "1", "--bootstrap", "0", "--output_dir", str(out), *args])
    return json.loads((out / "results.json").read_text())


def test_slivit_backbone_pretraining_then_slivit_on_volumes(tmp_path, slivit_data):
    backbone = tmp_path / "backbone"
    finetune(backbone, "--setup", "slivit_backbone", "--meta", str(slivit_data / "kermany.csv"),
             "--label", "NORMAL,DRUSEN,CNV,DME", "--model", "slivit_backbone", "--backbone", "convnext_atto",
             "--slice_size", "32", "--batch_size", "8")
    assert (backbone / "backbone.pth").exists()
    out = tmp_path / "slivit"
    result = finetune(out, "--setup", "slivit", "--meta", str(slivit_data / "meta.csv"), "--label", "AMD",
                      "--model", "slivit", "--backbone", "convnext_atto", "--fe_path", str(backbone / "backbone.pth"),
                      "--slices", "6", "--sparsing", "mid", "--slice_size", "32", "--split_ratio", "0.6,0.2,0.2",
                      "--explain", "1")
    assert result["data"]["slices"] == 6 and "test" in result and "auc" in result["test"]
    split = pd.read_csv(out / "meta_split.csv")
    assert split.groupby("pid")["split"].nunique().max() == 1  # a patient never straddles two splits
    assert list((out / "explain").glob("*_overlay.png"))

    predictions = tmp_path / "predictions.csv"
    run_cli(["main_predict.py", "--checkpoint", str(out / "best.pth"), "--input_csv", str(out / "meta_split.csv"),
             "--id_col", "pid_row", "--output_csv", str(predictions), "--explain", str(tmp_path / "maps")])
    predicted = pd.read_csv(predictions)
    assert (predicted["status"] == "ok").all() and len(predicted) == len(split)
    test_rows = predicted[predicted["split"] == "test"].reset_index(drop=True)
    written = pd.read_csv(out / "test_scores.csv")
    assert np.allclose(test_rows.filter(like="prob_").to_numpy(), written.filter(like="score_").to_numpy(), atol=1e-5)
    assert all(Path(path).exists() and Path(path).with_name(Path(path).name.replace("_overlay.png", ".nii.gz")).exists()
               for path in predicted["explanation"])


def test_slivit_regression_and_multilabel(tmp_path, slivit_data):
    common = ["--setup", "slivit", "--meta", str(slivit_data / "meta.csv"), "--model", "slivit", "--backbone",
              "convnext_atto", "--slices", "4", "--slice_size", "32", "--split_ratio", "0.6,0.2,0.2"]
    regression = finetune(tmp_path / "reg", *common, "--label", "thickness", "--task", "reg")
    assert {"r2", "pearson", "mae"} <= regression["test"].keys()
    multilabel = finetune(tmp_path / "ml", *common, "--label", "AMD,AMD", "--task", "multilabel")
    assert multilabel["test"]["n"] >= 1


@pytest.mark.parametrize("setup,model", [("vitmednet", "medvit3d_tiny"), ("slivit", "vit3d_tiny_patch7")])
def test_a_pretrained_mae_fine_tunes_in_each_setup(tmp_path, setup, model):
    pre = tmp_path / "mae"
    run_cli(["main_pretrain.py", "--data_path", str(shared_path("volumes")), "--model", "mae_vit_tiny_patch16",
             "--input_size", "28", "--patch_size", "7", "--decoder_depth", "1", "--batch_size", "2",
             "--max_steps", "1", "--num_workers", "0", "--output_dir", str(pre)])
    common = ["--setup", setup, "--data_flag", "adrenalmnist3d", "--data_root", str(shared_path("medmnist")),
              "--train_samples", "16", "--batch_size", "8"]
    if setup == "slivit":
        common += ["--slice_size", "28"]
    assert "auc" in finetune(tmp_path / "native", *common, "--model", model)["test"]
    vit = finetune(tmp_path / "vit", *common, "--model", "vit3d_tiny_patch7", "--finetune", str(pre / "encoder.pth"))
    assert vit["finetune"].endswith("encoder.pth") and vit["test"]["n"] == 298


def test_medmnist_split_file_reassigns_samples(tmp_path):
    split = pd.DataFrame({"split": ["train"] * 12 + ["val"] * 6 + ["test"] * 6,
                          "index": list(range(0, 12)) + list(range(1188, 1194)) + list(range(1286, 1292)),
                          "image_id": range(24)})
    split.to_csv(tmp_path / "split.csv", index=False)
    result = finetune(tmp_path / "out", "--setup", "slivit", "--data_flag", "adrenalmnist3d", "--data_root",
                      str(shared_path("medmnist")), "--model", "vit3d_tiny_patch14", "--slice_size", "28",
                      "--split_file", str(tmp_path / "split.csv"))
    assert result["test"]["n"] == 6 and result["val"]["n"] == 6


@pytest.fixture
def one_thread():
    """The toy's outcome depends on floating-point summation order, which depends on the thread count: one
    thread makes a run repeat exactly on a machine, whatever its core count or load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blob_ratio(name: str, seed: int, size: int = 16) -> dict:
    train_set, test_set = blob_volumes(320, size, 2.5, seed), blob_volumes(32, size, 2.5, seed + 1)
    options = {"img_size": size, "depth": 4} if name.startswith("vit3d") else {}
    torch.manual_seed(seed)
    return blob_explanation_ratio(models.create_model(name, num_classes=2, **options), train_set, test_set)


@pytest.mark.parametrize("name,seeds,least_median,least_each", [
    ("vit3d_tiny_patch4", (0, 1, 2), 6.0, 2.0),  # 13-18x measured per seed; one run elsewhere gave 5.3x
    ("medvit3d_tiny", (0,), 2.5, 2.5),  # 4.3-4.4x over seeds 0-2: stable, one seed suffices
])
def test_explanations_put_their_mass_on_the_blob(one_thread, name, seeds, least_median, least_each):
    """Label = a bright blob somewhere in noise; the map's mass inside the blob must far exceed its share
    (1 = a uniform map). A statistic over seeds with margin, since a single training run can land low."""
    results = [blob_ratio(name, seed) for seed in seeds]
    ratios = [result["ratio"] for result in results]
    assert all(result["test_accuracy"] >= 0.9 for result in results), results
    assert float(np.median(ratios)) > least_median and min(ratios) > least_each, ratios

