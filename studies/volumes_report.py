"""The volumes study's result: per label fraction, both arms over seeds, their paired difference, and the floors
beside them (the majority share, one column such as a diameter, PCA + logistic regression), in results.json,
report.png and a few printed lines."""
from pathlib import Path

import numpy as np
import pandas as pd

from ..util.errors import DataError, UsageError
from ..util.metrics import (
    one_feature_auc,
    one_feature_scores,
    one_vs_rest_auc,
    paired_auc_difference,
    two_level_auc_difference,
)
from ..util.plotting import label_efficiency_figure
from ..util.strict_json import write_json
from .steps import loss_curve, probe_curve


def run_folder(out: Path, init: str, fraction: float, seed: int) -> Path:
    return out / "finetune" / init / f"frac_{fraction:g}" / f"seed_{seed}"


def one_column_floor(run: Path, table: pd.DataFrame, column: str, label: str) -> dict:
    """A logistic regression on one numeric column (a measured diameter), through the same folds as the image
    models of `run` (its folds.csv): its pooled out-of-fold AUC, and its test AUC fitted on every training patient."""
    values = pd.to_numeric(table[column], errors="coerce")
    if values.isna().any():
        raise UsageError(f"--floor_col {column}: row {int(np.flatnonzero(values.isna())[0]) + 2} is not a number")
    value_of, target_of = dict(zip(table["path"], values)), dict(zip(table["path"], pd.to_numeric(table[label])))
    folds = pd.read_csv(run / "folds.csv", keep_default_na=False)
    x, y = folds["path"].map(value_of).to_numpy(), folds["path"].map(target_of).to_numpy()
    test = table[table["split"] == "test"]
    classes = np.unique(y)
    oof = np.zeros((len(folds), len(classes)))
    for fold in sorted(folds["fold"].unique()):
        held = (folds["fold"] == fold).to_numpy()
        oof[held] = one_feature_scores(x[~held], y[~held], x[held], classes)
    return {"column": column, "val_auc": one_vs_rest_auc(y, oof, classes), "val_is": "pooled out-of-fold",
            "test_auc": one_feature_auc(x, y, test[column].astype(float).to_numpy(),
                                        pd.to_numeric(test[label]).to_numpy())}


def fold_scores(run: Path) -> list[np.ndarray]:
    """Each fold model's test scores, in the order of the run's test_scores.csv."""
    files = sorted(run.glob("fold*_test_scores.csv"), key=lambda p: int(p.name[4:].split("_")[0]))
    return [pd.read_csv(f)[[c for c in pd.read_csv(f).columns if c.startswith("score_")]].to_numpy() for f in files]


def paired_difference(out: Path, fraction: float, seeds: list[int], table: pd.DataFrame, group: str, task: str) -> dict:
    """MAE - scratch test AUC of the final models (each arm's fold ensemble) with the two-level interval: fold i of
    each arm trained on the same patients, so the folds (and any pretraining seeds) are resampled in pairs, and
    the test patients within them (util.metrics.two_level_auc_difference)."""
    arms, first = {"mae": [], "scratch": []}, None
    for seed in seeds:
        for init in arms:
            run = run_folder(out, init, fraction, seed)
            scores = pd.read_csv(run / "test_scores.csv")
            if first is None:
                first = scores
            elif not scores["path"].equals(first["path"]):
                raise DataError(f"the test samples of {run} differ from the other runs'; cannot pair them")
            arms[init] += fold_scores(run)
    patient = dict(zip(table["path"], table[group].astype(str) if group in table.columns else table["path"]))
    labels = first[[c for c in first.columns if c.startswith("label")]].to_numpy()
    return two_level_auc_difference(labels, arms["mae"], arms["scratch"],
                                    first["path"].map(patient).fillna(first["path"]).to_numpy(), task)


def arm_summary(runs: list[dict], folders: list[Path]) -> dict:
    """One arm at one fraction: its final model (the fold ensemble) on test, its pooled out-of-fold score, the
    folds' own test AUCs, and whether it reached the PCA floor; means over pretraining seeds where there are
    several."""
    per_fold = [auc for r in runs for auc in r["test_per_fold"]]
    return {"test_auc_mean": float(np.mean([r["test"]["auc"] for r in runs])), "test_auc_std": float(np.std(per_fold)),
            "test_auc_std_is": "over the fold models' own test AUCs",
            "test_acc_mean": float(np.mean([r["test"]["acc"] for r in runs])),
            "test_acc_at_val_threshold": [r.get("test_acc_at_val_threshold") for r in runs],
            "oof_auc": float(np.mean([r["val"]["auc"] for r in runs])), "per_fold_test_auc": per_fold,
            "below_floor": any(r["below_floor"] for r in runs), "chosen": [r["search"]["chosen"] for r in runs],
            "candidates": [{c["name"]: c["val_score"] for c in r["search"]["candidates"]} for r in runs],
            "final_model": [str(folder / r["final_model"]) for r, folder in zip(runs, folders)],
            "collapsed": any(r["collapsed"] for r in runs), "test_at_prior": any(r["test"]["at_prior"] for r in runs),
            "stack_screen": [r.get("stack_screen") for r in runs],
            "cpu_seconds": round(float(sum(r["cpu_seconds"] for r in runs)), 1)}


def ranking(entry: dict) -> list[dict]:
    """Every arm and floor at one fraction, best pooled out-of-fold AUC first (the choice's measure), with test."""
    rows = [{"name": f"{init} (fold ensemble)", "oof_auc": entry[init]["oof_auc"], "test_auc": entry[init]["test_auc_mean"]}
            for init in ("mae", "scratch") if init in entry]
    if entry.get("pca_floor"):
        rows.append({"name": "PCA + LR floor", "oof_auc": entry["pca_floor"]["val_auc"],
                     "test_auc": entry["pca_floor"]["test_auc_mean"]})
    if entry.get("floor"):
        rows.append({"name": f"{entry['floor']['column']} alone", "oof_auc": entry["floor"]["val_auc"],
                     "test_auc": entry["floor"]["test_auc_mean"]})
    return sorted(rows, key=lambda row: -row["oof_auc"] if np.isfinite(row["oof_auc"]) else np.inf)


def fraction_entry(out: Path, fraction: float, runs: dict[str, list[dict]], epochs: int, seeds: list[int],
                   table: pd.DataFrame, args, task: str, label: str) -> dict:
    """One label fraction: each arm's final model, the paired MAE - scratch difference and the floors, ranked."""
    entry = {init: arm_summary(found, [run_folder(out, init, fraction, s) for s in seeds]) for init, found in runs.items()}
    entry["epochs"] = epochs
    entry["train_patients"] = runs["mae"][0].get("train_patients_used", runs["mae"][0]["fold_patients"] and
                                                 sum(runs["mae"][0]["fold_patients"]))
    entry["folds"] = runs["mae"][0]["folds"]
    if "scratch" in entry:
        entry["mae_minus_scratch_test_auc"] = entry["mae"]["test_auc_mean"] - entry["scratch"]["test_auc_mean"]
        entry["paired"] = paired_difference(out, fraction, seeds, table, args.group, task)
    pca = runs["mae"][0]["floors"].get("pca_logreg")
    entry["pca_floor"] = None if pca is None else {"val_auc": pca["val_auc"], "test_auc_mean": pca["test_auc"],
                                                   "test_auc_std": 0.0, "val_is": "pooled out-of-fold"}
    if args.floor_col:
        found = one_column_floor(run_folder(out, "mae", fraction, seeds[0]), table, args.floor_col, label)
        entry["floor"] = {**found, "test_auc_mean": found["test_auc"], "test_auc_std": 0.0}
    entry["ranking"] = ranking(entry)
    return entry


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


def study_result(args, out: Path, table: pd.DataFrame, task: str, labels: list[str], seeds: list[int],
                 fractions: list[float], study: dict) -> dict:
    """results.json: the study's design (split, folds, corpus, preprocessing, flags), its costs, every fraction's
    entry and `below_floor`: the final models that did not reach the PCA floor on the out-of-fold predictions.
    `study` holds what the steps gave: corpus_counts, choice, pretrain (records per seed), pretrain_flags,
    pretrain_epochs, cache, finetune_flags, per_fraction, first (one fine-tuning run's results) and cpu_seconds
    (every step's)."""
    pretrain = study["pretrain"]
    pretrain_cpu = float(np.mean([pretrain[s]["cpu_seconds"] for s in seeds]))
    first, per_fraction = study["first"], study["per_fraction"]
    test = table[table["split"] == "test"]
    below = [f"{init} at {key}" for key, entry in per_fraction.items() for init in ("mae", "scratch")
             if init in entry and entry[init]["below_floor"]]
    return {
        "labels": str(Path(args.labels).resolve()), "label": ",".join(args.label), "group": args.group, "task": task,
        "seeds": seeds, "folds": args.folds, "label_fractions": fractions, "corpus": study["corpus_counts"],
        "split": {**first["split_counts"], "patients": first["split_patients"],
                  "test_majority_share": float(test[labels[0]].astype(float).value_counts(normalize=True).max())
                  if task == "binary-class" else None, "excluded_rows": first["excluded_rows"],
                  "design": f"test patients held out once; the others in {args.folds} folds by patient, stratified "
                            f"by label; every choice on their pooled out-of-fold predictions"},
        "preprocess": study["choice"].to_dict(),
        "pretrain": {"flags": study["pretrain_flags"], "epochs": study["pretrain_epochs"], "cache": study["cache"],
                     "cpu_seconds_per_seed": round(pretrain_cpu, 1),
                     "per_seed": {str(s): {**pretrain[s], "curve": loss_curve(out / "pretrain" / f"seed_{s}" / "log.txt"),
                                           "probe": probe_curve(out / "pretrain" / f"seed_{s}" / "log.txt")}
                                  for s in seeds}},
        "finetune": {"flags": study["finetune_flags"], "epochs_at_fraction_1": args.epochs},
        "fractions": per_fraction,
        "below_floor": below,
        "cpu_seconds_mae_arm": round(pretrain_cpu * len(seeds) + sum(entry["mae"]["cpu_seconds"]
                                                                     for entry in per_fraction.values()), 1),
        "cpu_seconds": round(study["cpu_seconds"], 1),
        "model": first["model"], "model_config": first["model_config"], "augment": first["augment"],
        "data_profile": first["data_profile"],
    }


def write_report(out: Path, result: dict) -> None:
    write_json(out / "results.json", result)
    label_efficiency_figure(result).savefig(out / "report.png", dpi=120)


def summary_lines(result: dict, inits: list[str], floor_col: str | None) -> list[str]:
    """First whether every final model reached the PCA floor on the out-of-fold predictions; then per fraction each
    arm's final model on test beside the floors, ranked on the out-of-fold AUC, and the paired difference with its
    two-level interval; then the study's cost."""
    below = result["below_floor"]
    lines = [f"BELOW THE FLOOR on the out-of-fold predictions: {', '.join(below)}; a lab would prefer the PCA + "
             f"logistic regression floor there" if below else
             "every final model reached the PCA + logistic regression floor on the out-of-fold predictions"]
    for key, entry in result["fractions"].items():
        ranked = "  >  ".join(f"{row['name']} {row['oof_auc']:.4f} (test {row['test_auc']:.4f})" for row in entry["ranking"])
        lines.append(f"fraction {key} ({entry['train_patients']} training patients, {entry['folds']} folds), out-of-fold "
                     f"AUC (test AUC): {ranked}")
        if "paired" in entry:
            paired = entry["paired"]
            per_fold = ", ".join(f"{d:+.3f}" for d in paired["per_unit_difference"])
            lines.append(f"fraction {key}: MAE - scratch {paired['difference']:+.4f}, two-level 95% CI "
                         f"[{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}] (folds and test patients resampled); "
                         f"per fold {per_fold}")
        flagged = [init for init in inits if entry[init]["collapsed"] or entry[init]["test_at_prior"]]
        if flagged:
            lines.append(f"fraction {key}: WARNING: collapsed or at the class prior: {', '.join(flagged)}")
    lines.append(f"the study cost {result['cpu_seconds'] / 3600:.2f} CPU-hours (the MAE arm "
                 f"{result['cpu_seconds_mae_arm'] / 3600:.2f}, pretraining included)")
    return lines
