"""Compare fine-tuning arms run on the same patients and seeds (a screen): which arm validation chooses, and what
each arm scores on test against a baseline arm, paired per seed.

    python benchmarks/compare_runs.py --labels runs/lidc25b/labels_split.csv --group patient_id --seeds 0,1,2 \
        --baseline mae=runs/lidc25b/finetune/mae/frac_0.1/seed_{seed} \
        --arm mae_loss_1=runs/screen/w1/frac_0.1/seed_{seed} --arm scratch=runs/lidc25b/finetune/scratch/frac_0.1/seed_{seed}

Each arm is NAME=FOLDER, FOLDER holding `{seed}`: a `main_finetune.py` output (results.json, val_scores.csv,
test_scores.csv). Prints JSON: per arm and seed the chosen candidate, validation and test AUC and CPU seconds; per arm
the mean and std, and the paired difference from the baseline on validation and on test, each with a 95% CI that
resamples patients, pooled over seeds (util.metrics.paired_auc_difference). `chosen_on_validation` is the arm with the
best mean validation AUC; `validation_separates` says whether its validation CI against the baseline excludes 0.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import statistics
import sys
from pathlib import Path

import pandas as pd

from ..studies.volumes_report import paired_scores_difference
from ..util.cli import run_main, seed_list
from ..util.errors import DataError
from ..util.metrics import MULTI_LABEL


def arm(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name or "{seed}" not in folder:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=FOLDER with {{seed}} in FOLDER")
    return name, folder


def read_seed(folder: Path) -> dict:
    missing = [name for name in ("results.json", "val_scores.csv", "test_scores.csv") if not (folder / name).exists()]
    if missing:
        raise DataError(f"{folder} has no {', '.join(missing)}: not a finished main_finetune.py run")
    result = json.loads((folder / "results.json").read_text())
    return {"result": result, "val": pd.read_csv(folder / "val_scores.csv"), "test": pd.read_csv(folder / "test_scores.csv")}


def task_of(scores: pd.DataFrame) -> str:
    """The medmnist task name from a scores CSV's columns: several label columns are multi-label, two score
    columns binary."""
    if sum(c.startswith("label") for c in scores.columns) > 1:
        return MULTI_LABEL
    return "binary-class" if sum(c.startswith("score_") for c in scores.columns) == 2 else "multi-class"


def summarise(name: str, runs: list[dict], seeds: list[int]) -> dict:
    per_seed = [{"seed": seed, "chosen": run["result"].get("search", {}).get("chosen"),
                 "val_auc": run["result"]["val"]["auc"], "test_auc": run["result"]["test"]["auc"],
                 "at_prior": run["result"]["test"].get("at_prior"), "cpu_seconds": run["result"].get("cpu_seconds")}
                for seed, run in zip(seeds, runs)]
    entry = {"arm": name, "per_seed": per_seed}
    for split in ("val", "test"):
        values = [row[f"{split}_auc"] for row in per_seed]
        entry[f"{split}_auc_mean"] = statistics.mean(values)
        entry[f"{split}_auc_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return entry


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", type=Path, required=True, help="the labels CSV the runs were split from")
    parser.add_argument("--group", default=None, help="its patient column (default: each sample its own patient)")
    parser.add_argument("--seeds", type=seed_list, required=True, help="seeds every arm ran, e.g. 0,1,2")
    parser.add_argument("--baseline", type=arm, required=True, help="NAME=FOLDER the others are compared with")
    parser.add_argument("--arm", type=arm, action="append", required=True, help="NAME=FOLDER, repeatable")
    args = parser.parse_args()

    table = pd.read_csv(args.labels)
    loaded = {name: [read_seed(Path(folder.format(seed=seed))) for seed in args.seeds]
              for name, folder in [args.baseline, *args.arm]}
    base_name = args.baseline[0]
    task = task_of(loaded[base_name][0]["test"])
    arms = []
    for name, runs in loaded.items():
        entry = summarise(name, runs, args.seeds)
        if name != base_name:
            for split in ("val", "test"):
                entry[f"{split}_minus_{base_name}"] = paired_scores_difference(
                    [run[split] for run in runs], [run[split] for run in loaded[base_name]], table, args.group, task,
                    f"the {split} split")
        arms.append(entry)
    chosen = max(arms, key=lambda entry: entry["val_auc_mean"])
    separates = chosen["arm"] == base_name or chosen[f"val_minus_{base_name}"]["ci95"][0] > 0
    print(json.dumps({"seeds": args.seeds, "baseline": base_name, "arms": arms, "chosen_on_validation": chosen["arm"],
                      "validation_separates": separates}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
