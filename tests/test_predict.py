"""main_predict.py: CSV in, CSV out, every row accounted for; embeddings; torchrun sharding."""
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import REPO, run_cli, run_entry, shared_path
from volmae import models
from volmae.inference.checkpoints import load_checkpoint
from volmae.inference.load_model import load_for_inference
from volmae.util.atomic import OutputAppearedError, atomic_write

VOLUMES = ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_mr_sm.nii.gz", "ch2.nii.gz", "example_ct_dicom")


def write_cases(folder, rows) -> str:
    path = folder / "cases.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def predict(checkpoint, cases, output, *extra, check=True):
    return run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", cases,
                    "--output_csv", str(output), *extra], check=check)


def test_real_volumes_a_missing_and_a_corrupt_file_give_seven_rows(tmp_path, finetuned):
    checkpoint, _ = finetuned
    volumes = shared_path("volumes")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not gzip data")
    rows = [{"id": f"case{i}", "path": str(volumes / name), "site": f"s{i}"} for i, name in enumerate(VOLUMES)]
    rows += [{"id": "gone", "path": str(tmp_path / "missing.nii.gz"), "site": "x"},
             {"id": "bad", "path": "corrupt.nii.gz", "site": "y"}]
    result = predict(checkpoint, write_cases(tmp_path, rows), tmp_path / "pred.csv")
    assert "7 rows: 5 ok, 2 error" in result.stdout
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert list(out["id"]) == [r["id"] for r in rows] and list(out["site"]) == [r["site"] for r in rows]
    assert list(out.columns) == ["id", "path", "site", "prob_normal", "prob_hyperplasia", "pred_index",
                                 "pred_label", "status", "error"]
    ok = out[out["status"] == "ok"]
    assert len(ok) == 5 and (ok["error"] == "").all()
    probs = ok[["prob_normal", "prob_hyperplasia"]].astype(float)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    assert (ok["pred_label"] == np.where(probs.values.argmax(1) == 1, "hyperplasia", "normal")).all()
    errors = out[out["status"] == "error"].set_index("id")["error"]
    assert "no such file" in errors["gone"] and "SimpleITK cannot read it" in errors["bad"]


def test_explain_writes_a_map_and_overlay_per_ok_row(tmp_path, finetuned):
    checkpoint, _ = finetuned
    rows = [{"id": "ct/1", "path": str(shared_path("volumes", VOLUMES[0]))}, {"id": "gone", "path": "missing.nii.gz"}]
    predict(checkpoint, write_cases(tmp_path, rows), tmp_path / "pred.csv", "--explain", str(tmp_path / "maps"))
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False).set_index("id")
    overlay = Path(out.loc["ct/1", "explanation"])
    assert overlay == tmp_path / "maps" / "ct_1_overlay.png" and overlay.exists() and out.loc["gone", "explanation"] == ""
    heat = np.load(tmp_path / "maps" / "ct_1.npy")
    assert heat.shape == (28, 28, 28) and heat.min() == 0 and heat.max() == pytest.approx(1)
    assert (tmp_path / "maps" / "ct_1_montage.png").exists() and (tmp_path / "maps" / "ct_1.nii.gz").exists()


def test_medmnist_samples_as_npy_reproduce_the_fine_tuning_scores(tmp_path, finetuned):
    checkpoint, test_scores = finetuned
    images = np.load(shared_path("medmnist", "adrenalmnist3d.npz"))["test_images"]
    picks = [0, 7, 42, 150, 297]
    for i in picks:
        np.save(tmp_path / f"sample{i}.npy", images[i])
    np.savez(tmp_path / "pair.npz", first=images[0], second=images[7])
    rows = [{"path": f"sample{i}.npy"} for i in picks] + [{"path": "pair.npz::second"}]
    predict(checkpoint, write_cases(tmp_path, rows), tmp_path / "pred.csv", "--batch_size", "2")
    out = pd.read_csv(tmp_path / "pred.csv")
    np.testing.assert_allclose(out[["prob_normal", "prob_hyperplasia"]].values, test_scores[picks + [7]], atol=1e-5)


def test_the_output_is_not_overwritten_unless_asked(tmp_path, finetuned):
    checkpoint, _ = finetuned
    cases = write_cases(tmp_path, [{"path": str(shared_path("volumes", "example_ct_sm.nii.gz"))}])
    (tmp_path / "pred.csv").write_text("precious")
    result = predict(checkpoint, cases, tmp_path / "pred.csv", check=False)
    assert result.returncode != 0 and "--overwrite" in result.stderr
    assert (tmp_path / "pred.csv").read_text() == "precious"
    predict(checkpoint, cases, tmp_path / "pred.csv", "--overwrite")
    assert pd.read_csv(tmp_path / "pred.csv")["status"].tolist() == ["ok"]


@pytest.mark.parametrize("content,message", [("id,file\n1,a.nii.gz\n", "no 'path' column"),
                                             ("path\n", "no rows"), ("", "empty file")])
def test_unusable_csvs_stop_at_once(tmp_path, finetuned, content, message):
    (tmp_path / "cases.csv").write_text(content)
    result = predict(finetuned[0], str(tmp_path / "cases.csv"), tmp_path / "pred.csv", check=False)
    assert result.returncode != 0 and message in result.stderr and not (tmp_path / "pred.csv").exists()


def test_a_checkpoint_that_is_not_a_classifier_stops_at_once(tmp_path, phantom_dir):
    pre = tmp_path / "mae"
    run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), "--model", "mae_vit_tiny_patch16",
             "--input_size", "32", "--patch_size", "8", "--decoder_depth", "1", "--max_steps", "1",
             "--batch_size", "2", "--num_workers", "0", "--output_dir", str(pre)])
    cases = write_cases(tmp_path, [{"id": "a", "path": str(next(phantom_dir.glob("*.nii.gz")))},
                                   {"id": "b", "path": str(sorted(phantom_dir.glob("*.nii.gz"))[1])}])
    result = predict(pre / "checkpoint-last.pth", cases, tmp_path / "pred.csv", check=False)
    assert result.returncode != 0 and "MAE pretraining checkpoint" in result.stderr
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pth")
    result = predict(tmp_path / "other.pth", cases, tmp_path / "pred.csv", check=False)
    assert result.returncode != 0 and "not a VolMAE checkpoint" in result.stderr

    # ... but an MAE checkpoint gives embeddings: its encoder's own features, keyed by id
    run_cli(["main_predict.py", "--checkpoint", str(pre / "encoder.pth"), "--input_csv", cases,
             "--embeddings", str(tmp_path / "emb.h5"), "--embedding_type", "concat"])
    mae = models.create_model("mae_vit_tiny_patch16", **load_checkpoint(pre / "checkpoint-last.pth")["model_config"])
    mae.load_state_dict(load_checkpoint(pre / "checkpoint-last.pth")["model"])
    from volmae.volumes.preprocess import PreprocessConfig, load_volume

    with h5py.File(tmp_path / "emb.h5") as f, torch.no_grad():
        assert sorted(f) == ["a", "b"] and f.attrs["embedding_type"] == "concat"
        volume = torch.from_numpy(load_volume(str(next(phantom_dir.glob("*.nii.gz"))), PreprocessConfig(size=(32,) * 3)))
        latent, _, _ = mae.forward_encoder(volume[None], mask_ratio=0.0)  # all tokens kept (in shuffled order)
        expected = torch.cat([latent[0, 0], latent[0, 1:].mean(0)])
        np.testing.assert_allclose(f["a"][()], expected.numpy(), atol=1e-4)


def test_embeddings_are_the_classifier_features(tmp_path, finetuned):
    checkpoint, _ = finetuned
    images = np.load(shared_path("medmnist", "adrenalmnist3d.npz"))["test_images"][:3]
    for i, image in enumerate(images):
        np.save(tmp_path / f"s{i}.npy", image)
    cases = write_cases(tmp_path, [{"path": f"s{i}.npy"} for i in range(3)] + [{"path": "missing.npy"}])
    predict(checkpoint, cases, tmp_path / "pred.csv", "--embeddings", str(tmp_path / "emb.npy"))
    embeddings = np.load(tmp_path / "emb.npy")
    assert embeddings.shape == (4, 192) and np.isnan(embeddings[3]).all()
    model = load_for_inference(checkpoint).model
    with torch.no_grad():
        x = torch.from_numpy(images[:, None].astype(np.float32) / 255)
        np.testing.assert_allclose(embeddings[:3], model.forward_features(x)[:, 1:].mean(1).numpy(), atol=1e-5)
        logits = model.head(model.head_norm(model.fc_norm(torch.from_numpy(embeddings[:3]))))  # the head on them
    probs = pd.read_csv(tmp_path / "pred.csv")[["prob_normal", "prob_hyperplasia"]].values[:3]
    np.testing.assert_allclose(torch.softmax(logits, -1).numpy(), probs, atol=1e-5)


def test_cache_entries_can_be_predicted(tmp_path, finetuned):
    cache = tmp_path / "cache"
    run_cli(["main_cache.py", "--input", str(shared_path("volumes", "example_ct_dicom")),
             "--output", str(cache), "--size", "32", "--workers", "1"])
    key = pd.read_csv(cache / "manifest.csv")["key"].iloc[0]
    cases = write_cases(tmp_path, [{"path": f"{cache}::{key}"}, {"path": f"{cache}::vol99999999"}])
    predict(finetuned[0], cases, tmp_path / "pred.csv")
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert out["status"].tolist() == ["ok", "error"] and "no volume" in out["error"][1]


def test_two_ranks_write_the_single_process_output(tmp_path, finetuned):
    checkpoint, _ = finetuned
    volumes = shared_path("volumes")
    rows = [{"id": str(i), "path": str(volumes / name)} for i, name in enumerate(VOLUMES)] + [{"id": "x", "path": "nope"}]
    cases = write_cases(tmp_path, rows)
    predict(checkpoint, cases, tmp_path / "one.csv", "--batch_size", "2")
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537", "main_predict.py",
             "--checkpoint", str(checkpoint), "--input_csv", cases, "--output_csv", str(tmp_path / "two.csv"),
             "--batch_size", "2"])
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    pd.testing.assert_frame_equal(one, two, atol=1e-6)


def test_an_output_that_appears_meanwhile_is_kept_and_ours_goes_beside_it(tmp_path):
    target = tmp_path / "pred.csv"

    def write_while_another_run_finishes(tmp):
        target.write_text("the other run's rows")
        tmp.write_text("our rows")

    with pytest.raises(OutputAppearedError, match="pred.csv appeared while this run was working") as caught:
        atomic_write(target, write_while_another_run_finishes, replace=False)
    assert target.read_text() == "the other run's rows"
    kept = Path(str(caught.value).rsplit("this run's output is ", 1)[1])
    assert kept.read_text() == "our rows" and kept.parent == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pred.csv", kept.name])  # no temporary left


def test_two_predictions_into_one_csv_never_lose_either(tmp_path, finetuned):
    checkpoint, _ = finetuned
    cases = write_cases(tmp_path, [{"id": f"v{i}", "path": str(shared_path("volumes", "example_ct_sm.nii.gz"))}
                                   for i in range(2)])
    command = [sys.executable, "main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", cases,
               "--output_csv", str(tmp_path / "pred.csv")]
    runs = [subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outcomes = [(run.wait(timeout=600), run.stderr.read()) for run in runs]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    refusal = next(err for code, err in outcomes if code == 1).strip().splitlines()[-1]
    assert "Traceback" not in refusal and ("exists; pass --overwrite" in refusal or "appeared while" in refusal)
    assert len(pd.read_csv(tmp_path / "pred.csv")) == 2
    if "appeared while" in refusal:  # both finished: the second one's rows went beside the first one's
        assert len(pd.read_csv(refusal.rsplit("this run's output is ", 1)[1])) == 2


def test_an_output_equal_to_another_output_or_an_input_is_refused(tmp_path, finetuned):
    checkpoint, _ = finetuned
    cases = write_cases(tmp_path, [{"path": str(shared_path("volumes", "example_ct_sm.nii.gz"))}])
    result = run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", cases,
                      "--output_csv", str(tmp_path / "out.npy"), "--embeddings", str(tmp_path / "out.npy")],
                     check=False)
    assert result.returncode == 1 and "--output_csv and --embeddings are the same path" in result.stderr
    result = predict(checkpoint, cases, cases, "--overwrite", check=False)
    assert result.returncode == 1 and "--output_csv and --input_csv are the same path" in result.stderr
    assert "example_ct_sm" in Path(cases).read_text()


def test_ids_that_clash_after_sanitising_keep_their_own_files(tmp_path, finetuned):
    checkpoint, _ = finetuned
    images = np.load(shared_path("medmnist", "adrenalmnist3d.npz"))["test_images"][:2]
    for i, image in enumerate(images):
        np.save(tmp_path / f"v{i}.npy", image)
    cases = write_cases(tmp_path, [{"id": "a/b", "path": "v0.npy"}, {"id": "a_b", "path": "v1.npy"}])
    predict(checkpoint, cases, tmp_path / "pred.csv", "--explain", str(tmp_path / "maps"),
            "--embeddings", str(tmp_path / "emb.h5"))
    out = pd.read_csv(tmp_path / "pred.csv")
    assert list(out["embedding_key"]) == ["a_b", "a_b-2"]
    assert out["explanation"].nunique() == 2 and all(Path(p).exists() for p in out["explanation"])
    with h5py.File(tmp_path / "emb.h5") as f:
        assert {key: f[key].attrs["id"] for key in f} == {"a_b": "a/b", "a_b-2": "a_b"}
        assert not np.allclose(f["a_b"][()], f["a_b-2"][()])


def test_a_4d_volume_non_finite_voxels_and_an_unwritten_output_are_told_truthfully(tmp_path, finetuned, capsys):
    """P6: a 4-D series was predicted from its first frame with status ok; P7: error rows advised flags this
    command does not have; P8: an embeddings file that was never written was announced."""
    import SimpleITK as sitk

    checkpoint, _ = finetuned
    frame = sitk.ReadImage(str(shared_path("volumes", "example_ct_sm.nii.gz")), sitk.sitkFloat32)
    sitk.WriteImage(sitk.JoinSeries([frame, frame]), str(tmp_path / "series.nii.gz"))
    array = sitk.GetArrayFromImage(frame)
    array[0, 0, :3] = np.nan
    nan_image = sitk.GetImageFromArray(array)
    nan_image.CopyInformation(frame)
    sitk.WriteImage(nan_image, str(tmp_path / "nan.nii.gz"))
    cases = write_cases(tmp_path, [{"id": "series", "path": "series.nii.gz"}, {"id": "nan", "path": "nan.nii.gz"}])
    result = run_entry(capsys, "main_predict", ["--checkpoint", checkpoint, "--input_csv", cases, "--output_csv",
                                                tmp_path / "pred.csv", "--embeddings", tmp_path / "emb.npy"])
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False).set_index("id")
    assert list(out["status"]) == ["error", "error"]
    assert "4-D image with 2 frames" in out.loc["series", "error"] and "4-D image" in result.stderr
    assert "non-finite voxels" in out.loc["nan", "error"]
    for advice in ("--nonfinite", "--path_col"):
        assert advice not in out.loc["nan", "error"] and advice not in result.stderr
    assert not (tmp_path / "emb.npy").exists()
    assert "emb.npy" not in result.stdout and "not written: " in result.stderr
