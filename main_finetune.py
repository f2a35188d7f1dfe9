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
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import sys

from .datasets.data_profile import profile_images
from .finetuning.finetune_config import resolve_run
from .finetuning.flags import check_flags, parse_args
from .finetuning.folds_run import run_folds
from .finetuning.output_folder import claim_output_folder, release_replaced, undo_claim
from .finetuning.reporting import aggregate, describe_run, describe_seeds, write_results
from .finetuning.seed_run import run_seed
from .finetuning.setups import load_task_data
from .util.atomic import make_output_folder
from .util.checkpoint import plain_args
from .util.cli import run_main
from .util.dist import init_distributed, shutdown
from .util.metrics import REGRESSION
from .util.run_lock import lock_output_folder
from .util.train_backend import describe_precision


def main(args) -> None:
    check_flags(args)
    dist_info = init_distributed(args.device)
    output_dir = make_output_folder(args.output_dir)
    if dist_info.is_main:
        lock_output_folder(output_dir)
        claim_output_folder(output_dir, args.overwrite)
    try:
        train_and_report(args, dist_info, output_dir)
    except BaseException:
        if dist_info.is_main:
            undo_claim(output_dir)
        raise
    if dist_info.is_main:
        release_replaced(output_dir)
    shutdown()


def train_and_report(args, dist_info, output_dir) -> None:
    data = load_task_data(args, output_dir)
    profile = profile_images(*data.splits["train"])
    run = resolve_run(args, data, profile, dist_info.world_size)
    augment_report = run.augmentation(profile)[1]
    report = {"data_profile": profile.to_dict(), "augment": augment_report, **data.report}
    if dist_info.is_main:
        precision = None if args.deepspeed else describe_precision(args.precision, dist_info.device)
        print("\n".join(describe_run(run, data, profile, augment_report, precision, dist_info.cpu_threads)))
    if args.folds:
        run_folds(run, data, dist_info, output_dir, profile, report, plain_args(args), args.folds)
        return
    seeds = list(run.seeds)
    results = [run_seed(run.for_seed(seed), data, dist_info, output_dir / f"seed_{seed}" if len(seeds) > 1
                        else output_dir, profile, report, plain_args(args)) for seed in seeds]
    if dist_info.is_main and len(seeds) > 1:
        regression = data.task == REGRESSION
        summary = {"setup": run.setup, "data": data.data, "model": run.model.name, "finetune": run.model.finetune,
                   "recipe": run.recipe, "seeds": seeds, **report, **aggregate(results, regression)}
        write_results(output_dir, summary)
        print("\n".join(describe_seeds(summary, regression)))


def cli() -> None:
    """The `volmae-finetune` command: the same as `python main_finetune.py`."""
    sys.exit(run_main(main, parse_args(sys.argv[1:], __doc__)))


if __name__ == "__main__":
    cli()
