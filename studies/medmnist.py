"""From a MedMNIST-style set to a measured result: MAE self-pretraining on the training split (its labels,
validation and test splits are never read), fine-tuning from its encoder.pth for each seed, and with
--baseline the same architecture from scratch. Writes OUTPUT_DIR/results.json.

    launch/recipes/medmnist.sh --data_flag adrenalmnist3d --size 28 --data_root DIR --output_dir OUT --baseline

Every choice follows the data, not the flag's name: the architecture's patch size from the grid
(`--model auto`), the augmentation from the training images (`--augment auto`: masks and label maps
get geometry only), 2D or 3D and the number of channels and classes from the files. The steps are
the commands a user would type (main_pretrain.py, main_finetune.py), run as subprocesses with this
interpreter; their own outputs stay in OUTPUT_DIR/{pretrain,mae,scratch}.
"""
import argparse
import json
import sys
from pathlib import Path

from ..util.cli import HelpFormatter, non_negative_int, positive_int
from ..util.strict_json import write_json
from .steps import flags, probe_curve, run, seed_summary

# The recipe (docs/finetuning.md, the MedMNIST recipe, says why each value is what it is).
PRETRAIN = {"--model": "auto", "--mask_ratio": "0.75", "--decoder_embed_dim": "96", "--decoder_depth": "2",
            "--decoder_num_heads": "3", "--batch_size": "64", "--blr": "6e-3", "--warmup_epochs": "5",
            "--weight_decay": "0.05"}
PRETRAIN_EPOCHS = 50
FINETUNE = {"--model": "auto", "--recipe": "mae", "--augment": "auto"}
FINETUNE_EPOCHS = 20


def summary(folder: Path, seeds: list[int], extra_cpu: float = 0.0) -> dict:
    """Mean and std of test AUC and ACC over the seeds of one main_finetune.py --seeds run."""
    runs = [json.loads((folder / (f"seed_{seed}" if len(seeds) > 1 else "") / "results.json").read_text())
            for seed in seeds]
    return seed_summary(runs, extra_cpu)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/recipes/medmnist.sh", description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--data_flag", required=True, help="a MedMNIST flag, 2D or 3D")
    data.add_argument("--size", type=positive_int, default=28, help="the flag's image size (3D: 28 or 64)")
    data.add_argument("--data_root", required=True, help="folder holding the flag's .npz")
    data.add_argument("--train_samples", type=positive_int, default=None,
                      help="use N training samples in every step (smoke runs and label-efficiency studies)")
    data.add_argument("--num_workers", type=non_negative_int, default=0, help="loader workers of every step")
    study = parser.add_argument_group("study")
    study.add_argument("--output_dir", required=True, help="pretrain/, mae/, scratch/ and results.json")
    study.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds (one pretraining serves them all)")
    study.add_argument("--baseline", action="store_true", help="also fine-tune the same architecture from scratch")
    study.add_argument("--pretrain_epochs", type=positive_int, default=PRETRAIN_EPOCHS, help="MAE pretraining epochs")
    study.add_argument("--epochs", type=positive_int, default=FINETUNE_EPOCHS, help="fine-tuning epochs")
    study.add_argument("--probe_every", type=positive_int, default=10,
                       help="pretraining epochs between kNN/linear probes")
    return parser


def run_study(args: argparse.Namespace) -> None:
    out = Path(args.output_dir).resolve()  # the steps run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    data_root = str(Path(args.data_root).resolve())
    seeds = [int(s) for s in args.seeds.split(",")]
    python = sys.executable
    data = ["--data_flag", args.data_flag, "--size", str(args.size), "--data_root", data_root]
    subset = ["--train_samples", str(args.train_samples)] if args.train_samples else []

    pretrain_dir = out / "pretrain"
    pretrain = run([python, "main_pretrain.py", *data, *flags(PRETRAIN), "--epochs", str(args.pretrain_epochs),
                    "--probe_data_flag", args.data_flag, "--probe_root", data_root,
                    "--probe_every", str(args.probe_every), "--num_workers", str(args.num_workers), *subset,
                    "--vis_every", "0", "--keep_every", "0", "--output_dir", str(pretrain_dir)],
                   out / "pretrain.log")
    finetune = [python, "main_finetune.py", *data, *flags(FINETUNE), "--seeds", args.seeds, *subset,
                "--num_workers", str(args.num_workers), "--epochs", str(args.epochs), "--overwrite"]
    steps = {"pretrain": pretrain}
    steps["mae"] = run([*finetune, "--finetune", str(pretrain_dir / "encoder.pth"), "--output_dir", str(out / "mae")],
                       out / "mae.log")
    result = {"data_flag": args.data_flag, "size": args.size, "seeds": seeds,
              "pretrain": {**pretrain, "epochs": args.pretrain_epochs, "flags": PRETRAIN,
                           "probe": probe_curve(pretrain_dir / "log.txt")},
              "mae": summary(out / "mae", seeds, extra_cpu=pretrain["cpu_seconds"])}
    if args.baseline:
        steps["scratch"] = run([*finetune, "--output_dir", str(out / "scratch")], out / "scratch.log")
        result["scratch"] = summary(out / "scratch", seeds)
        result["mae_minus_scratch_test_auc"] = result["mae"]["test_auc_mean"] - result["scratch"]["test_auc_mean"]
    first = json.loads((out / "mae" / (f"seed_{seeds[0]}" if len(seeds) > 1 else "") / "results.json").read_text())
    result.update({"data_profile": first["data_profile"], "augment": first["augment"],
                   "model": first["model"], "model_config": first["model_config"], "steps": steps})
    write_json(out / "results.json", result)
    lines = [f"{name}: test AUC {result[name]['test_auc_mean']:.4f} +- {result[name]['test_auc_std']:.4f}, "
             f"ACC {result[name]['test_acc_mean']:.4f} +- {result[name]['test_acc_std']:.4f}"
             f"{' (COLLAPSED seeds: ' + str(result[name]['collapsed_seeds']) + ')' if result[name]['collapsed_seeds'] else ''}"
             for name in ("mae", "scratch") if name in result]
    print("\n".join(lines) + f"\nwrote {out / 'results.json'}")

