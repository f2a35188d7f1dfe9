"""Your own volumes: physical size kept by the automatic preprocessing, patient-grouped splits, label
fractions, and the volumes setup end to end on real LIDC crops (fine-tune, then predict the same scores)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from tests.conftest import REPO, lidc_patients, run_cli, shared_path
from tests.volumes import image_from_xyz
from volmae.datasets.labelled_volumes import fraction_of_patients
from volmae.datasets.task_data import TaskDataError, assign_splits
from volmae.inference.checkpoints import load_checkpoint
from volmae.volumes.preprocess import PreprocessConfig, load_volume
from volmae.volumes.preprocess_choice import choose_preprocess, survey_headers

SPHERE_DIAMETER_MM = 12.0
# (voxels per axis x, y, z; spacing mm; direction): crops of one sphere cut at different pixel sizes, so their
# physical extents differ as those of lesion crops do; the last one stored with its axes permuted
SPHERE_CROPS = [((60, 60, 60), (0.5, 0.5, 0.5), None),
                ((48, 48, 48), (0.9, 0.9, 0.9), None),
                ((40, 40, 20), (0.7, 0.7, 1.25), None),
                ((16, 40, 40), (1.25, 0.7, 0.7), ((0, 1, 0), (0, 0, 1), (1, 0, 0)))]


def write_sphere(path: Path, size, spacing, direction) -> None:
    """A CT sphere (40 HU in -800 HU lung) of SPHERE_DIAMETER_MM at the centre, with partial volume at its edge (a
    voxel's share inside ramps linearly over one voxel across the surface), so its size is known to a fraction of
    a voxel."""
    axes = [(np.arange(n) + 0.5) * s - n * s / 2 for n, s in zip(size, spacing)]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    outside_by = np.sqrt(x ** 2 + y ** 2 + z ** 2) - SPHERE_DIAMETER_MM / 2
    share = np.clip(0.5 - outside_by / np.mean(spacing), 0.0, 1.0)
    image = image_from_xyz(-800.0 + 840.0 * share, spacing=spacing,
                           direction=np.array(direction or np.eye(3), float).T.ravel())
    sitk.WriteImage(image, str(path))


def measured_diameters(volume: np.ndarray, spacing: float) -> tuple[list[float], float]:
    """The sphere's chords through its centre along each axis and its equivalent-sphere diameter, in mm, each the
    integral of the voxels' share of sphere (lung -800 HU and the sphere 40 HU, as windowed to [0, 1])."""
    low, high = (-800 + 1000) / 2000, (40 + 1000) / 2000
    share = np.clip((volume[0] - low) / (high - low), 0.0, 1.0)
    centre = [int(round(c)) for c in np.argwhere(share > 0.5).mean(axis=0)]
    lines = [share[:, centre[1], centre[2]], share[centre[0], :, centre[2]], share[centre[0], centre[1], :]]
    chords = [float(line.sum()) * spacing for line in lines]
    equivalent = (6 * share.sum() * spacing ** 3 / np.pi) ** (1 / 3)
    return chords, float(equivalent)


@pytest.fixture(scope="module")
def sphere_crops(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("spheres")
    paths = []
    for i, (size, spacing, direction) in enumerate(SPHERE_CROPS):
        paths.append(str(folder / f"sphere{i}.nii.gz"))
        write_sphere(Path(paths[-1]), size, spacing, direction)
    return paths


def test_auto_preprocessing_keeps_a_sphere_s_diameter_in_mm_at_every_spacing(sphere_crops):
    choice = choose_preprocess(survey_headers(sphere_crops, progress=False), PreprocessConfig())
    assert choice.config.resample == "spacing" and "physical extents differ" in choice.reason
    spacing = choice.config.spacing[0]
    for path in sphere_crops:
        extents, equivalent = measured_diameters(load_volume(path, choice.config), spacing)
        for extent in extents:  # within one voxel of the true diameter along every axis
            assert abs(extent - SPHERE_DIAMETER_MM) <= spacing, (path, extents, spacing)
        assert abs(equivalent - SPHERE_DIAMETER_MM) <= spacing / 2, (path, equivalent)
    # fitting each crop to one grid instead makes the same sphere look as large as its crop is small
    fitted = [measured_diameters(load_volume(p, PreprocessConfig(size=choice.config.size)), 1.0)[1] for p in sphere_crops]
    assert max(fitted) / min(fitted) > 1.4


def test_auto_preprocessing_fits_volumes_that_cover_the_same_field_of_view(tmp_path):
    paths = []
    for i, (size, spacing) in enumerate([((50, 50, 40), (1.0, 1.0, 1.2)), ((56, 56, 48), (0.9, 0.9, 1.0)),
                                         ((46, 46, 46), (1.1, 1.1, 1.05))]):
        paths.append(str(tmp_path / f"scan{i}.nii.gz"))
        write_sphere(Path(paths[-1]), size, spacing, None)
    choice = choose_preprocess(survey_headers(paths, progress=False), PreprocessConfig(), size=(32, 32, 32))
    assert choice.config.resample == "fit" and choice.config.size == (32, 32, 32)
    assert "similar fields of view" in choice.reason


def test_a_given_grid_takes_the_spacing_that_covers_most_extents(sphere_crops):
    choice = choose_preprocess(survey_headers(sphere_crops, progress=False), PreprocessConfig(), size=(16, 24, 24))
    assert choice.config.size == (16, 24, 24) and choice.config.resample == "spacing"
    extents = survey_headers(sphere_crops, progress=False).extents
    covered = np.percentile(extents, 90, axis=0)
    assert choice.config.spacing[0] == pytest.approx(max(covered / np.array([16, 24, 24])))


def test_patients_never_cross_splits():
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"patient": [f"p{rng.integers(0, 40)}" for _ in range(200)]})
    for seed in range(5):
        splits = assign_splits(table, (0.6, 0.2, 0.2), seed, Path("labels.csv"), "patient")
        assert set(splits) == {"train", "val", "test"}
        assert (table.assign(split=splits).groupby("patient")["split"].nunique() == 1).all()
    with pytest.raises(TaskDataError, match="'case' column"):
        assign_splits(table, (0.6, 0.2, 0.2), 0, Path("labels.csv"), "case")


def test_a_fraction_of_patients_keeps_whole_patients_and_both_classes():
    groups = np.array([f"p{i // 3}" for i in range(300)])  # 100 patients, 3 samples each
    labels = np.array([[int(i // 3 % 4 == 0)] for i in range(300)])  # a quarter of the patients positive
    for seed in range(3):
        keep = fraction_of_patients(groups, labels, 0.1, seed)
        assert len(set(groups[keep])) == 10 and len(keep) == 30
        assert set(labels[keep, 0]) == {0, 1}
        assert set(groups[keep]).isdisjoint(set(groups) - set(groups[keep]))
    assert not np.array_equal(fraction_of_patients(groups, labels, 0.1, 0), fraction_of_patients(groups, labels, 0.1, 1))
    np.testing.assert_array_equal(fraction_of_patients(groups, labels, 1.0, 0), np.arange(300))


@pytest.fixture(scope="module")
def lidc_rows(tmp_path_factory) -> Path:
    """24 real LIDC nodule crops (whole patients, both classes) with two bad rows: a missing file and a text file
    named .nii.gz."""
    crops, _ = lidc_patients(7, 9)
    rows = crops.head(24).copy()
    folder = tmp_path_factory.mktemp("lidc")
    (folder / "not_an_image.nii.gz").write_text("a text file")
    bad = pd.DataFrame([{**rows.iloc[0].to_dict(), "path": str(folder / "missing.nii.gz"), "patient_id": "bad-1"},
                        {**rows.iloc[1].to_dict(), "path": "not_an_image.nii.gz", "patient_id": "bad-2"}])
    table = pd.concat([rows.iloc[:5], bad, rows.iloc[5:]], ignore_index=True)
    table.to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def test_volumes_setup_end_to_end_reports_bad_rows_and_predicts_its_own_test_scores(lidc_rows, tmp_path):
    out = tmp_path / "ft"
    run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(lidc_rows), "--label", "malignant",
             "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25", "--input_size", "16,24,24", "--model", "auto",
             "--epochs", "1", "--batch_size", "8", "--bootstrap", "0", "--output_dir", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["excluded"] == 2
    lines = {item["row"]: item["reason"] for item in result["excluded_rows"]}
    assert set(lines) == {7, 8}  # the CSV lines of the missing file and the text file (header = line 1)
    assert "no such file" in lines[7] and "not a known image format" in lines[8]
    assert sum(result["split_counts"].values()) == 24
    assert result["preprocess_choice"]["resample"] == "spacing"
    checkpoint_meta = pd.read_csv(out / "meta_split.csv")
    assert (checkpoint_meta.groupby("patient_id")["split"].nunique() == 1).all()
    test_scores = pd.read_csv(out / "test_scores.csv")
    cases = test_scores[["path"]].assign(id=[f"case{i}" for i in range(len(test_scores))])
    cases.to_csv(tmp_path / "cases.csv", index=False)
    run_cli(["main_predict.py", "--checkpoint", str(out / "best.pth"), "--input_csv", str(tmp_path / "cases.csv"),
             "--output_csv", str(tmp_path / "predictions.csv")])
    predicted = pd.read_csv(tmp_path / "predictions.csv")
    assert (predicted["status"] == "ok").all()
    np.testing.assert_allclose(predicted["prob_malignant=1"], test_scores["score_malignant=1"], atol=1e-5)


def test_the_volumes_recipe_runs_end_to_end_on_a_tiny_budget(lidc_rows, tmp_path):
    """Corpus plus labels to results.json and report.png: pretraining excludes the test split; at each fraction
    both arms cross-validated on the same folds, each with its final model (the fold ensemble) where results.json
    names it, the floors through the same folds, the two-level interval and the ranking."""
    images = sorted(shared_path("hippocampus_mri", "images").glob("*.nii.gz"))[:6]
    corpus = tmp_path / "mri.txt"
    corpus.write_text("\n".join(map(str, images)))
    out = tmp_path / "study"
    result = subprocess.run(
        ["bash", str(REPO / "launch" / "recipes" / "volumes.sh"), "--corpus", str(corpus), "--labels", str(lidc_rows),
         "--label", "malignant", "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25", "--input_size", "16,24,24",
         "--output_dir", str(out), "--folds", "2", "--label_fractions", "0.5,1", "--baseline",
         "--floor_col", "diameter_mm", "--pretrain_epochs", "2", "--epochs", "1", "--probe_every", "1", "--jobs", "2"],
        env={**os.environ, "VOLMAE_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    split = pd.read_csv(out / "labels_split.csv")
    corpus_sources = set(pd.read_csv(out / "corpus.csv")["path"])
    assert corpus_sources.isdisjoint(split.loc[split["split"] == "test", "path"])
    assert set(split.loc[split["split"] != "test", "path"]) <= corpus_sources
    assert {str(p) for p in images} <= corpus_sources
    assert summary["preprocess"]["resample"] == "spacing" and summary["preprocess"]["size"] == [16, 24, 24]
    assert summary["folds"] == 2 and isinstance(summary["below_floor"], list)
    for fraction in ("0.5", "1"):
        entry = summary["fractions"][fraction]
        for init in ("mae", "scratch"):
            block = entry[init]
            assert {"test_auc_mean", "oof_auc", "per_fold_test_auc", "below_floor", "cpu_seconds"} <= set(block)
            assert len(block["per_fold_test_auc"]) == 2
            final = Path(block["final_model"][0])
            assert final == out / "finetune" / init / f"frac_{fraction}" / "seed_0" / "final_model"
            assert (final / "ensemble.json").is_file() and len(list(final.glob("fold_*.pth"))) == 2
        floor = entry["floor"]
        assert floor["column"] == "diameter_mm" and 0 <= floor["val_auc"] <= 1 and 0 <= floor["test_auc_mean"] <= 1
        paired = entry["paired"]  # both arms on the same test samples; folds and patients resampled
        assert paired["units"] == 2 and len(paired["per_unit_difference"]) == 2
        assert paired["ci95"][0] <= paired["ci95"][1]
        assert 0 <= entry["pca_floor"]["val_auc"] <= 1 and 0 <= entry["pca_floor"]["test_auc_mean"] <= 1
        assert {row["name"] for row in entry["ranking"]} == {"mae (fold ensemble)", "scratch (fold ensemble)",
                                                              "PCA + LR floor", "diameter_mm alone"}
    assert summary["fractions"]["0.5"]["train_patients"] < summary["fractions"]["1"]["train_patients"]
    curve = summary["pretrain"]["per_seed"]["0"]
    assert any("val_loss" in point for point in curve["curve"]) and len(curve["probe"]) >= 2
    assert summary["cpu_seconds"] > summary["cpu_seconds_mae_arm"] > summary["pretrain"]["cpu_seconds_per_seed"] > 0
    assert (out / "report.png").stat().st_size > 10_000
    assert "fraction 1 (" in result.stdout and "fraction 1: MAE - scratch" in result.stdout
    assert "CPU-hours" in result.stdout.strip().splitlines()[-2]
    final = summary["fractions"]["1"]["mae"]["final_model"][0]
    test_scores = pd.read_csv(Path(final).parent / "test_scores.csv")
    test_scores[["path"]].to_csv(tmp_path / "cases.csv", index=False)
    run_cli(["main_predict.py", "--checkpoint", final, "--input_csv", str(tmp_path / "cases.csv"), "--output_csv",
             str(tmp_path / "predicted.csv")])
    predicted = pd.read_csv(tmp_path / "predicted.csv")
    np.testing.assert_allclose(predicted["prob_malignant=1"], test_scores["score_malignant=1"], atol=1e-5)
    # A screen's comparison of arms reads the same folders and pairs them as the study does.
    folder = str(out / "finetune" / "{arm}" / "frac_1" / "seed_0")
    compared = json.loads(run_cli(
        ["benchmarks/compare_runs.py", "--labels", str(out / "labels_split.csv"), "--group", "patient_id",
         "--baseline", "scratch=" + folder.replace("{arm}", "scratch"), "--arm", "mae=" + folder.replace("{arm}", "mae")]
    ).stdout)
    mae = next(arm for arm in compared["arms"] if arm["arm"] == "mae")
    assert mae["test_minus_scratch"]["difference"] == pytest.approx(summary["fractions"]["1"]["paired"]["difference"])
    assert mae["test_auc"] == pytest.approx(summary["fractions"]["1"]["mae"]["test_auc_mean"])
    assert "oof_minus_scratch" in mae and compared["chosen_out_of_fold"] in ("mae", "scratch")
    # The docs' tables come from results.json, with no figure copied by hand.
    tables = run_cli(["benchmarks/study_tables.py", str(out / "results.json")]).stdout
    difference = summary["fractions"]["1"]["paired"]["difference"]
    assert f"{difference:+.3f}" in tables and "CPU-hours in all" in tables
    assert tables.count("| 1 | ") == 2 and "stack with the PCA floor" in tables


def test_build_cache_chooses_the_preprocessing_from_the_headers(sphere_crops, tmp_path):
    listing = tmp_path / "spheres.txt"
    listing.write_text("\n".join(sphere_crops))
    result = run_cli(["main_cache.py", "--input", str(listing), "--output", str(tmp_path / "cache"),
                      "--resample", "auto", "--size", "auto", "--workers", "1"])
    assert "preprocessing: spacing: the physical extents differ" in result.stdout
    meta = json.loads((tmp_path / "cache" / "cache.json").read_text())["preprocess"]
    assert meta["resample"] == "spacing" and len(set(meta["spacing"])) == 1
    assert all(size % 8 == 0 for size in meta["size"])


def write_sphere_table(folder: Path) -> Path:
    """Spheres of three sizes and two brightnesses at differing spacings, as a user's labelled volumes."""
    rows = []
    for i in range(18):
        size_class, bright = i % 3, (i // 3) % 2
        array = np.full((20, 20, 20), -800.0, np.float32)
        grid = np.indices(array.shape) - 9.5
        array[(grid ** 2).sum(axis=0) <= (2 + 2 * size_class) ** 2] = 40.0 + 300.0 * bright
        path = folder / f"case{i}.nii.gz"
        sitk.WriteImage(image_from_xyz(array, spacing=(1.0 + 0.1 * (i % 4),) * 3), str(path))
        rows.append({"path": path.name, "patient": f"p{i // 2}", "size_class": ["small", "medium", "large"][size_class],
                     "large": int(size_class == 2), "bright": bright})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def finetune_on_spheres(labels_csv: Path, out: Path, labels: str, *model: str, ratio: str = "0.5,0.25,0.25") -> dict:
    run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(labels_csv), "--label", labels,
             "--group", "patient", "--split_ratio", ratio, "--input_size", "16", *model,
             "--epochs", "1", "--batch_size", "4", "--bootstrap", "0", "--output_dir", str(out)])
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("labels,task", [("size_class", "multi-class"), ("large,bright", "multi-label, binary-class")])
def test_volumes_setup_takes_multi_class_and_multi_label_columns(tmp_path, labels, task):
    """The task follows the label columns. Each of the 9 patients has two of the three size classes: validation and
    test get 3 patients each, so that they can hold every class (a split that cannot is refused)."""
    result = finetune_on_spheres(write_sphere_table(tmp_path), tmp_path / "ft", labels, "--model", "auto",
                                 ratio="0.34,0.33,0.33")
    checkpoint = load_checkpoint(tmp_path / "ft" / "best.pth")
    assert checkpoint["task"] == task and "auc" in result["test"]
    expected = ["large", "medium", "small"] if task == "multi-class" else ["large", "bright"]
    assert checkpoint["class_names"] == expected


@pytest.mark.parametrize("model", ["resnet18_3d", "medvit3d_tiny", "vit3d_tiny_patch8", "mae encoder"])
def test_volumes_setup_trains_every_kind_of_model(tmp_path, model):
    labels_csv = write_sphere_table(tmp_path)
    if model == "mae encoder":
        run_cli(["main_pretrain.py", "--data_path", str(tmp_path), "--model", "mae_vit_tiny_patch16", "--input_size",
                 "16", "--patch_size", "8", "--decoder_depth", "1", "--max_steps", "1", "--batch_size", "2",
                 "--num_workers", "0", "--vis_every", "0", "--output_dir", str(tmp_path / "mae")])
        flags = ["--model", "vit3d_tiny_patch8", "--finetune", str(tmp_path / "mae" / "encoder.pth")]
    else:
        flags = ["--model", model]
    result = finetune_on_spheres(labels_csv, tmp_path / "ft", "large", *flags)
    assert np.isfinite(result["test"]["auc"])
    assert load_checkpoint(tmp_path / "ft" / "best.pth")["preprocess"]["resample"] == "spacing"
