"""From a corpus of volumes and a labels CSV to a label-efficiency result: does MAE pretraining pay, and where?

    launch/recipes/volumes.sh --corpus DIR_OR_CSV [--corpus ...] --labels CSV --label COL --group COL \\
        --output_dir OUT [--folds 5] [--label_fractions 0.1,0.25,1.0] [--baseline] [--floor_col COL]

Steps, each the command a user would type, run with this interpreter (outputs under OUT):
  1. the labels CSV split by patient once, stratified by label (OUT/labels_split.csv; a split column, if present,
     wins): the test patients are held out; the others are the training patients. The preprocessing is chosen
     from the headers (`--resample auto`: a common spacing when physical extents differ);
  2. the corpus cached with that preprocessing (OUT/cache): the --corpus folders or lists, plus the labelled
     volumes as unlabelled ones, never a test patient's (by path or content);
  3. MAE pretraining on the cache (OUT/pretrain/seed_S; one seed unless --seeds names more);
  4. for each fraction of the training patients, fine-tuning with --folds K cross-validation from the encoder
     (OUT/finetune/mae/frac_F/seed_S) and, with --baseline, the same model from scratch on the same folds
     (OUT/finetune/scratch/...): every choice on the pooled out-of-fold predictions, the final model the fold
     ensemble (final_model), scored once on the test patients;
  5. OUT/results.json (per fraction: each arm's final model, its out-of-fold and test AUC, the paired MAE - scratch
     difference with a two-level interval that resamples folds and test patients, the floors and a ranking on the
     out-of-fold AUC; below_floor; the pretraining curves; the cost) and OUT/report.png.
A killed run started again with the same command goes on from the last finished step; one asked anything else
is refused, naming the change (OUT/study.json, the steps' records). Nothing is keyed on
a dataset's name: grid, spacing, patch size, standardisation and augmentation come from the data.
"""
import argparse
import json
import math
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from ..datasets.labelled_volumes import VolumeTaskOptions, choose_for, read_labels, resolve_source
from ..datasets.pretrain_data import held_out_count
from ..datasets.task_data import TaskDataError, infer_task
from ..util.atomic import atomic_write
from ..util.cli import HelpFormatter, grid_or_auto, int_tuple_or_auto, label_columns, positive_int, positive_int_or_auto
from ..util.errors import DataError, UsageError
from ..util.lr_sched import auto_epochs, optimizer_steps_per_epoch
from ..util.strict_json import write_json
from ..volumes.preprocess import PreprocessConfig
from ..volumes.sources import SourceListError, list_sources
from .steps import file_hashes, flags, run
from .volumes_report import fraction_entry, run_folder, study_result, summary_lines, write_report

# The commands' own defaults, as the README's own-data commands give them: `--model auto` (the small hybrid ViT and
# its decoder, base lr 6e-3), epochs and warmup from the corpus size. Fine-tuning screens two (lr, augmentation)
# candidates in full on validation (finetuning.search: the recipe's, and 4x its lr with flips) rather than stopping
# at the first that clears the floors: a study compares arms, so each arm gets its best validated setting, at
# twice the fine-tuning cost. docs/results.md, LIDC, says what each was measured to give.
PRETRAIN = {"--model": "auto", "--batch_size": "32"}
HOLDOUT = 0.05  # of the corpus, never pretrained on: its reconstruction loss is the pretraining's validation curve
FINETUNE = {"--setup": "volumes", "--model": "auto", "--search": "full", "--search_budget": "2"}
FINETUNE_EPOCHS = 40  # at fraction 1; a fraction F trains for epochs / sqrt(F), so small sets still take steps


def epochs_for(fraction: float, epochs: int) -> int:
    return int(math.ceil(epochs / math.sqrt(fraction)))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/recipes/volumes.sh", description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--corpus", action="append", default=[],
                      help="unlabelled volumes to pretrain on: a folder, a .txt of paths or a .csv with a path "
                           "column; repeat for several (the labelled non-test volumes always join)")
    data.add_argument("--labels", required=True, help="labels CSV: path, the label column(s), the patient column")
    data.add_argument("--label", type=label_columns, required=True, help="label column(s), comma-separated")
    data.add_argument("--group", default="pid", help="patient column: no patient in two splits (default %(default)s)")
    data.add_argument("--split_ratio", default="0.7,0.15,0.15", help="train,val,test shares of the patients "
                      "when the CSV has no split column (default %(default)s)")
    data.add_argument("--split_seed", type=int, default=0, help="seed of the patient split (default %(default)s)")
    data.add_argument("--label_case", choices=("refuse", "sensitive"), default="refuse",
                      help="class names that differ only by case: refused, or separate classes (default %(default)s)")
    data.add_argument("--input_size", type=int_tuple_or_auto, default="auto",
                      help="grid N or D,H,W; auto: chosen with the spacing from the labelled headers (default)")
    data.add_argument("--floor_col", default=None, help="a numeric column of the labels CSV (e.g. a measured "
                      "diameter): a logistic regression on it alone, same patients, is the floor reported")
    study = parser.add_argument_group("study")
    study.add_argument("--output_dir", required=True, help="every step's outputs, results.json and report.png")
    study.add_argument("--folds", type=positive_int, default=5,
                       help="cross-validation folds of the training patients: every choice on their pooled out-of-fold "
                            "predictions, the final model the fold ensemble (k folds cost what k seeds did)")
    study.add_argument("--seeds", default="0", help="pretraining seeds: each pretrains once and fine-tunes both arms "
                       "on the same folds; the two-level interval resamples them with the folds")
    study.add_argument("--label_fractions", default="0.1,0.25,1.0", help="fractions of the training patients")
    study.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                       help="also fine-tune the same model from scratch, for the paired MAE - scratch difference")
    study.add_argument("--pretrain_epochs", type=positive_int_or_auto, default="auto",
                       help="auto: main_pretrain.py's, about 1,500 optimizer steps whatever the corpus size")
    study.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS,
                       help="fine-tuning epochs at fraction 1 (a fraction F trains epochs / sqrt(F))")
    study.add_argument("--probe_every", type=int, default=None, help="pretraining epochs between kNN/linear probes "
                       "and held-out reconstruction losses (default: a fifth of the pretraining)")
    study.add_argument("--jobs", type=positive_int, default=1,
                       help="pretrainings and fine-tunings run this many at a time, each with cores / JOBS threads "
                            "(small models use many cores poorly: on 2 cores, --jobs 2 is faster)")
    study.add_argument("--workers", type=int, default=2, help="processes that decode volumes into the caches")
    study.add_argument("--num_workers", type=int, default=0, help="loader workers of pretraining")
    return parser


def planned_pretrain_epochs(requested: int | str, cache: Path) -> int:
    """`auto`: the epochs main_pretrain.py's `--epochs auto` gives this cache (less the held-out share) at the batch."""
    if requested != "auto":
        return requested
    manifest = pd.read_csv(cache / "manifest.csv", keep_default_na=False)
    volumes = int((manifest["status"] == "ok").sum())
    trained = volumes - held_out_count(volumes, HOLDOUT)
    return auto_epochs(optimizer_steps_per_epoch(trained, 1, int(PRETRAIN["--batch_size"]), 1))


STUDY_FILE = "study.json"


def study_key(args: argparse.Namespace) -> dict:
    """What the study's split and data depend on: a re-run in the same folder must ask the same."""
    labels = Path(args.labels)
    return {"labels": str(labels.resolve()), "labels_sha256": file_hashes([labels])[labels.name] if labels.is_file() else None,
            "label": ",".join(args.label), "group": args.group, "split_ratio": args.split_ratio, "split_seed": args.split_seed,
            "label_case": args.label_case, "input_size": args.input_size if args.input_size == "auto" else list(args.input_size),
            "corpus": [str(Path(c).resolve()) for c in args.corpus]}


def claim_study_folder(args: argparse.Namespace, out: Path) -> None:
    """OUT/study.json records what this folder's study was asked; a re-run asking anything else is refused in one
    line naming the change, before a file is rewritten (the split above all: every step depends on it)."""
    path = out / STUDY_FILE
    key = study_key(args)
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{name} {before.get(name)!r} there, {key[name]!r} here" for name in key if before.get(name) != key[name]]
        if changed:
            raise UsageError(f"{out} holds a study asked with other data or split ({'; '.join(changed)}); give this "
                             f"study its own --output_dir")
        return
    if (out / "labels_split.csv").exists():
        raise UsageError(f"{out} holds a study that does not record what it was asked (no {STUDY_FILE}); give this "
                         f"study its own --output_dir")
    write_json(path, key)


def split_labels(args: argparse.Namespace, labels: list[str], out: Path) -> tuple[pd.DataFrame, Path]:
    """The labels CSV with absolute paths and the split every later step uses: OUT/labels_split.csv."""
    options = VolumeTaskOptions(labels=labels, group=args.group, label_case=args.label_case,
                                ratio=tuple(float(v) for v in args.split_ratio.split(",")), split_seed=args.split_seed)
    try:
        table = read_labels(Path(args.labels).resolve(), options)
    except TaskDataError as err:
        raise DataError(str(err)) from None
    path = out / "labels_split.csv"
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table, path


def same_files(candidates: list[str], held_out: list[str]) -> set[str]:
    """The candidates that are one of the held-out files: the same path, or the same bytes under another path
    (a copy of a test scan in a corpus folder). Only files of a held-out file's size are hashed."""
    held = {str(Path(p).resolve()) for p in held_out if p}
    sizes = {}
    for path in held:
        if Path(path).is_file():
            sizes.setdefault(Path(path).stat().st_size, []).append(Path(path))
    found, digests = set(), {}
    for candidate in candidates:
        resolved = Path(candidate).resolve()
        if str(resolved) in held:
            found.add(candidate)
            continue
        if not resolved.is_file() or resolved.stat().st_size not in sizes:
            continue
        for other in sizes[resolved.stat().st_size]:
            digests.setdefault(other, file_hashes([other])[other.name])
            if file_hashes([resolved])[resolved.name] == digests[other]:
                found.add(candidate)
                break
    return found


def corpus_list(args: argparse.Namespace, table: pd.DataFrame, out: Path) -> tuple[Path, dict]:
    """OUT/corpus.csv: every --corpus source, then the labelled volumes outside the test split; a test patient's
    volume is never pretrained on, wherever it sits in --corpus (by path, or by content under another path)."""
    sources, counts = [], {}
    for location in args.corpus:
        try:
            found = list_sources(location)
        except SourceListError as err:
            raise DataError(f"--corpus {err}") from None
        sources += [resolve_source(Path.cwd(), source) for source in found]  # OUT/corpus.csv is read from OUT
        counts[location] = len(found)
    test = [p for p, s in zip(table["path"], table["split"]) if p and s == "test"]
    held_out = same_files(sources, test)
    if held_out:
        print(f"left out of pretraining: {len(held_out)} --corpus volume(s) that are test patients' scans")
        counts["test volumes found in --corpus and left out"] = len(held_out)
    labelled = [p for p, s in zip(table["path"], table["split"]) if p and s != "test"]
    counts["labelled volumes (train and val splits)"] = len(labelled)
    unique = list(dict.fromkeys([source for source in sources if source not in held_out] + labelled))
    path = out / "corpus.csv"
    atomic_write(path, lambda tmp: pd.DataFrame({"path": unique}).to_csv(tmp, index=False))
    return path, counts


def probe_and_labelled_lists(table: pd.DataFrame, labels: list[str], task: str, out: Path) -> tuple[Path, Path]:
    """OUT/probe.csv (the readable train and val volumes with a binary label: the pretraining's kNN/linear probe)
    and OUT/labelled.csv (every labelled volume, for the fine-tuning cache)."""
    probe_csv, labelled_csv = out / "probe.csv", out / "labelled.csv"
    manifest = pd.read_csv(out / "cache" / "manifest.csv", keep_default_na=False)
    cached = set(manifest.loc[manifest["status"] == "ok", "source"])
    probe_rows = table[table["split"].isin(("train", "val")) & table["path"].isin(cached)]
    if task == "binary-class" and len(labels) == 1:
        probe_rows.assign(label=probe_rows[labels[0]])[["path", "label", "split"]].to_csv(probe_csv, index=False)
    pd.DataFrame({"path": list(dict.fromkeys(p for p in table["path"] if p))}).to_csv(labelled_csv, index=False)
    return probe_csv, labelled_csv


def run_study(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    fractions = [float(f) for f in args.label_fractions.split(",")]
    python = sys.executable
    labels = args.label
    claim_study_folder(args, out)
    table, labels_csv = split_labels(args, labels, out)
    task = infer_task(table, labels, "auto")
    if args.floor_col and (task not in ("binary-class", "multi-class") or args.floor_col not in table.columns):
        raise UsageError(f"--floor_col needs a binary or multi-class label and a column of {args.labels}; "
                         f"got {args.floor_col!r} for a {task} task")

    size = grid_or_auto(args.input_size)
    choice = choose_for([p for p in table["path"] if p], VolumeTaskOptions(labels=labels, input_size=size,
                                                                            base=PreprocessConfig()))
    config = choice.config
    print(f"preprocessing: {choice.reason}")
    grid_text = ",".join(map(str, config.size))
    resampling = ["--resample", config.resample]
    if config.spacing:
        resampling += ["--spacing", ",".join(f"{s:.6g}" for s in config.spacing)]
    corpus_csv, corpus_counts = corpus_list(args, table, out)
    steps = out / "steps"
    cache = run([python, "main_cache.py", "--input", str(corpus_csv), "--output", str(out / "cache"),
                 "--workers", str(args.workers), "--size", grid_text, *resampling], out / "cache.log",
                steps / "cache.json", inputs=[corpus_csv])

    pretrain_epochs = planned_pretrain_epochs(args.pretrain_epochs, out / "cache")
    probe_every = args.probe_every or max(1, pretrain_epochs // 5)
    probe_csv, labelled_csv = probe_and_labelled_lists(table, labels, task, out)
    volume_cache = run([python, "main_cache.py", "--input", str(labelled_csv), "--output", str(out / "volume_cache"),
                       "--workers", str(args.workers), "--size", grid_text, *resampling], out / "volume_cache.log",
                       steps / "volume_cache.json", inputs=[labelled_csv])  # fine-tuning's: built once, then shared

    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    pool = ThreadPoolExecutor(max_workers=args.jobs)

    def step(command: list[str], log: Path, done: Path, inputs: list[Path], after: Future | None = None) -> Future:
        def go() -> dict:
            if after is not None:
                after.result()
            return run(command, log, done, threads=threads, echo=args.jobs == 1, inputs=inputs)
        return pool.submit(go)

    pretrain = {}
    for seed in seeds:
        folder = out / "pretrain" / f"seed_{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        probe = ["--probe_csv", str(probe_csv), "--probe_every", str(probe_every)] if probe_csv.exists() else []
        pretrain[seed] = step([python, "main_pretrain.py", "--data_path", str(out / "cache"), *flags(PRETRAIN),
                               "--input_size", grid_text, "--epochs", str(pretrain_epochs),
                               "--seed", str(seed), "--num_workers", str(args.num_workers), *probe,
                               "--val_fraction", str(HOLDOUT), "--val_every", str(probe_every), "--keep_every", "0",
                               "--vis_every", "0", "--output_dir", str(folder)],
                              folder / "pretrain.log", steps / f"pretrain_{seed}.json",
                              [probe_csv] if probe_csv.exists() else [])

    common = [python, "main_finetune.py", *flags(FINETUNE), "--meta", str(labels_csv), "--label", ",".join(labels),
              "--group", args.group, "--label_case", args.label_case, "--input_size", grid_text, *resampling,
              "--volume_cache", str(out / "volume_cache"),
              "--cache_workers", str(args.workers), "--bootstrap", "0",
              "--overwrite"]  # the study's own folders: a step killed after its results but before its record reruns
    inits = ["mae", "scratch"] if args.baseline else ["mae"]
    runs: dict[tuple[str, float, int], Future] = {}
    longest_first = sorted(fractions, reverse=True)  # the pool starts the next step when one ends: short ones last
    for init in reversed(inits):  # scratch runs first: they need no pretraining, so they fill the wait for it
        for fraction in longest_first:
            for seed in seeds:
                folder = run_folder(out, init, fraction, seed)
                folder.mkdir(parents=True, exist_ok=True)
                start = ["--finetune", str(out / "pretrain" / f"seed_{seed}" / "encoder.pth")] if init == "mae" else []
                runs[init, fraction, seed] = step(
                    [*common, *start, "--folds", str(args.folds), "--train_fraction", f"{fraction:g}", "--seeds",
                     str(seed), "--epochs", str(epochs_for(fraction, args.epochs)), "--output_dir", str(folder)],
                    folder / "finetune.log", steps / f"{init}_frac{fraction:g}_seed{seed}.json", [labels_csv],
                    after=pretrain[seed] if init == "mae" else None)
    try:
        pretrain = {seed: future.result() for seed, future in pretrain.items()}
        finetuned: dict[str, dict[float, list[dict]]] = {init: {f: [] for f in fractions} for init in inits}
        step_cpu = 0.0
        for (init, fraction, seed), future in sorted(runs.items(), key=lambda item: item[0][2]):
            step_cpu += future.result()["cpu_seconds"]
            finetuned[init][fraction].append(json.loads((run_folder(out, init, fraction, seed) / "results.json").read_text()))
    finally:  # a failed step stops what has not started; a re-run goes on from the finished ones
        pool.shutdown(cancel_futures=True)

    per_fraction = {f"{fraction:g}": fraction_entry(out, fraction, {init: finetuned[init][fraction] for init in inits},
                                                    epochs_for(fraction, args.epochs), seeds, table, args, task,
                                                    labels[0])
                    for fraction in fractions}
    cpu = step_cpu + cache["cpu_seconds"] + volume_cache["cpu_seconds"] + sum(r["cpu_seconds"] for r in pretrain.values())
    result = study_result(args, out, table, task, labels, seeds, fractions, {
        "corpus_counts": corpus_counts, "choice": choice, "pretrain": pretrain, "pretrain_flags": PRETRAIN,
        "pretrain_epochs": pretrain_epochs, "cache": cache, "finetune_flags": FINETUNE, "per_fraction": per_fraction,
        "first": finetuned["mae"][fractions[0]][0], "cpu_seconds": cpu})
    write_report(out, result)
    print("\n".join(summary_lines(result, inits, args.floor_col)))
    print(f"wrote {out / 'results.json'} and {out / 'report.png'}")
