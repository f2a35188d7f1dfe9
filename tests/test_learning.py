"""Issue 10: augmentation chosen from the data, collapse detection, pretraining probes.

No test here asserts an accuracy: benchmarks measure, tests check behaviour.
"""
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from tests.conftest import REPO, run_cli, shared_path
from volmae import models
from volmae.datasets.data_profile import choose_augment, profile_images
from volmae.datasets.finetune_augment import NO_AUGMENT, PRESETS, VITMEDNET_AUGMENT, augment_batch, preset
from volmae.datasets.medmnist_data import RAW_SCALE, MedMNISTSpec, load_split
from volmae.inference.checkpoints import load_checkpoint
from volmae.util.metrics import bootstrap_auc_ci, stays_at_prior
from volmae.util.probe_scores import probe_aucs
from volmae.util.run_log import read_log


def medmnist_train(flag: str, size: int = 28) -> tuple[np.ndarray, np.ndarray]:
    return load_split(MedMNISTSpec(flag, size, str(shared_path("medmnist"))), "train")


def test_auto_augmentation_keeps_a_mask_set_binary_and_differs_for_grey_levels():
    masks, mask_labels = medmnist_train("adrenalmnist3d")
    grey, grey_labels = medmnist_train("breastmnist")
    mask_profile, grey_profile = profile_images(masks, mask_labels), profile_images(grey, grey_labels)
    assert mask_profile.is_label_like and mask_profile.distinct_values == 2
    assert mask_profile.class_counts == [929, 259] and 0.005 < mask_profile.nonzero_fraction < 0.05
    assert not grey_profile.is_label_like
    mask_choice, grey_choice = choose_augment(mask_profile)[0], choose_augment(grey_profile)[0]
    assert mask_choice != grey_choice and grey_choice == "full"
    assert preset(mask_choice).noise_std == 0 and not preset(mask_choice).changes_intensity
    torch.manual_seed(0)
    batch = torch.from_numpy(masks[:32]).float() * RAW_SCALE
    for choice in (mask_choice, "geometric"):  # geometric: nearest-neighbour affine, also safe for masks
        for setup_pipeline in (preset("full"), VITMEDNET_AUGMENT):
            augmented = augment_batch(batch, preset(choice, setup_pipeline))
            assert set(augmented.unique().tolist()) <= {0.0, 1.0}
            assert not torch.equal(augmented, batch)
    # the grey-level pipeline is what broke masks: it must not be what auto picks for them
    smeared = augment_batch(batch, preset("full"))
    assert len(smeared.unique()) > 2


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_keeps_shape_and_range(name):
    x = torch.rand(3, 1, 8, 8, 8)
    y = augment_batch(x, preset(name))
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    if name == "none":
        assert preset(name) == NO_AUGMENT and torch.equal(y, x)


def test_predictions_at_the_class_prior_are_recognised():
    one_class = np.tile([[0.8, 0.2]], (10, 1)) + np.linspace(0, 0.2, 10)[:, None] * [[-1, 1]]
    assert stays_at_prior(one_class, "binary-class")  # AUC can be anything; the prediction is one class
    flat = np.tile([[0.5, 0.5]], (10, 1)) + np.linspace(-1e-5, 1e-5, 10)[:, None] * [[-1, 1]]
    assert stays_at_prior(flat, "binary-class")  # both classes predicted, from noise-level differences
    assert not stays_at_prior(np.array([[0.8, 0.2], [0.3, 0.7]]), "binary-class")
    assert stays_at_prior(np.array([[0.9, 0.1], [0.8, 0.3]]), "multi-label, binary-class")
    assert not stays_at_prior(np.array([[0.1], [2.0]]), "regression")


def test_bootstrap_interval_of_a_small_test_split_is_finite_and_quiet():
    """Resamples of a small, unbalanced split often hold one class; they have no AUC and must not turn the
    interval into NaN (sklearn gives NaN with a warning rather than an error)."""
    truth = np.array([0] * 8 + [1] * 2)
    scores = np.stack([1 - np.linspace(0, 1, 10), np.linspace(0, 1, 10)], axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        low, high = bootstrap_auc_ci(truth, scores, "binary-class", rounds=200)
    assert np.isfinite([low, high]).all() and low <= high <= 1.0


def test_a_run_that_never_leaves_the_prior_says_it_is_collapsed(tmp_path):
    out = tmp_path / "collapsed"
    result = run_cli(["main_finetune.py", "--data_flag", "adrenalmnist3d", "--data_root", str(shared_path("medmnist")),
                      "--model", "vit3d_tiny_patch14", "--epochs", "2", "--lr", "0", "--min_lr", "0",
                      "--batch_size", "64", "--bootstrap", "0", "--train_samples", "64", "--output_dir", str(out)])
    assert "WARNING: the model never left the class prior" in result.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["collapsed"] is True and results["epochs_at_prior"] == 2 and results["test"]["at_prior"]
    assert results["augment"]["preset"] == "flips" and results["data_profile"]["distinct_values"] == 2
    assert "augmentation: flips" in result.stdout and "mask or label map" in result.stdout
    assert all(record["val_at_prior"] for record in read_log(out / "log.txt"))


def test_probes_score_separable_and_random_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (200, 1))
    separable = rng.normal(size=(200, 16)) + 3 * np.eye(16)[labels[:, 0]]
    noise = rng.normal(size=(200, 16))
    good = probe_aucs(separable[:150], labels[:150], separable[150:], labels[150:], "binary-class", 2)
    chance = probe_aucs(noise[:150], labels[:150], noise[150:], labels[150:], "binary-class", 2)
    assert good["probe_knn_auc"] > 0.95 and good["probe_linear_auc"] > 0.95
    assert chance["probe_knn_auc"] < 0.75 and chance["probe_linear_auc"] < 0.75
    three = rng.integers(0, 3, (120, 1))
    features = rng.normal(size=(120, 4)) + 3 * np.eye(4)[three[:, 0]]  # one direction per class (cosine)
    multi = probe_aucs(features[:90], three[:90], features[90:], three[90:], "multi-class", 3)
    assert multi["probe_knn_auc"] > 0.9 and multi["probe_linear_auc"] > 0.9


def test_pretraining_logs_probes_at_step_zero_and_at_the_end(tmp_path):
    out = tmp_path / "mae"
    root = shared_path("medmnist")
    result = run_cli(["main_pretrain.py", "--data_flag", "breastmnist", "--data_root", str(root),
                      "--model", "mae_vit_tiny_patch16", "--patch_size", "7", "--depth", "2",
                      "--decoder_embed_dim", "64", "--decoder_depth", "1", "--decoder_num_heads", "2",
                      "--batch_size", "64", "--epochs", "2", "--probe_every", "1", "--warmup_epochs", "1",
                      "--probe_data_flag", "breastmnist", "--probe_root", str(root), "--num_workers", "0",
                      "--vis_every", "0", "--output_dir", str(out)])
    probes = [r for r in read_log(out / "log.txt") if "probe_knn_auc" in r]
    steps_per_epoch = -(-546 // 64)  # the last, smaller batch is a step too
    assert [r["step"] for r in probes] == [0, steps_per_epoch, 2 * steps_per_epoch]
    assert all(0 <= r["probe_knn_auc"] <= 1 and 0 <= r["probe_linear_auc"] <= 1 for r in probes)
    assert "probe at step 0: kNN AUC" in result.stdout


def test_a_probe_that_does_not_fit_the_model_stops_at_start(tmp_path):
    result = run_cli(["main_pretrain.py", "--data_flag", "breastmnist", "--data_root", str(shared_path("medmnist")),
                      "--model", "mae_vit_tiny_patch16", "--patch_size", "7", "--depth", "1", "--max_steps", "1",
                      "--probe_data_flag", "adrenalmnist3d", "--probe_root", str(shared_path("medmnist")),
                      "--output_dir", str(tmp_path / "bad")], check=False)
    assert result.returncode != 0 and "error: probe:" in result.stderr and "Traceback" not in result.stderr


def test_the_medmnist_recipe_runs_end_to_end_with_a_baseline(tmp_path):
    out = tmp_path / "recipe"
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "recipes" / "medmnist.sh"), "--data_flag", "adrenalmnist3d", "--size", "28",
         "--data_root", str(shared_path("medmnist")), "--output_dir", str(out), "--seeds", "0,1", "--baseline",
         "--pretrain_epochs", "1", "--epochs", "1", "--train_samples", "64", "--probe_every", "1"],
        env={**os.environ, "VOLMAE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    for method in ("mae", "scratch"):
        block = summary[method]
        assert {"test_auc_mean", "test_auc_std", "test_acc_mean", "test_acc_std", "per_seed", "cpu_seconds"} <= set(block)
        assert [run["seed"] for run in block["per_seed"]] == [0, 1] and block["cpu_seconds"] > 0
        assert block["test_auc_mean"] == pytest.approx(np.mean([run["test_auc"] for run in block["per_seed"]]))
    assert summary["mae"]["cpu_seconds"] > summary["pretrain"]["cpu_seconds"] > 0
    assert [p["step"] for p in summary["pretrain"]["probe"]] == [0, 1]  # 64 samples: one step per epoch
    assert summary["augment"]["preset"] == "flips" and summary["model_config"]["patch_size"] == [4, 4, 4]
    assert summary["model_config"]["stem_channels"] == 16  # 28^3: a conv stem, then 4^3 patches
    mae, scratch = (load_checkpoint(out / m / "seed_0" / "best.pth") for m in ("mae", "scratch"))
    assert mae["model_config"] == scratch["model_config"]  # the baseline is the same architecture
    assert "mae: test AUC" in result.stdout and "scratch: test AUC" in result.stdout


@pytest.mark.parametrize("name", ["vit3d_tiny_patch7", "mae_vit_tiny_patch16"])
def test_models_standardise_their_input_with_statistics_from_their_config(name):
    options = {"depth": 1, **({"num_classes": 2} if name.startswith("vit") else {"img_size": 28, "patch_size": 7})}
    plain = models.create_model(name, **options)
    standardised = models.create_model(name, **options, input_mean=0.2, input_std=0.5)
    standardised.load_state_dict(plain.state_dict())  # the statistics are configuration, not weights
    assert standardised.config["input_mean"] == 0.2 and standardised.config["input_std"] == 0.5
    x = torch.rand(2, 1, 28, 28, 28)
    with torch.no_grad():
        if name.startswith("vit"):
            torch.testing.assert_close(standardised(x), plain((x - 0.2) / 0.5))
        else:
            torch.testing.assert_close(standardised.forward_features(x), plain.forward_features((x - 0.2) / 0.5))
            noise = plain.random_masking_noise(2, "random", torch.device("cpu"), torch.Generator().manual_seed(0))
            torch.testing.assert_close(standardised(x, noise=noise)[0], plain((x - 0.2) / 0.5, noise=noise)[0])
