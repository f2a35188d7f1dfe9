"""Defaults that choose from the data and the machine (issue 25): precision, threads, grid, schedule, the floors
beside every score, the paired comparison, and choices that never read the test labels."""
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import lidc_patients, run_cli, shared_path
from volmae import models
from volmae.datasets.data_profile import profile_images
from volmae.finetuning.finetune_config import FinetuneRun, resolve_run
from volmae.finetuning.flags import parse_args
from volmae.finetuning.search import candidates, clears_validation, rank_key
from volmae.models.mae3d import AUTO_DECODER
from volmae.models.vit import AUTO_ARCHITECTURE
from volmae.pretraining.engine import build_optimizer
from volmae.util.dist import DistInfo
from volmae.util.floors import image_floor
from volmae.util.lr_sched import auto_epochs, auto_warmup_epochs, optimizer_steps_per_epoch, warmup_warning
from volmae.util.metrics import accuracy_at, one_feature_auc, paired_auc_difference, youden_threshold
from volmae.util.threads import PROC_STAT, busy_cores, choose_threads, cpu_ticks, current_load
from volmae.util.train_backend import TorchBackend, resolve_precision
from volmae.volumes.build_cache import build_cache
from volmae.volumes.preprocess import PreprocessConfig
from volmae.volumes.preprocess_choice import AUTO_VOXEL_BUDGET, HeaderSurvey, choose_preprocess


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_for_cpu_pretraining_only_where_the_cpu_has_native_bf16(monkeypatch, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu, cpu_bf16=True) == ("bf16" if native else "fp32")  # MAE pretraining steps
    assert resolve_precision("auto", cpu) == "fp32"  # fine-tuning, evaluation, prediction
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", cpu, cpu_bf16=True) == "fp32" and resolve_precision("bf16", cpu) == "bf16"
    backend = TorchBackend(torch.nn.Linear(4, 4), None, DistInfo(0, 1, 0, cpu), "auto", 1, None, cpu_bf16=True)
    with backend.autocast(inference=True):  # the held-out loss and probes of a bf16 pretraining: fp32
        assert torch.nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.float32


def short_pretraining(precision: str, steps: int = 6) -> list[float]:
    """The recipe's MAE (small hybrid ViT, small decoder) trained a few steps on fixed volumes through the backend."""
    torch.manual_seed(0)
    model = models.create_model("mae_vit_tiny_patch16", img_size=(16, 24, 24), patch_size=(4, 4, 4),
                                **AUTO_ARCHITECTURE, **AUTO_DECODER)
    backend = TorchBackend(model, build_optimizer(model, 0.05), DistInfo(0, 1, 0, torch.device("cpu")), precision,
                           accum_iter=1, clip_grad=None)
    generator = torch.Generator().manual_seed(1)
    batch = torch.rand(8, 1, 16, 24, 24, generator=generator)
    noise = torch.rand(8, model.num_patches, generator=generator)
    losses = []
    for _ in range(steps):
        with backend.autocast():
            loss, _, _ = backend.model(batch, 0.75, noise=noise)
        backend.backward(loss.float())
        backend.finish_step(skip=False)
        losses.append(loss.float().item())
    return losses


def test_a_short_bf16_pretraining_agrees_with_fp32():
    fp32, bf16 = short_pretraining("fp32"), short_pretraining("bf16")
    assert fp32[-1] < fp32[0]  # it trains
    np.testing.assert_allclose(bf16, fp32, rtol=0.02)
    with TorchBackend(torch.nn.Linear(4, 4), None, DistInfo(0, 1, 0, torch.device("cpu")), "bf16", 1, None).autocast():
        assert torch.nn.Linear(4, 4)(torch.rand(2, 4)).dtype == torch.bfloat16  # the bf16 run really was bf16


def test_threads_leave_room_for_other_ranks_and_busy_cores():
    assert choose_threads(cores=2, local_ranks=1, load=0.1) == 2
    assert choose_threads(cores=2, local_ranks=1, load=1.9) == 1  # another job holds a core
    assert choose_threads(cores=16, local_ranks=4, load=0.0) == 4
    assert choose_threads(cores=2, local_ranks=1, load=7.0) == 1


def test_busy_cores_count_only_this_process_s_cores_and_treat_io_wait_as_idle():
    before = cpu_ticks("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 100 0 0 100 0 0 0 0 0 0\ncpu1 0 0 0 200 0 0 0 0 0 0\n"
                       "cpu2 0 0 0 0 0 0 0 0 0 0\nintr 5 1 2\n")
    after = cpu_ticks("cpu  9 9 9 9 9 9 9 9 0 0\ncpu0 120 0 0 100 0 0 0 0 0 0\ncpu1 0 0 5 205 10 0 0 0 0 0\n"
                      "cpu2 0 0 0 0 0 0 0 0 0 0\nintr 9 1 2\n")
    assert before[0] == (100, 200) and set(before) == {0, 1, 2}
    assert busy_cores(before, after, {0, 1, 2}) == pytest.approx(1.0 + 0.25)  # cpu0 all busy; cpu1 5 of 20
    assert busy_cores(before, after, {1}) == pytest.approx(0.25)  # a core outside the affinity is not counted
    assert busy_cores(before, after, {7}) == 0.0


@pytest.mark.skipif(not PROC_STAT.is_file() or not hasattr(os, "sched_setaffinity"),
                    reason="reads /proc/stat and pins a process to a core (sched_setaffinity): Linux only")
def test_a_core_another_process_keeps_busy_right_now_is_seen_as_busy():
    """The 1-minute load average still counted a step that had just ended, so a recipe's next step took one
    thread on an idle machine; the reading now is of the present."""
    core = min(os.sched_getaffinity(0))
    spinner = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{core}}})\nwhile True: pass"])
    try:
        deadline = time.monotonic() + 120
        load = 0.0
        while time.monotonic() < deadline and load < 0.7:  # the spinner needs a moment to start and pin itself
            load, measured = current_load()
        assert load >= 0.7 and measured.startswith("busy over")
    finally:
        spinner.kill()
        spinner.wait()


def test_the_pretraining_schedule_follows_the_corpus_and_warns_of_a_warmup_that_takes_the_run():
    assert optimizer_steps_per_epoch(900, 1, 32, 1) == 29 and optimizer_steps_per_epoch(900, 2, 32, 2) == 7
    assert auto_epochs(29) == 52 and auto_epochs(3000) == 1
    assert auto_warmup_epochs(total_steps=30, steps_per_epoch=33) == pytest.approx(0.091, abs=1e-3)
    assert warmup_warning(150, 1500) is None
    assert "1320 of the run's 30 steps" in warmup_warning(1320, 30)


def test_pretraining_defaults_print_a_small_model_an_auto_schedule_and_the_warmup_warning(tmp_path):
    images = shared_path("hippocampus_mri", "images")
    common = ["main_pretrain.py", "--data_path", str(images), "--model", "auto", "--input_size", "16,24,24",
              "--batch_size", "32", "--max_steps", "2", "--vis_every", "0", "--num_workers", "0"]
    quiet = run_cli([*common, "--output_dir", str(tmp_path / "auto")]).stdout
    assert "epochs auto: 167 x 9 steps" in quiet and "warmup auto" in quiet and "WARNING: the warmup" not in quiet
    parameters = float(quiet.split("model mae_vit_tiny_patch16: ")[1].split("M")[0])
    assert parameters < 1.5  # the small hybrid and a decoder of its scale, not a 9M-parameter default decoder
    assert "lr 7.500e-04" in quiet  # the recipes' base lr 6e-3 at batch 32
    loud = run_cli([*common, "--warmup_epochs", "40", "--output_dir", str(tmp_path / "long_warmup")]).stdout
    assert "WARNING: the warmup takes 360 of the run's 2 steps" in loud


def test_pretraining_takes_the_grid_of_the_cache_it_reads(phantom_dir, tmp_path):
    build_cache(str(phantom_dir), tmp_path / "cache", PreprocessConfig(size=(16, 24, 24)), progress=False)
    result = run_cli(["main_pretrain.py", "--data_path", str(tmp_path / "cache"), "--model", "auto", "--batch_size", "4",
                      "--max_steps", "1", "--vis_every", "0", "--num_workers", "0", "--output_dir", str(tmp_path / "run")])
    assert "(CacheDataset, grid (16, 24, 24), fit) -> (16, 24, 24)" in result.stdout


def survey(extents_mm: list[tuple[float, float, float]], spacing: float) -> HeaderSurvey:
    sizes = np.array([[round(e / spacing) for e in extent] for extent in extents_mm], dtype=np.float64)
    return HeaderSurvey(sizes, np.full_like(sizes, spacing), len(sizes))


def test_the_automatic_grid_fits_the_voxel_budget_at_the_finest_spacing_that_does():
    rng = np.random.default_rng(0)
    crops = [(float(d), float(h), float(h)) for d, h in zip(rng.uniform(10, 25, 60), rng.uniform(25, 38, 60))]
    choice = choose_preprocess(survey(crops, 0.5), PreprocessConfig())
    size, spacing = choice.config.size, choice.config.spacing[0]
    assert np.prod(size) <= AUTO_VOXEL_BUDGET and spacing > 0.5
    finer = choose_preprocess(survey(crops, 0.5), PreprocessConfig(), size=None)
    assert finer.config.size == size  # deterministic
    covered = np.percentile(np.array(crops), 90, axis=0)
    assert all(g * spacing >= c - 1e-6 for g, c in zip(size, covered))  # the grid still covers the extents
    slightly_finer = [int(np.ceil(c / (spacing * 0.99) / 8 - 1e-9)) * 8 for c in covered]
    assert np.prod(slightly_finer) > AUTO_VOXEL_BUDGET  # no finer spacing fits
    assert "budget" in choice.reason and "coarser than the median finest" in choice.reason
    small = choose_preprocess(survey([(8.0, 12.0, 12.0 + i) for i in range(10)], 1.0), PreprocessConfig())
    assert small.config.spacing[0] == 1.0  # within budget at the headers' own spacing: kept


@pytest.mark.parametrize("classes,task", [(2, "binary-class"), (5, "multi-class")])
def test_the_one_feature_floor_is_scored_as_the_medmnist_evaluator_scores_the_image_models(classes, task, tmp_path):
    """--floor_col on a binary or a multi-class label (the 5-level LIDC malignancy score): the same AUC the
    image models are reported with, from the medmnist Evaluator's own function."""
    from medmnist.evaluator import getAUC
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    labels = rng.integers(0, classes, 400)
    feature = labels + rng.normal(0.0, 1.0, 400)
    floor = one_feature_auc(feature[:250], labels[:250], feature[250:], labels[250:])
    model = LogisticRegression().fit(feature[:250, None], labels[:250])
    assert floor == pytest.approx(getAUC(labels[250:], model.predict_proba(feature[250:, None]), task))
    assert 0.7 < floor < 1.0
    from volmae.studies.volumes_report import one_column_floor
    paths = [f"case{i}.nii.gz" for i in range(400)]
    table = pd.DataFrame({"path": paths, "score": labels, "size": feature,
                          "split": np.where(np.arange(400) < 250, "train", "test")})
    pd.DataFrame({"path": paths[:250], "fold": np.arange(250) % 5}).to_csv(tmp_path / "folds.csv", index=False)
    reported = one_column_floor(tmp_path, table, "size", "score")
    assert reported["column"] == "size" and reported["test_auc"] == pytest.approx(floor)
    assert 0.7 < reported["val_auc"] < 1.0 and reported["val_is"] == "pooled out-of-fold"


def test_the_paired_difference_finds_a_known_difference_and_resamples_patients():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.array([0, 1] * 40), 2)  # 80 patients, two samples each
    patients = np.repeat(np.arange(80), 2)
    good = [np.column_stack([1 - p, p]) for p in (labels + rng.normal(0, 0.3, (3, 160))).clip(0, 1)]
    weak = [np.column_stack([1 - p, p]) for p in (labels + rng.normal(0, 1.5, (3, 160))).clip(0, 1)]
    result = paired_auc_difference(labels, good, weak, patients, rounds=500)
    from sklearn.metrics import roc_auc_score
    expected = np.mean([roc_auc_score(labels, g[:, 1]) - roc_auc_score(labels, w[:, 1]) for g, w in zip(good, weak)])
    assert result["difference"] == pytest.approx(expected)
    assert 0 < result["ci95"][0] < expected < result["ci95"][1] and result["share_above_zero"] > 0.975
    assert result["patients"] == 80 and result["samples"] == 160 and result["seeds"] == 3
    same = paired_auc_difference(labels, good, good, patients, rounds=200)
    assert same["difference"] == 0 and same["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same number of seeds"):
        paired_auc_difference(labels, good, weak[:2], patients)


def blobs(count: int, rng: np.random.Generator, informative: bool) -> tuple[np.ndarray, np.ndarray]:
    """Noise volumes; where informative, the positives hold a brighter block."""
    labels = rng.integers(0, 2, count)
    images = rng.normal(100, 20, (count, 1, 8, 12, 12))
    if informative:
        images[labels == 1, :, 2:6, 3:8, 3:8] += 25
    return images.clip(0, None).astype(np.uint16), labels[:, None]


def test_the_image_floor_learns_what_the_voxels_hold_and_chooses_without_the_test_labels():
    rng = np.random.default_rng(0)
    train, val, test = (blobs(n, rng, True) for n in (120, 60, 60))
    floor = image_floor(train, val, test, "binary-class", 2)
    assert floor["test_auc"] > 0.9 and floor["val_auc"] > 0.9 and not floor["test_at_prior"]
    assert len(floor["candidates"]) == 15 and floor["chosen"] in [{k: c[k] for k in ("components", "C")}
                                                                 for c in floor["candidates"]]
    shuffled = image_floor(train, val, (test[0], rng.permutation(test[1])), "binary-class", 2)
    assert shuffled["chosen"] == floor["chosen"] and shuffled["candidates"] == floor["candidates"]
    noise = image_floor(*(blobs(n, rng, False) for n in (120, 60, 60)), "binary-class", 2)
    assert abs(noise["test_auc"] - 0.5) < 0.2
    assert image_floor(train, val, test, "regression", 1) is None


def test_the_validation_threshold_balances_sensitivity_and_specificity():
    labels = np.array([0] * 8 + [1] * 2)
    scores = np.array([0.1] * 6 + [0.3, 0.35] + [0.4, 0.45])  # well ranked, never above 0.5
    probabilities = np.column_stack([1 - scores, scores])
    threshold = youden_threshold(labels, probabilities)
    assert 0.35 < threshold <= 0.4
    assert accuracy_at(labels, probabilities, 0.5) == 0.8 and accuracy_at(labels, probabilities, threshold) == 1.0
    assert youden_threshold(np.zeros(4), np.full((4, 2), 0.5)) is None


def resolved(argv: list[str], lr: float | None = None) -> FinetuneRun:
    """The run the flags resolve to on a small 3D grid, its lr replaced (as if --blr had given it) when `lr` is set."""
    images = np.random.default_rng(0).integers(0, 255, size=(6, 1, 8, 8, 8), dtype=np.uint8)
    profile = profile_images(images, np.array([[0], [1]] * 3))
    run = resolve_run(parse_args(argv), SimpleNamespace(input_size=(16, 16, 16)), profile, world_size=1)
    return run if lr is None else replace(run, training=replace(run.training, lr=lr))


def test_the_search_tries_unset_settings_only_and_never_prefers_a_model_at_the_prior():
    volumes = ["--setup", "volumes", "--meta", "labels.csv", "--label", "y"]
    run = resolved(volumes, lr=1e-3)
    assert [c.name for c in candidates(run, "full")] == ["lr1.00e-03_full", "lr4.00e-03_flips", "lr1.00e-03_flips",
                                                         "lr4.00e-03_full"]
    assert len(candidates(replace(run, search_budget=2), "full")) == 2
    given = resolved([*volumes, "--lr", "1e-3", "--augment", "geometric"])
    assert [c.name for c in candidates(given, "geometric")] == ["lr1.00e-03_geometric"]
    reference = resolved(["--setup", "medmnist"], lr=1e-3)  # the published recipes stay as published
    assert len(candidates(reference, "none")) == 1
    record = {"collapsed": False, "val_at_prior": False, "val_score": 0.80, "val_floor_auc": 0.75}
    at_prior = {**record, "val_at_prior": True, "val_score": 0.95}
    below = {**record, "val_score": 0.70}
    assert clears_validation(record) and not clears_validation(at_prior) and not clears_validation(below)
    assert max([at_prior, below, record], key=rank_key) is record
    assert max([at_prior, below], key=rank_key) is below  # below the floor, but it left the prior


def test_own_volumes_stop_early_after_a_third_of_the_epochs_and_published_recipes_keep_theirs():
    volumes = ["--setup", "volumes", "--meta", "labels.csv", "--label", "y"]
    assert parse_args(volumes).patience == 10  # 30 epochs: the floor of 10
    assert parse_args([*volumes, "--epochs", "127"]).patience == 43
    assert parse_args([*volumes, "--patience", "3"]).patience == 3
    assert parse_args(["--setup", "medmnist"]).patience is None
    assert parse_args(["--setup", "medmnist", "--patience", "auto", "--epochs", "60"]).patience == 20
    assert parse_args(["--setup", "slivit", "--meta", "m.csv"]).patience == 5


@pytest.fixture(scope="module")
def lidc_split(tmp_path_factory):
    """60 real LIDC crops of whole patients with a fixed split column, so that the split cannot move."""
    rows, chosen = lidc_patients(16, 20)
    order = {p: i for i, p in enumerate(chosen)}
    rows["split"] = [("train", "val", "test")[order[p] % 3] for p in rows["patient_id"]]
    return rows, tmp_path_factory.mktemp("lidc_split")


def test_shuffled_test_labels_change_no_choice_and_results_carry_the_floors(lidc_split, tmp_path):
    rows, folder = lidc_split
    shuffled = rows.copy()
    test = shuffled["split"] == "test"
    shuffled.loc[test, "malignant"] = np.random.default_rng(0).permutation(shuffled.loc[test, "malignant"].to_numpy())
    assert (shuffled["malignant"] != rows["malignant"]).any()
    results = []
    for name, table in (("true", rows), ("shuffled", shuffled)):
        table.to_csv(folder / f"{name}.csv", index=False)
        run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(folder / f"{name}.csv"), "--label", "malignant",
                 "--group", "patient_id", "--input_size", "16,24,24", "--model", "auto", "--epochs", "3",
                 "--batch_size", "8", "--bootstrap", "0", "--volume_cache", str(folder / "cache"),
                 "--output_dir", str(tmp_path / name)])
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    true, shuffled_result = results
    for key in ("best_epoch", "val_threshold", "augment", "lr", "search"):
        assert true[key] == shuffled_result[key], key
    assert true["floors"]["pca_logreg"]["chosen"] == shuffled_result["floors"]["pca_logreg"]["chosen"]
    assert true["floors"]["pca_logreg"]["candidates"] == shuffled_result["floors"]["pca_logreg"]["candidates"]
    assert true["val"] == shuffled_result["val"]  # validation untouched
    assert true["test"]["auc"] != shuffled_result["test"]["auc"]  # the test labels did change
    floors = true["floors"]
    assert floors["test_majority_share"] == pytest.approx(rows.loc[test, "malignant"].value_counts(normalize=True).max())
    assert 0 <= floors["pca_logreg"]["test_auc"] <= 1 and "test_acc_at_val_threshold" in true
