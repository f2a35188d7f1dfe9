"""One seed of a fine-tuning run: its training patients, its candidates (finetuning.candidate_runs), the chosen
model's best epoch evaluated on val and test once, and that seed's outputs."""
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..datasets.data_profile import DataProfile
from ..datasets.labelled_volumes import fraction_of_patients
from ..datasets.task_data import TaskData
from ..util.atomic import make_output_folder, remove_stale_temporaries
from ..util.dist import DistInfo
from ..util.errors import DivergedError, UsageError
from ..util.metrics import REGRESSION
from ..util.run_log import cpu_seconds
from .candidate_runs import train_chosen
from .finetune_config import FinetuneRun
from .reporting import (
    floor_line,
    floors,
    headline,
    threshold_report,
    verdict,
    write_explanations,
    write_results,
    write_split_outputs,
)
from .setups import SETUPS


def training_subset(run: FinetuneRun, data: TaskData, say: Callable) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """The training split, or with --train_fraction the samples of that fraction of its patients (each sample its
    own patient where the data name none), drawn for this seed."""
    images, labels = data.splits["train"]
    groups = data.groups["train"] if data.groups is not None else np.arange(len(images)).astype(str)
    if run.train_fraction is None:
        return (images, labels), {}
    seed = run.training.seed
    try:
        keep = fraction_of_patients(groups, labels, run.train_fraction, seed)
    except ValueError as err:
        raise UsageError(f"--train_fraction: {err}") from None
    used = {"train_fraction": run.train_fraction, "train_samples_used": int(len(keep)),
            "train_patients_used": int(len(set(groups[keep])))}
    say(f"seed {seed}: training on {len(keep)} samples of {used['train_patients_used']} patients "
        f"({run.train_fraction:g} of {len(set(groups))})")
    return (images[keep], labels[keep]), used


def run_seed(run: FinetuneRun, data: TaskData, dist_info: DistInfo, output_dir: Path, profile: DataProfile,
             report: dict, flags: dict) -> dict:
    """Train one seed (`run.training.seed`), keep the chosen candidate's best epoch, evaluate it on val and test
    once and write its outputs; the seed's results.json record."""
    start, cpu_start, seed = time.perf_counter(), cpu_seconds(), run.training.seed
    make_output_folder(output_dir)
    remove_stale_temporaries(output_dir)  # a killed run's half-written best.pth; this run holds the folder
    say = print if dist_info.is_main else (lambda *a, **k: None)
    train, used = training_subset(run, data, say)
    found_floors = floors(data, train, seed)
    try:
        chosen = train_chosen(run, data, train, dist_info, profile, output_dir,
                              found_floors.get("pca_logreg", {}).get("val_auc"), flags, say)
    except FloatingPointError as err:  # no results, no success; best.pth, if any, predates it
        raise DivergedError(f"seed {seed}: fine-tuning diverged ({err}, e.g. --lr {run.training.lr / 10:.1e}); "
                            f"no results were written to {output_dir}") from None
    trainer, model, selection = chosen.trainer, chosen.model, chosen.selection
    evaluated = [split for split in ("val", "test") if len(data.splits[split][0])]
    scores = {split: trainer.scores(split) for split in evaluated}
    result = {"setup": run.setup, "data": data.data, "model": run.model.name, "finetune": run.model.finetune,
              "model_config": model.config, "recipe": run.recipe, "patience": run.training.patience, "seed": seed,
              **report, **used, **selection, "lr": chosen.run.training.lr, "augment": chosen.augment_report,
              "search": chosen.search, "floors": found_floors}
    if not dist_info.is_main:
        return result
    for split in evaluated:
        result[split] = write_split_outputs(output_dir, split, data, data.splits[split][1], scores[split], seed,
                                            run.bootstrap)
    result.update(threshold_report(data, scores))
    SETUPS[run.setup].extra_outputs(output_dir, trainer.classifier, data)
    if run.explain and "test" in scores:
        write_explanations(output_dir, trainer.classifier, data, scores["test"], run.explain)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
    write_results(output_dir, result)
    shown = evaluated[-1]
    say(f"seed {seed}: best epoch {selection['best_epoch']}; {shown} {headline(result[shown], data.task == REGRESSION)} "
        f"in {result['seconds']} s{'' if shown == 'test' else ' (no test split)'}")
    for line in (floor_line(result, shown), verdict(result, shown)):
        if line:
            say(f"seed {seed}: {line}")
    return result
