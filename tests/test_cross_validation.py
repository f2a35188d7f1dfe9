"""Cross-validation as the backbone of a run (issue 36): folds by patient and stratified, every choice on the
pooled out-of-fold predictions and none on test, the final model the fold ensemble in every format, a two-level
interval that counts the folds' disagreement, and `below_floor` when no candidate reaches the PCA floor."""
import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import lidc_patients, run_cli, run_entry
from volmae.finetuning.cross_validation import below_floor
from volmae.finetuning.flags import parse_args
from volmae.main_finetune import main
from volmae.util.cli import run_main
from volmae.util.metrics import two_level_auc_difference

COMMON = ["main_finetune.py", "--setup", "volumes", "--label", "malignant", "--group", "patient_id", "--input_size",
          "16,24,24", "--model", "auto", "--epochs", "2", "--batch_size", "8", "--bootstrap", "0", "--search", "full",
          "--search_budget", "2", "--folds", "3"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """24 real LIDC crops of 16 patients with a split column (test: 4 patients), as a user gives them."""
    rows, chosen = lidc_patients(8, 8)
    test_patients = set(chosen[:2] + chosen[8:10])
    rows["split"] = ["test" if p in test_patients else "train" for p in rows["patient_id"]]
    folder = tmp_path_factory.mktemp("cv")
    rows.to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def cross_validated(labels):
    run_cli([*COMMON, "--meta", str(labels / "labels.csv"), "--volume_cache", str(labels / "cache"),
             "--output_dir", str(labels / "run")])
    return labels / "run"


def test_no_test_label_reaches_a_choice(labels, cross_validated):
    """The same run with the test labels shuffled chooses the same candidate, stops every fold at the same epoch and
    gives the same out-of-fold and test scores: only the test metrics change."""
    table = pd.read_csv(labels / "labels.csv")
    test = table["split"] == "test"
    table.loc[test, "malignant"] = np.random.default_rng(1).permutation(table.loc[test, "malignant"].to_numpy())
    assert (table.loc[test, "malignant"] != pd.read_csv(labels / "labels.csv").loc[test, "malignant"]).any()
    table.to_csv(labels / "shuffled.csv", index=False)
    run_cli([*COMMON, "--meta", str(labels / "shuffled.csv"), "--volume_cache", str(labels / "cache"),
             "--output_dir", str(labels / "shuffled")])
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (cross_validated,
                                                                                      labels / "shuffled"))
    assert first["search"] == second["search"] and first["best_epoch"] == second["best_epoch"]
    assert first["floors"]["pca_logreg"]["chosen_per_fold"] == second["floors"]["pca_logreg"]["chosen_per_fold"]
    for name in ("val_scores.csv", "test_scores.csv"):
        ours, theirs = (pd.read_csv(folder / name) for folder in (cross_validated, labels / "shuffled"))
        columns = [c for c in ours.columns if c.startswith("score_")]
        np.testing.assert_array_equal(ours[columns].to_numpy(), theirs[columns].to_numpy())


def test_folds_hold_whole_patients_and_the_final_model_is_the_fold_ensemble(cross_validated):
    result = json.loads((cross_validated / "results.json").read_text())
    folds = pd.read_csv(cross_validated / "folds.csv")
    assert folds.groupby("patient")["fold"].nunique().max() == 1 and sorted(folds["fold"].unique()) == [0, 1, 2]
    assert result["final_model"] == "final_model" and "pooled out-of-fold" in result["search"]["judged_on"]
    assert all(len(c["fold_best_epochs"]) == 3 for c in result["search"]["candidates"])
    members = [pd.read_csv(cross_validated / f"fold{i}_test_scores.csv") for i in range(3)]
    columns = [c for c in members[0].columns if c.startswith("score_")]
    test = pd.read_csv(cross_validated / "test_scores.csv")
    np.testing.assert_allclose(test[columns].to_numpy(), np.mean([m[columns].to_numpy() for m in members], axis=0),
                               atol=1e-6)


def test_the_ensemble_predicts_its_fold_mean_through_volmae_predict_and_every_export(cross_validated, tmp_path,
                                                                                       capsys):
    """volmae-predict and volmae-export take final_model as one model; safetensors and the Hub folder (one file,
    every member), ONNX (one graph) and the MONAI bundle (its VolMAEEnsemble network, read back by VolMAE) give
    what the run's test scores are."""
    test = pd.read_csv(cross_validated / "test_scores.csv")
    test[["path"]].to_csv(tmp_path / "cases.csv", index=False)
    expected = test["score_malignant=1"].to_numpy()
    final = cross_validated / "final_model"
    formats = ("safetensors", "onnx", "hf", "monai-bundle")
    for fmt in formats:
        result = run_entry(capsys, "main_export", ["--checkpoint", final, "--format", fmt, "--output_dir", tmp_path / fmt])
        assert result.returncode == 0, result.stderr
    for name, checkpoint in (("folder", final), *((fmt, tmp_path / fmt) for fmt in formats)):
        result = run_entry(capsys, "main_predict", ["--checkpoint", checkpoint, "--input_csv", tmp_path / "cases.csv",
                                                    "--output_csv", tmp_path / f"{name}.csv"])
        assert result.returncode == 0, result.stderr
        predicted = pd.read_csv(tmp_path / f"{name}.csv")["prob_malignant=1"].to_numpy()
        np.testing.assert_allclose(predicted, expected, atol=1e-5, err_msg=name)
    refused = run_entry(capsys, "main_predict", ["--checkpoint", final, "--input_csv", tmp_path / "cases.csv",
                                                 "--output_csv", tmp_path / "x.csv", "--embeddings", tmp_path / "e.npy"])
    assert refused.returncode == 1 and "ensemble of 3 fold models" in refused.stderr


@pytest.mark.fast
def test_the_two_level_interval_widens_when_the_folds_disagree():
    """Synthetic scores: both arms' folds agree in one case and disagree (each fold model right on a different
    third of the patients) in the other, at the same mean difference; only the units' resampling can tell."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 60)
    base = [np.stack([1 - s, s], axis=1) for s in [y * 0.3 + rng.random(120) * 0.7 for _ in range(5)]]
    signal = y * 0.4 + rng.random(120) * 0.6
    agreeing = [np.stack([1 - signal, signal], axis=1) for _ in range(5)]
    disagreeing = []
    for i in range(5):
        noisy = np.where(rng.random(120) < 0.5 * (i % 2), rng.random(120), signal)
        disagreeing.append(np.stack([1 - noisy, noisy], axis=1))
    groups = np.arange(120)
    together = two_level_auc_difference(y[:, None], agreeing, base, groups, rounds=500)
    apart = two_level_auc_difference(y[:, None], disagreeing, base, groups, rounds=500)
    width = lambda r: r["ci95"][1] - r["ci95"][0]  # noqa: E731
    assert width(apart) > 1.2 * width(together)
    assert np.std(apart["per_unit_difference"]) > 5 * np.std(together["per_unit_difference"])


@pytest.mark.fast
def test_below_floor_is_set_when_no_candidate_reaches_the_floor():
    assert below_floor([{"val_score": 0.80}, {"val_score": 0.85}], 0.86)
    assert not below_floor([{"val_score": 0.80}, {"val_score": 0.86}], 0.86)
    assert below_floor([{"val_score": float("nan")}], 0.5) and not below_floor([{"val_score": 0.1}], None)


@pytest.mark.parametrize("extra, reason", [
    (["--folds", "1"], "at least 2 folds"),
    (["--folds", "3", "--setup", "medmnist", "--data_flag", "adrenalmnist3d"], "is for --setup volumes"),
    (["--folds", "3", "--seeds", "0,1"], "replaces --seeds"),
])
def test_fold_flags_that_cannot_work_are_refused_before_any_folder_is_made(tmp_path, capsys, extra, reason):
    output_dir = tmp_path / "run"
    args = parse_args(["--setup", "volumes", "--meta", str(tmp_path / "labels.csv"), "--label", "y",
                       "--output_dir", str(output_dir), *extra])
    assert run_main(main, args) == 1
    assert reason in capsys.readouterr().err
    assert not output_dir.exists()
