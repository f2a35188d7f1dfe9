"""Labels tables that leak or lie are refused or cleaned before training, and a finished fine-tuning folder is
never mixed with another run (issue 26), on real LIDC crops."""
import json

import pandas as pd
import pytest

from tests.conftest import lidc_patients, run_cli

COMMON = ["--setup", "volumes", "--label", "malignant", "--group", "patient_id", "--input_size", "16,24,24",
          "--model", "auto", "--epochs", "1", "--batch_size", "8", "--bootstrap", "0", "--search", "none"]


@pytest.fixture(scope="module")
def lidc_table(tmp_path_factory) -> tuple[pd.DataFrame, object]:
    """18 real LIDC crops of whole patients, both classes in every split, with a split column."""
    crops, chosen = lidc_patients(6, 6)
    rows = crops.groupby("patient_id").head(2).reset_index(drop=True)
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


def refused(result, *words: str) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(word in line for word in words), line
    return line


def test_the_same_file_under_two_patients_is_refused_naming_both(lidc_table, tmp_path):
    rows, folder = lidc_table
    copy = rows.iloc[[0]].assign(patient_id="SOMEONE-ELSE", split="val")
    result = finetune(pd.concat([rows, copy], ignore_index=True), folder, "shared", tmp_path / "out", check=False)
    refused(result, "SOMEONE-ELSE", rows["patient_id"].iloc[0], "one scan must belong to one patient")


def test_empty_and_nan_labels_are_left_out_and_counted_never_a_class(lidc_table, tmp_path):
    rows, folder = lidc_table
    table = rows.copy()
    table.loc[3, "malignant"], table.loc[4, "malignant"] = "", "NaN"
    finetune(table, folder, "missing", tmp_path / "out")
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["excluded"] == 2 and {item["row"] for item in result["excluded_rows"]} == {5, 6}
    assert all("no label" in item["reason"] for item in result["excluded_rows"])
    assert len(result["test"]["per_class"]) == 2  # binary: no third class made of the blanks
    meta = pd.read_csv(tmp_path / "out" / "meta_split.csv")
    assert len(meta) == len(table) and list(meta["status"].iloc[3:5]) == ["excluded", "excluded"]


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
    assert failed.returncode == 1  # replaced, then stopped: nothing in the folder claims to be finished
    assert not (out / "results.json").exists() and not (out / "best.pth").exists()
    finetune(rows, folder, "fourth", out, "--model", "resnet18_3d", cache="first")
    assert json.loads((out / "results.json").read_text())["model"] == "resnet18_3d"


def test_a_cache_of_other_settings_names_the_flag_that_picks_another(lidc_table, tmp_path):
    rows, folder = lidc_table
    finetune(rows, folder, "grid_a", tmp_path / "a", "--epochs", "1")
    result = finetune(rows, folder, "grid_b", tmp_path / "b", "--input_size", "16,16,16", check=False, cache="grid_a")
    refused(result, "holds a cache built with other settings", "give another --volume_cache")
