"""The volumes study's result: per label fraction, both arms over seeds, their paired difference, and the floors
beside them (the majority share, one column such as a diameter, PCA + logistic regression), in results.json,
report.png and a few printed lines."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..datasets.labelled_volumes import fraction_of_patients
from ..util.errors import DataError, UsageError
from ..util.metrics import one_feature_auc, paired_auc_difference
from ..util.plotting import label_efficiency_figure
from .steps import loss_curve, probe_curve, seed_summary


def run_folder(out: Path, init: str, fraction: float, seed: int) -> Path:
    return out / "finetune" / init / f"frac_{fraction:g}" / f"seed_{seed}"


def floor(table: pd.DataFrame, column: str, label: str, group: str, fraction: float, seeds: list[int]) -> dict:
    """Test AUC of a logistic regression on one numeric column, fitted on the same training patients the image
    models get for each seed."""
    values = pd.to_numeric(table[column], errors="coerce")
    if values.isna().any():
        raise UsageError(f"--floor_col {column}: row {int(np.flatnonzero(values.isna())[0]) + 2} is not a number")
    target = pd.to_numeric(table[label]).to_numpy()
    train, test = (table["split"] == "train").to_numpy(), (table["split"] == "test").to_numpy()
    groups = table[group].astype(str).to_numpy() if group in table.columns else table["path"].to_numpy()
    aucs = []
    for seed in seeds:
        keep = fraction_of_patients(groups[train], target[train], fraction, seed)
        aucs.append(one_feature_auc(values.to_numpy()[train][keep], target[train][keep],
                                    values.to_numpy()[test], target[test]))
    return {"column": column, "test_auc_mean": float(np.mean(aucs)), "test_auc_std": float(np.std(aucs)),
            "per_seed": aucs}


def paired_scores_difference(arm: list[pd.DataFrame], baseline: list[pd.DataFrame], table: pd.DataFrame,
                             group: str | None, task: str, what: str) -> dict:
    """AUC(arm) - AUC(baseline) from main_finetune.py's score CSVs (seed i's of each arm), paired: the same samples
    in each, their patients read from the labels table; the 95% CI resamples patients, pooled over seeds
    (util.metrics.paired_auc_difference)."""
    first = baseline[0]
    for frame in arm + baseline:
        if not frame["path"].equals(first["path"]):
            raise DataError(f"the samples of {what} differ between runs; cannot pair them")
    patient = dict(zip(table["path"], table[group].astype(str) if group in table.columns else table["path"]))
    labels = first[[c for c in first.columns if c.startswith("label")]].to_numpy()
    columns = [c for c in first.columns if c.startswith("score_")]
    return paired_auc_difference(labels, [f[columns].to_numpy() for f in arm], [f[columns].to_numpy() for f in baseline],
                                 first["path"].map(patient).fillna(first["path"]).to_numpy(), task)


def paired_difference(out: Path, fraction: float, seeds: list[int], table: pd.DataFrame, group: str, task: str) -> dict:
    """MAE - scratch test AUC, paired: each seed's two arms trained on the same patients and scored on the same test
    samples."""
    arms = {init: [pd.read_csv(run_folder(out, init, fraction, s) / "test_scores.csv") for s in seeds]
            for init in ("mae", "scratch")}
    return paired_scores_difference(arms["mae"], arms["scratch"], table, group, task,
                                    f"the test split at fraction {fraction:g}")


def pca_floor(runs: list[dict]) -> dict | None:
    """The PCA + logistic regression floor each fine-tuning run fitted on its own training patients, over seeds."""
    found = [r["floors"]["pca_logreg"] for r in runs if "pca_logreg" in r.get("floors", {})]
    if not found or "test_auc" not in found[0]:
        return None
    return {"test_auc_mean": float(np.mean([f["test_auc"] for f in found])),
            "test_auc_std": float(np.std([f["test_auc"] for f in found])),
            "val_auc_mean": float(np.mean([f["val_auc"] for f in found])),
            "per_seed": [{"test_auc": f["test_auc"], "val_auc": f["val_auc"], "chosen": f["chosen"]} for f in found]}


def fraction_entry(out: Path, fraction: float, runs: dict[str, list[dict]], epochs: int, seeds: list[int],
                   table: pd.DataFrame, args, task: str, label: str) -> dict:
    """One label fraction: each arm over seeds, the paired MAE - scratch difference and the floors."""
    entry = {init: seed_summary(found) for init, found in runs.items()}
    entry["epochs"] = epochs
    entry["train_patients"] = runs["mae"][0].get("train_patients_used", runs["mae"][0]["split_patients"]["train"])
    if "scratch" in entry:
        entry["mae_minus_scratch_test_auc"] = entry["mae"]["test_auc_mean"] - entry["scratch"]["test_auc_mean"]
        entry["paired"] = paired_difference(out, fraction, seeds, table, args.group, task)
    entry["pca_floor"] = pca_floor(runs["mae"])
    if args.floor_col:
        entry["floor"] = floor(table, args.floor_col, label, args.group, fraction, seeds)
    return entry


def study_result(args, out: Path, table: pd.DataFrame, task: str, labels: list[str], seeds: list[int],
                 fractions: list[float], study: dict) -> dict:
    """results.json: the study's design (split, corpus, preprocessing, flags), its costs and every fraction's entry.
    `study` holds what the steps gave: corpus_counts, choice, pretrain (records per seed), pretrain_flags,
    pretrain_epochs, cache, finetune_flags, per_fraction and first (one fine-tuning run's results)."""
    pretrain = study["pretrain"]
    pretrain_cpu = float(np.mean([pretrain[s]["cpu_seconds"] for s in seeds]))
    first, per_fraction = study["first"], study["per_fraction"]
    test = table[table["split"] == "test"]
    return {
        "labels": str(Path(args.labels).resolve()), "label": args.label, "group": args.group, "task": task,
        "seeds": seeds, "label_fractions": fractions, "corpus": study["corpus_counts"],
        "split": {**first["split_counts"], "patients": first["split_patients"],
                  "test_majority_share": float(test[labels[0]].astype(float).value_counts(normalize=True).max())
                  if task == "binary-class" else None, "excluded_rows": first["excluded_rows"]},
        "preprocess": study["choice"].to_dict(),
        "pretrain": {"flags": study["pretrain_flags"], "epochs": study["pretrain_epochs"], "cache": study["cache"],
                     "cpu_seconds_per_seed": round(pretrain_cpu, 1),
                     "per_seed": {str(s): {**pretrain[s], "curve": loss_curve(out / "pretrain" / f"seed_{s}" / "log.txt"),
                                           "probe": probe_curve(out / "pretrain" / f"seed_{s}" / "log.txt")}
                                  for s in seeds}},
        "finetune": {"flags": study["finetune_flags"], "epochs_at_fraction_1": args.epochs},
        "fractions": per_fraction,
        "cpu_seconds_one_seed": round(pretrain_cpu + sum(entry["mae"]["cpu_seconds_one_seed"]
                                                         for entry in per_fraction.values()), 1),
        "model": first["model"], "model_config": first["model_config"], "augment": first["augment"],
        "data_profile": first["data_profile"],
    }


def write_report(out: Path, result: dict) -> None:
    (out / "results.json").write_text(json.dumps(result, indent=2))
    label_efficiency_figure(result).savefig(out / "report.png", dpi=120)


def summary_lines(result: dict, inits: list[str], floor_col: str | None) -> list[str]:
    """Per fraction: each arm's test AUC over seeds beside its floors, the paired difference, and any model that
    collapsed or sat at the class prior; then the cost of one seed."""
    lines = []
    for key, entry in result["fractions"].items():
        line = "  ".join(f"{init} {entry[init]['test_auc_mean']:.4f} +- {entry[init]['test_auc_std']:.4f}"
                         for init in inits)
        if "floor" in entry:
            line += f"  floor ({floor_col}) {entry['floor']['test_auc_mean']:.4f}"
        if entry["pca_floor"]:
            line += f"  PCA + LR floor {entry['pca_floor']['test_auc_mean']:.4f}"
        lines.append(f"fraction {key}: test AUC {line}")
        if "paired" in entry:
            paired = entry["paired"]
            lines.append(f"fraction {key}: MAE - scratch {paired['difference']:+.4f}, 95% CI [{paired['ci95'][0]:+.4f}, "
                         f"{paired['ci95'][1]:+.4f}] (test patients resampled, {paired['seeds']} seeds paired)")
        flagged = sorted({(init, r["seed"]) for init in inits for r in entry[init]["per_seed"]
                          if r["collapsed"] or r["test_at_prior"]})
        if flagged:
            lines.append(f"fraction {key}: WARNING: collapsed or at the class prior: "
                         f"{', '.join(f'{init} seed {seed}' for init, seed in flagged)}")
    return lines
