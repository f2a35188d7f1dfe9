"""Screens on the folds of a finished volumes study: what could lift the deep models past their floors, and the
defaults first chosen on test, each judged on the pooled out-of-fold AUC of the same training patients.

    python benchmarks/cv_screens.py --study runs/lidc36 --fraction 1 --output_dir runs/lidc36_screens \
        --json benchmarks/results/lidc_cv_screens_cpu.json

Each screen is the study's own fine-tuning command at one fraction (same labels_split.csv, folds, volume cache and
pretrained encoder) with one thing changed: a fine-tuning flag, or a pretraining flag (then a new pretraining, the
study's own command with that flag, and fine-tuning from it). A screen that keeps the search trains its candidates
as the study did. The comparison with the study's MAE arm (benchmarks/compare_runs.py) gives, per screen, the
out-of-fold AUC and its paired interval (the choice), and the test AUC with the two-level interval (read once, for
the record). Steps are the studies' (studies.steps: resumable, each costed in CPU seconds); JSON on stdout and in
--json.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from ..studies.steps import run
from ..studies.volumes_report import paired_scores_difference
from ..util.cli import run_main
from ..util.errors import UsageError
from .compare_runs import read_run, summarise, task_of, test_difference

# name -> (edits of the study's fine-tuning command, edits of its pretraining command: none keeps the study's encoder).
# Every screen trains the candidate the study chose for its MAE arm (its lr and augmentation, no search), so that one
# thing changes; a model of another family (the CNN) searches its own candidates as the study's arms did.
OWN_SEARCH = {"resnet18_3d_scratch"}
SCREENS = {
    "class_token_head": ([("set", "--global_pool", "token")], []),
    "attention_pool_head": ([("set", "--global_pool", "attention")], []),
    "resnet18_3d_scratch": ([("set", "--model", "resnet18_3d"), ("drop", "--finetune")], []),
    "longer_more_regularised": ([("scale", "--epochs", 2), ("set", "--drop_path", "0.2"),
                                 ("set", "--weight_decay", "0.1")], []),
    "layer_decay_0.9": ([("set", "--layer_decay", "0.9")], []),
    "norm_pix_loss": ([], [("switch", "--norm_pix_loss")]),
    "pretraining_twice_as_long": ([], [("scale", "--epochs", 2)]),
    "contrastive_term_0.05": ([], [("set", "--contrast_weight", "0.05")]),
}


def edited(command: list[str], edits: list[tuple]) -> list[str]:
    """`command` with each edit made: ("set", flag, value) replaces or adds a value, ("drop", flag) removes a flag
    and its value, ("switch", flag) adds a switch, ("scale", flag, k) multiplies an integer value."""
    command = list(command)
    for edit in edits:
        kind, flag = edit[0], edit[1]
        at = command.index(flag) if flag in command else None
        if kind == "set":
            command = command[:at + 1] + [edit[2]] + command[at + 2:] if at is not None else command + [flag, edit[2]]
        elif kind == "drop" and at is not None:
            del command[at:at + 2]
        elif kind == "switch" and at is None:
            command.append(flag)
        elif kind == "scale":
            command[at + 1] = str(int(command[at + 1]) * edit[2])
    return command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", type=Path, required=True, help="a finished launch/recipes/volumes.sh output")
    parser.add_argument("--fraction", default="1", help="the label fraction to screen at (as the study names it)")
    parser.add_argument("--seed", default="0", help="the study's pretraining seed")
    parser.add_argument("--screens", default=",".join(SCREENS), help=f"comma-separated, of {', '.join(SCREENS)}")
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--jobs", type=int, default=2, help="screens run this many at a time, one thread each")
    parser.add_argument("--json", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    study, out = args.study.resolve(), args.output_dir.resolve()
    steps = study / "steps"
    finetune_record = steps / f"mae_frac{args.fraction}_seed{args.seed}.json"
    pretrain_record = steps / f"pretrain_{args.seed}.json"
    if not finetune_record.exists() or not pretrain_record.exists():
        raise UsageError(f"{study} holds no finished MAE arm at fraction {args.fraction}: run the study first")
    finetune = [sys.executable, *json.loads(finetune_record.read_text())["command"]]
    pretrain = [sys.executable, *json.loads(pretrain_record.read_text())["command"]]
    names = [name.strip() for name in args.screens.split(",")]
    unknown = sorted(set(names) - set(SCREENS))
    if unknown:
        raise UsageError(f"--screens: unknown {', '.join(unknown)}; known: {', '.join(SCREENS)}")
    out.mkdir(parents=True, exist_ok=True)

    chosen = json.loads((study / "finetune" / "mae" / f"frac_{args.fraction}" / f"seed_{args.seed}" /
                         "results.json").read_text())
    as_chosen = [("set", "--lr", f"{chosen['lr']:.6g}"), ("set", "--augment", chosen["augment"]["preset"]),
                 ("set", "--search", "none")]

    def screen(name: str) -> dict:
        finetune_edits, pretrain_edits = SCREENS[name]
        finetune_edits = finetune_edits if name in OWN_SEARCH else [*as_chosen, *finetune_edits]
        command, cpu = finetune, 0.0
        if pretrain_edits:
            folder = out / "pretrain" / name
            folder.mkdir(parents=True, exist_ok=True)
            made = edited(pretrain, [*pretrain_edits, ("set", "--output_dir", str(folder))])
            cpu += run(made, folder / "pretrain.log", out / "steps" / f"pretrain_{name}.json", threads=1,
                       echo=False)["cpu_seconds"]
            command = edited(command, [("set", "--finetune", str(folder / "encoder.pth"))])
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        command = edited(command, [*finetune_edits, ("set", "--output_dir", str(folder))])
        cpu += run(command, folder / "finetune.log", out / "steps" / f"{name}.json", threads=1, echo=False)["cpu_seconds"]
        return {"folder": folder, "cpu_seconds": round(cpu, 1)}

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = dict(zip(names, pool.map(screen, names)))
    table = pd.read_csv(study / "labels_split.csv")
    group = json.loads((study / "study.json").read_text())["group"]
    baseline = read_run(study / "finetune" / "mae" / f"frac_{args.fraction}" / f"seed_{args.seed}")
    task = task_of(baseline["test"])
    arms = [summarise("study MAE arm (the default)", baseline)]
    for name, screened in done.items():
        loaded = read_run(screened["folder"])
        entry = summarise(name, loaded)
        entry["cpu_seconds_screen"] = screened["cpu_seconds"]
        entry["oof_minus_default"] = paired_scores_difference([loaded["val"]], [baseline["val"]], table, group, task,
                                                              "the pooled out-of-fold predictions")
        entry["test_minus_default"] = test_difference(loaded, baseline, table, group, task)
        arms.append(entry)
    result = {"study": str(study), "fraction": args.fraction, "baseline": arms[0], "screens": arms[1:],
              "chosen_out_of_fold": max(arms, key=lambda a: a["oof_auc"])["arm"],
              "judged_on": "pooled out-of-fold AUC of the study's training patients; test read once per screen"}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(run_main(main))
