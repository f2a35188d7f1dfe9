"""Compare cross-validated fine-tuning arms run on the same folds (a screen): which arm the pooled out-of-fold
predictions choose, and what each arm's final model scores on test against a baseline arm.

    python benchmarks/compare_runs.py --labels runs/lidc/labels_split.csv --group patient_id \
        --baseline mae=runs/lidc/finetune/mae/frac_1/seed_0 \
        --arm token=runs/screens/token/frac_1 --arm scratch=runs/lidc/finetune/scratch/frac_1/seed_0

Each arm is NAME=FOLDER: a `main_finetune.py --folds K` output (results.json, val_scores.csv: the pooled out-of-fold
scores, test_scores.csv: the final model's, fold<i>_test_scores.csv: each fold model's). Arms must share the folds
(the same labels, fraction and seed). Prints JSON: per arm the chosen candidate, out-of-fold and test AUC, the test
AUC of each fold model and the CPU seconds; against the baseline, the out-of-fold difference with a 95% CI that
resamples patients, and the test difference with the two-level CI that resamples folds and test patients
(util.metrics.two_level_auc_difference), with the per-fold differences. `chosen_out_of_fold` is the arm with the best
out-of-fold AUC; `out_of_fold_separates` says whether its interval against the baseline excludes 0.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..studies.volumes_report import fold_scores, paired_scores_difference
from ..util.cli import run_main
from ..util.errors import DataError
from ..util.metrics import MULTI_LABEL, two_level_auc_difference


def arm(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER")
    return name, folder


def read_run(folder: Path) -> dict:
    needed = ("results.json", "val_scores.csv", "test_scores.csv", "fold0_test_scores.csv")
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        raise DataError(f"{folder} has no {', '.join(missing)}: not a finished main_finetune.py --folds run")
    return {"result": json.loads((folder / "results.json").read_text()), "val": pd.read_csv(folder / "val_scores.csv"),
            "test": pd.read_csv(folder / "test_scores.csv"), "folds": fold_scores(folder)}


def task_of(scores: pd.DataFrame) -> str:
    """The medmnist task name from a scores CSV's columns: several label columns are multi-label, two score
    columns binary."""
    if sum(c.startswith("label") for c in scores.columns) > 1:
        return MULTI_LABEL
    return "binary-class" if sum(c.startswith("score_") for c in scores.columns) == 2 else "multi-class"


def summarise(name: str, run: dict) -> dict:
    result = run["result"]
    return {"arm": name, "chosen": result["search"]["chosen"], "oof_auc": result["val"]["auc"],
            "test_auc": result["test"]["auc"], "test_per_fold": result["test_per_fold"],
            "below_floor": result["below_floor"], "at_prior": result["test"].get("at_prior"),
            "stack_screen": result.get("stack_screen"), "cpu_seconds": result.get("cpu_seconds")}


def test_difference(arm_run: dict, base_run: dict, table: pd.DataFrame, group: str | None, task: str) -> dict:
    first = base_run["test"]
    if not arm_run["test"]["path"].equals(first["path"]):
        raise DataError("the test samples differ between the arms; cannot pair them")
    patient = dict(zip(table["path"], table[group].astype(str) if group in table.columns else table["path"]))
    labels = first[[c for c in first.columns if c.startswith("label")]].to_numpy()
    return two_level_auc_difference(labels, arm_run["folds"], base_run["folds"],
                                    first["path"].map(patient).fillna(first["path"]).to_numpy(), task)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, required=True, help="the labels CSV the runs were split from")
    parser.add_argument("--group", default=None, help="its patient column (default: each sample its own patient)")
    parser.add_argument("--baseline", type=arm, required=True, help="NAME=FOLDER the others are compared with")
    parser.add_argument("--arm", type=arm, action="append", required=True, help="NAME=FOLDER, repeatable")
    args = parser.parse_args()

    table = pd.read_csv(args.labels)
    loaded = {name: read_run(Path(folder)) for name, folder in [args.baseline, *args.arm]}
    base_name = args.baseline[0]
    base = loaded[base_name]
    task = task_of(base["test"])
    arms = []
    for name, run in loaded.items():
        entry = summarise(name, run)
        if name != base_name:
            entry[f"oof_minus_{base_name}"] = paired_scores_difference([run["val"]], [base["val"]], table, args.group,
                                                                        task, "the pooled out-of-fold predictions")
            entry[f"test_minus_{base_name}"] = test_difference(run, base, table, args.group, task)
        arms.append(entry)
    chosen = max(arms, key=lambda entry: entry["oof_auc"])
    separates = chosen["arm"] == base_name or chosen[f"oof_minus_{base_name}"]["ci95"][0] > 0
    print(json.dumps({"baseline": base_name, "arms": arms, "chosen_out_of_fold": chosen["arm"],
                      "out_of_fold_separates": separates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
