"""Labels tables that leak or lie are refused or cleaned before training, and a finished fine-tuning folder is
never mixed with another run (issue 26), on real LIDC crops."""
import json

import pandas as pd
import pytest

from tests.conftest import lidc_patients, run_cli, shared_path
from tests.conftest import one_line_refusal as refused

COMMON = ["--setup", "volumes", "--label", "malignant", "--group", "patient_id", "--input_size", "16,24,24",
          "--model", "auto", "--epochs", "1", "--batch_size", "8", "--bootstrap", "0", "--search", "none"]


@pytest.fixture(scope="module")
def lidc_table(tmp_path_factory) -> tuple[pd.DataFrame, object]:
    """18 real LIDC crops of whole patients, both classes in every split, with a split column."""
    crops, chosen = lidc_patients(6, 6)
    malignant_first = crops.sort_values(["patient_id", "malignant"], ascending=[True, False], kind="stable")
    rows = malignant_first.groupby("patient_id").head(2).reset_index(drop=True)
    rows["malignant"] = rows["malignant"].astype(str)  # so that a test can blank a label
    order = {p: i for i, p in enumerate(chosen)}
    rows["split"] = [("train", "train", "val", "test")[order[p] % 4] if order[p] % 6 else "train"
                     for p in rows["patient_id"]]
    return rows, tmp_path_factory.mktemp("label_tables")


def finetune(table: pd.DataFrame, folder, name: str, out, *extra: str, check: bool = True, cache: str = ""):
    """The automatic grid follows the rows, so each table gets its own cache unless `cache` names a shared one."""
    csv = folder / f"{name}.csv"
    table.to_csv(csv, index=False)
    return run_cli(["main_finetune.py", *COMMON, "--meta", str(csv), "--volume_cache",
                    str(folder / f"cache_{cache or name}"), "--output_dir", str(out), *extra], check=check)


def test_the_same_file_under_two_patients_is_refused_naming_both(lidc_table, tmp_path):
    rows, folder = lidc_table
    copy = rows.iloc[[0]].assign(patient_id="SOMEONE-ELSE", split="val")
    result = finetune(pd.concat([rows, copy], ignore_index=True), folder, "shared", tmp_path / "out", check=False)
    refused(result, "SOMEONE-ELSE", rows["patient_id"].iloc[0], "one scan must belong to one patient")


def test_empty_and_nan_labels_are_left_out_and_counted_never_a_class(lidc_table, tmp_path):
    rows, folder = lidc_table
    table = rows.copy()
    first, second = table.index[table["split"] == "train"][:2]  # validation and test keep both classes
    table.loc[first, "malignant"], table.loc[second, "malignant"] = "", "NaN"
    finetune(table, folder, "missing", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["excluded"] == 2 and {item["row"] for item in result["excluded_rows"]} == {first + 2, second + 2}
    assert all("no label" in item["reason"] for item in result["excluded_rows"])
    assert len(result["test"]["per_class"]) == 2  # binary: no third class made of the blanks
    meta = pd.read_csv(tmp_path / "out" / "meta_split.csv")
    assert len(meta) == len(table) and list(meta["status"].iloc[[first, second]]) == ["excluded", "excluded"]


def test_a_table_with_one_class_is_refused(lidc_table, tmp_path):
    rows, folder = lidc_table
    refused(finetune(rows.assign(malignant="0"), folder, "one_class", tmp_path / "out", check=False),
            "same label", "two classes")


@pytest.mark.parametrize("first,second", [("train", "val"), ("train", "test"), ("val", "test")])
def test_a_patient_in_two_given_splits_is_refused_for_every_pair(lidc_table, tmp_path, first, second):
    rows, folder = lidc_table
    table = rows.copy()
    counts = table[table["split"] == first].groupby("patient_id").size()
    patient = counts[counts > 1].index[0]  # one of its two crops moves: the patient is then in both
    table.loc[table.index[(table["patient_id"] == patient)][-1], "split"] = second
    refused(finetune(table, folder, f"{first}_{second}", tmp_path / "out", check=False),
            patient, f"both {first} and {second}")


def test_a_finished_folder_is_never_mixed_with_another_run(lidc_table, tmp_path):
    rows, folder = lidc_table
    out = tmp_path / "out"
    finetune(rows, folder, "first", out)
    before = {name: (out / name).read_bytes() for name in ("best.pth", "results.json", "test_scores.csv")}
    line = refused(finetune(rows, folder, "second", out, "--model", "resnet18_3d", check=False, cache="first"),
                   "holds a finished fine-tuning run", "--overwrite")
    assert str(out) in line
    assert {name: (out / name).read_bytes() for name in before} == before
    failed = finetune(rows, folder, "third", out, "--overwrite", "--label", "no_such_column", check=False,
                      cache="first")
    assert failed.returncode == 1  # set aside, then failed: the finished run is put back, byte for byte
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".replaced-run-*"))
    finetune(rows, folder, "fourth", out, "--model", "resnet18_3d", "--overwrite", cache="first")
    assert json.loads((out / "results.json").read_text())["model"] == "resnet18_3d"
    assert not list(out.glob(".replaced-run-*")) and not list(out.glob("stopped-*"))


def test_a_cache_of_other_settings_names_the_flag_that_picks_another(lidc_table, tmp_path):
    rows, folder = lidc_table
    finetune(rows, folder, "grid_a", tmp_path / "a", "--epochs", "1")
    result = finetune(rows, folder, "grid_b", tmp_path / "b", "--input_size", "16,16,16", check=False, cache="grid_a")
    refused(result, "holds a cache built with other settings", "give another --volume_cache")


def labels_only(tmp_path, table: pd.DataFrame, **options):
    """read_labels on a table (no volume is read): its split, or the refusal."""
    from volmae.datasets.labelled_volumes import VolumeTaskOptions, read_labels

    csv = tmp_path / "labels.csv"
    table.to_csv(csv, index=False)
    return read_labels(csv, VolumeTaskOptions(labels=["label"], group="patient", **options))


def test_labels_that_differ_only_by_case_are_refused_and_spaces_never_make_a_class(tmp_path):
    """L1: `Yes`, `yes ` and `YES` made a binary task a 5-class one."""
    from volmae.datasets.task_data import TaskDataError

    table = pd.DataFrame({"path": [f"v{i}.nii.gz" for i in range(8)], "patient": [f"p{i}" for i in range(8)],
                          "label": ["Yes", "yes ", "YES", "No", " No", "no", "No", "Yes"]})
    with pytest.raises(TaskDataError, match=r"differ only by case \('No', 'no'; 'YES', 'Yes', 'yes'\)") as err:
        labels_only(tmp_path, table)
    assert "rows 2, 3, 4, 5, 6, 7 and 2 more" in str(err.value) and "--label_case sensitive" in str(err.value)
    kept = labels_only(tmp_path, table, label_case="sensitive")
    assert sorted(kept["label"].unique()) == ["No", "YES", "Yes", "no", "yes"]  # stripped: `yes ` is `yes`


def test_a_missing_patient_is_refused_naming_its_rows(tmp_path):
    """L3: the literal NaN grouped those rows as one patient."""
    from volmae.datasets.task_data import TaskDataError

    table = pd.DataFrame({"path": [f"v{i}.nii.gz" for i in range(6)], "label": ["0", "1"] * 3,
                          "patient": ["a", "NaN", "b", "", "c", "nan"]})
    with pytest.raises(TaskDataError, match=r"rows 3, 5, 7: no patient in 'patient'"):
        labels_only(tmp_path, table)


def test_the_patient_split_and_folds_are_stratified_by_label_and_disjoint_by_patient():
    """L7, L8 (the split ignored the label) and the folds of cross-validation: on the real LIDC table, every part
    holds the malignant share of the whole within a few points, and no patient is in two parts."""
    from volmae.datasets.task_data import split_groups

    table = pd.read_csv(shared_path("lidc_nodules", "labels.csv"))
    groups, labels = table["patient_id"].astype(str).to_numpy(), table["malignant"].astype(str).to_numpy()
    overall = (labels == "1").mean()
    for shares in ((0.7, 0.15, 0.15), (1, 1, 1, 1, 1)):
        parts = split_groups(groups, labels, shares, seed=3)
        for part in range(len(shares)):
            chosen = parts == part
            assert abs((labels[chosen] == "1").mean() - overall) < 0.04, (shares, part)
            assert abs(chosen.sum() / len(labels) - shares[part] / sum(shares)) < 0.04
        assert table.assign(part=parts).groupby("patient_id")["part"].nunique().max() == 1


def test_duplicates_are_dropped_and_counted_and_a_split_without_a_class_is_refused(lidc_table, tmp_path, capsys):
    """L6: duplicate rows trained twice and counted twice in the scores; L7, L8: a validation or test split with one
    class gave AUC NaN, a choice made on NaN and a message blaming the model."""
    from volmae.datasets.labelled_volumes import VolumeTaskOptions, volume_task
    from volmae.datasets.task_data import TaskDataError

    rows, folder = lidc_table
    doubled = pd.concat([rows, rows.iloc[[0, 0, 5]]], ignore_index=True)
    doubled.to_csv(tmp_path / "doubled.csv", index=False)
    options = VolumeTaskOptions(labels=["malignant"], group="patient_id", input_size=(16, 24, 24))
    data = volume_task(tmp_path / "doubled.csv", options, folder / "cache_duplicates", tmp_path / "out")
    assert data.report["duplicates_dropped"] == 3 and sum(len(s[0]) for s in data.splits.values()) == len(rows)
    assert {item["row"] for item in data.report["excluded_rows"]} == {len(rows) + 2, len(rows) + 3, len(rows) + 4}
    assert all("duplicate of line" in item["reason"] for item in data.report["excluded_rows"])
    assert "duplicate of line 2" in capsys.readouterr().out
    conflicting = pd.concat([rows, rows.iloc[[1]].assign(malignant=str(1 - int(rows["malignant"].iloc[1])))],
                            ignore_index=True)
    conflicting.to_csv(tmp_path / "conflicting.csv", index=False)
    with pytest.raises(TaskDataError, match=f"rows 3, {len(rows) + 2}: the file .* is listed with different labels"):
        volume_task(tmp_path / "conflicting.csv", options, folder / "cache_duplicates", tmp_path / "out3")
    one_positive = rows.assign(malignant="0")
    one_positive.loc[0, "malignant"] = "1"
    one_positive.to_csv(tmp_path / "one_positive.csv", index=False)
    with pytest.raises(TaskDataError, match=r"split would hold no row of class malignant=1") as err:
        volume_task(tmp_path / "one_positive.csv", options, folder / "cache_duplicates", tmp_path / "out2")
    assert "malignant=1: 1" in str(err.value) and "--split_ratio" in str(err.value)


def test_results_json_is_strict_json_when_a_score_is_undefined(tmp_path):
    """L8: results.json held bare NaN, which strict JSON readers reject."""
    from volmae.finetuning.reporting import write_results

    write_results(tmp_path, {"test": {"auc": float("nan"), "acc": 0.5, "ci": [float("inf"), 1.0]}})

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    parsed = json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse)
    assert parsed["test"] == {"auc": None, "acc": 0.5, "ci": [None, 1.0]}
