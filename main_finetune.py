"""Fine-tune a classifier, from a pretrained MAE encoder or from scratch, in the reference setups.

    python main_finetune.py --data_flag adrenalmnist3d --size 28 --model vit3d_tiny_patch4 \\
        --finetune runs/mae/checkpoint-last.pth --output_dir runs/ft
    python main_finetune.py --data_flag adrenalmnist3d --model resnet18_3d --recipe medmnist ...
    python main_finetune.py --setup vitmednet --data_flag adrenalmnist3d --size 64 --model vitmednet3d ...
    python main_finetune.py --setup slivit --meta meta.csv --label AMD --model slivit --fe_path backbone.pth ...
    python main_finetune.py --setup slivit_backbone --meta kermany.csv --label NORMAL,DRUSEN,CNV,DME ...

    python main_finetune.py --setup volumes --meta labels.csv --label malignant --group patient_id ...

Setups: volumes (your own labelled volumes: a labels CSV, patient splits, a cache; every setting chosen on
validation), medmnist (MedMNIST 2D/3D as published), vitmednet (MedMNIST3D with 3DViTMedNet's recipe and
augmentation), slivit (slice stacks from a meta CSV of volumes, or from a MedMNIST3D flag),
slivit_backbone (SLIViT's 2D ConvNeXt pretraining). The checkpoint kept is the epoch with the best
validation AUC (R2 for regression); the test split is evaluated once, with it. Metrics are the medmnist
Evaluator's; on MedMNIST's own splits the scores are also written in its CSV format.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np

from volmae.datasets.data_profile import profile_images
from volmae.datasets.labelled_volumes import fraction_of_patients
from volmae.datasets.medmnist_data import MedMNISTNotFound, subset_indices
from volmae.datasets.task_data import TaskData
from volmae.finetuning.candidate_runs import train_chosen
from volmae.finetuning.cli import parse_args
from volmae.finetuning.model_choice import (
    auto_architecture,
    input_normalization,
    pretrained_config,
)
from volmae.finetuning.output_folder import claim_output_folder
from volmae.finetuning.recipes import PRETRAINED_LAYER_DECAY
from volmae.finetuning.reporting import (
    aggregate,
    floor_line,
    floors,
    headline,
    threshold_report,
    verdict,
    write_explanations,
    write_results,
    write_split_outputs,
)
from volmae.finetuning.setups import SETUPS, resolve_augment
from volmae.util.atomic import make_output_folder, remove_stale_temporaries
from volmae.util.cli import run_main
from volmae.util.dist import init_distributed, shutdown
from volmae.util.lr_sched import effective_lr
from volmae.util.metrics import REGRESSION
from volmae.util.run_lock import lock_output_folder
from volmae.util.run_log import cpu_seconds
from volmae.util.train_backend import describe_precision


def training_subset(args, seed: int, data: TaskData, say) -> tuple[tuple[np.ndarray, np.ndarray], dict]:
    """The training split, or with --train_fraction the samples of that fraction of its patients (each sample its
    own patient where the data name none), drawn for this seed."""
    images, labels = data.splits["train"]
    groups = data.groups["train"] if data.groups is not None else np.arange(len(images)).astype(str)
    if args.train_fraction is None:
        return (images, labels), {}
    try:
        keep = fraction_of_patients(groups, labels, args.train_fraction, seed)
    except ValueError as err:
        raise SystemExit(f"error: --train_fraction: {err}") from None
    used = {"train_fraction": args.train_fraction, "train_samples_used": int(len(keep)),
            "train_patients_used": int(len(set(groups[keep])))}
    say(f"seed {seed}: training on {len(keep)} samples of {used['train_patients_used']} patients "
        f"({args.train_fraction:g} of {len(set(groups))})")
    return (images[keep], labels[keep]), used


def run_seed(args, seed: int, data: TaskData, dist_info, output_dir: Path, profile, report: dict) -> dict:
    """Train one seed (the candidates of finetuning.search, judged on validation), keep the chosen model's best
    epoch, evaluate it on val and test once and write its outputs."""
    start, cpu_start = time.perf_counter(), cpu_seconds()
    args.seed = seed
    make_output_folder(output_dir)
    remove_stale_temporaries(output_dir)  # a killed run's half-written best.pth; this run holds the folder
    say = print if dist_info.is_main else (lambda *a, **k: None)
    train, used = training_subset(args, seed, data, say)
    found_floors = floors(data, train, seed)
    try:
        chosen = train_chosen(args, seed, data, train, dist_info, profile, output_dir,
                              found_floors.get("pca_logreg", {}).get("val_auc"), say)
    except FloatingPointError as err:  # diverged: no results, no success; best.pth, if any, predates it
        raise SystemExit(f"error: seed {seed}: fine-tuning diverged ({err}, e.g. --lr {args.lr / 10:.1e}); "
                         f"no results were written to {output_dir}") from None
    trainer, model, selection = chosen.trainer, chosen.model, chosen.selection
    evaluated = [split for split in ("val", "test") if len(data.splits[split][0])]
    scores = {split: trainer.scores(split) for split in evaluated}
    result = {"setup": args.setup, "data": data.data, "model": args.model, "finetune": args.finetune,
              "model_config": model.config, "recipe": args.recipe, "patience": args.patience, "seed": seed,
              **report, **used, **selection,
              "lr": chosen.args.lr, "augment": chosen.augment_report, "search": chosen.search, "floors": found_floors}
    if dist_info.is_main:
        for split in evaluated:
            result[split] = write_split_outputs(output_dir, split, data, data.splits[split][1], scores[split], seed,
                                                args.bootstrap)
        result.update(threshold_report(data, scores))
        SETUPS[args.setup].extra_outputs(output_dir, trainer.classifier, data)
        if args.explain and "test" in scores:
            write_explanations(output_dir, trainer.classifier, data, scores["test"], args.explain)
        result["seconds"] = round(time.perf_counter() - start, 1)
        result["cpu_seconds"] = round(cpu_seconds() - cpu_start, 1)
        write_results(output_dir, result)
        shown = evaluated[-1]
        say(f"seed {seed}: best epoch {selection['best_epoch']}; {shown} "
            f"{headline(result[shown], data.task == REGRESSION)} in {result['seconds']} s"
            f"{'' if shown == 'test' else ' (no test split)'}")
        for line in (floor_line(result, shown), verdict(result, shown)):
            if line:
                say(f"seed {seed}: {line}")
    return result


def load_data(args, output_dir: Path) -> TaskData:
    """The setup's data; with --train_samples, a random subset of the training split."""
    try:
        data = SETUPS[args.setup].build_data(args, output_dir)
    except (ValueError, MedMNISTNotFound) as err:
        raise SystemExit(f"error: {err}") from None
    if args.train_samples:
        images, labels = data.splits["train"]
        keep = subset_indices(len(images), args.train_samples)
        data.splits["train"] = (images[keep], labels[keep])
    return data


def main(args) -> None:
    dist_info = init_distributed(args.device)
    output_dir = make_output_folder(args.output_dir)
    if dist_info.is_main:
        lock_output_folder(output_dir)
        claim_output_folder(output_dir, args.overwrite)
    data = load_data(args, output_dir)
    encoder = pretrained_config(args.finetune)
    args.architecture = {}
    if args.model == "auto":
        args.model, args.architecture = auto_architecture(args, data, encoder)
    profile = profile_images(*data.splits["train"])
    args.normalization = input_normalization(args, profile, encoder)
    if args.layer_decay is None:
        args.layer_decay = PRETRAINED_LAYER_DECAY if args.finetune else 1.0
    if args.lr is None:
        args.lr = effective_lr(args.blr, None, args.batch_size * dist_info.world_size)
    seeds = args.seeds
    augment_report = resolve_augment(args, profile)[1]
    report = {"data_profile": profile.to_dict(), "augment": augment_report, **data.report}
    if dist_info.is_main:
        source = data.data.get("flag") or data.data.get("meta")
        print(f"{args.setup} setup, {source} ({data.task}, {len(data.class_names)} output(s)) at "
              f"{'x'.join(map(str, data.input_size))}: {', '.join(f'{k} {len(v[0])}' for k, v in data.splits.items())}; "
              f"model {args.model}{' ' + json.dumps(args.architecture) if args.architecture else ''}, recipe "
              f"{args.recipe}, lr {args.lr:.2e}, {args.epochs} epochs, seeds {seeds}")
        if not args.deepspeed:
            print(f"precision: {describe_precision(args.precision, dist_info.device)}"
                  f"{'; threads ' + dist_info.cpu_threads if dist_info.cpu_threads else ''}")
        print(f"training data: {profile.describe()}")
        if args.normalization:
            print(f"input standardisation inside the model: mean {args.normalization['input_mean']:.4f}, std "
                  f"{args.normalization['input_std']:.4f} ({'the encoder' if args.finetune else 'training images'})")
        print(f"augmentation: {augment_report['preset']} ({augment_report['does']})"
              f"{': ' + augment_report['reason'] if args.augment == 'auto' else ''}")
    results = [run_seed(args, seed, data, dist_info, output_dir / f"seed_{seed}" if len(seeds) > 1 else output_dir,
                        profile, report) for seed in seeds]
    if dist_info.is_main and len(seeds) > 1:
        regression = data.task == REGRESSION
        summary = {"setup": args.setup, "data": data.data, "model": args.model, "finetune": args.finetune,
                   "recipe": args.recipe, "seeds": seeds, **report, **aggregate(results, regression)}
        write_results(output_dir, summary)
        print(f"test over {len(seeds)} seeds: {headline(summary['test'], regression)}")
        if "pca_logreg_floor_auc" in summary["test"]:
            print(f"PCA + LR floor over the same seeds: test AUC {summary['test']['pca_logreg_floor_auc']['mean']:.4f}")
        flagged = sorted(set(summary["collapsed_seeds"]) | set(summary["test_at_prior_seeds"]))
        if flagged:
            print(f"WARNING: seeds {flagged} collapsed or sat at the class prior: their scores are not results")
    shutdown()


def cli() -> None:
    """The `volmae-finetune` command: the same as `python main_finetune.py`."""
    sys.exit(run_main(main, parse_args(sys.argv[1:], __doc__)))


if __name__ == "__main__":
    cli()
