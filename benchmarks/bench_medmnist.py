"""MedMNIST results: ViT from scratch, ViT from an MAE self-pretrained on the training split, and the
ResNet-18 baseline with the official MedMNIST recipe, over several seeds; and the reference systems'
setups: SLIViT (`slivit`), 3DViTMedNet (`vitmednet3d`), MedViT-3D (`medvit3d_tiny`) and the
MAE-initialised ViT (`vit_mae_vitmednet`), all four in the 3DViTMedNet setup's recipe and augmentation
except SLIViT, which runs in its own.

    python benchmarks/bench_medmnist.py --data_root ../shared/data/medmnist --jobs 8
    python benchmarks/bench_medmnist.py --data_root ../shared/data/medmnist --datasets adrenalmnist3d_28,adrenalmnist3d_64 \
        --methods slivit,vitmednet3d,medvit3d_tiny,vit_mae_vitmednet

Every run is the command a user would type (main_pretrain.py / main_finetune.py), started as a
subprocess; up to --jobs run at once (small models leave a GPU mostly idle, so parallel runs help
there; on a 2-core CPU use --jobs 1). Prints JSON: test AUC/ACC mean and std over the seeds, and
the wall-clock of each run (pretraining counted in the MAE row).
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae.benchmarks"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

DATASETS = {
    "adrenalmnist3d_28": {"flag": "adrenalmnist3d", "size": 28, "vit": "vit3d_tiny_patch7", "patch": 7,
                          "resnet": "resnet18_3d"},
    "adrenalmnist3d_64": {"flag": "adrenalmnist3d", "size": 64, "vit": "vit3d_tiny_patch16", "patch": 16,
                          "resnet": "resnet18_3d"},
    "breastmnist_28": {"flag": "breastmnist", "size": 28, "vit": "vit_tiny_patch4", "patch": 4,
                       "resnet": "resnet18_2d"},
}


def commands(name: str, method: str, args: argparse.Namespace) -> list[list[str]]:
    data = DATASETS[name]
    out = Path(args.work_dir) / name / method
    base = ["--data_flag", data["flag"], "--size", str(data["size"]), "--data_root", args.data_root]
    finetune = [sys.executable, "main_finetune.py", *base, "--seeds", args.seeds, "--output_dir", str(out),
                "--num_workers", "0", "--overwrite"]
    if method == "resnet18_medmnist":
        return [[*finetune, "--model", data["resnet"], "--recipe", "medmnist", "--epochs", str(args.resnet_epochs)]]
    setup = [*finetune, "--epochs", str(args.setup_epochs)]
    if args.train_samples:
        setup += ["--train_samples", str(args.train_samples)]
    if method == "slivit":
        return [[*setup, "--setup", "slivit", "--model", "slivit", "--slices", str(data["size"]),
                 "--slice_size", str(max(data["size"], 32))]]
    if method in ("vitmednet3d", "medvit3d_tiny"):
        return [[*setup, "--setup", "vitmednet", "--model", method]]
    vit = [*finetune, "--model", data["vit"], "--epochs", str(args.epochs), "--batch_size", "64", "--lr", str(args.lr)]
    if method == "vit_scratch":
        return [[*vit, "--layer_decay", "1.0"]]
    pretrain_dir = Path(args.work_dir) / name / "mae_pretrain"
    pretrain = [sys.executable, "main_pretrain.py", *base, "--model", "mae_vit_tiny_patch16",
                "--patch_size", str(data["patch"]), "--decoder_embed_dim", "192", "--decoder_depth", "2",
                "--decoder_num_heads", "3", "--mask_ratio", str(args.mask_ratio), "--norm_pix_loss",
                "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "10", "--batch_size", "64",
                "--lr", str(args.pretrain_lr), "--num_workers", "2", "--output_dir", str(pretrain_dir), "--log_every", "50",
                "--vis_every", "0", "--keep_every", "0"]
    if (pretrain_dir / "encoder.pth").exists():  # one MAE serves every method that starts from it
        pretrain = None
    if method == "vit_mae_vitmednet":
        finetuning = [*setup, "--setup", "vitmednet", "--model", data["vit"], "--layer_decay", "0.75"]
    else:
        finetuning = [*vit, "--layer_decay", "0.75"]
    return [c for c in (pretrain, [*finetuning, "--finetune", str(pretrain_dir / "encoder.pth")]) if c]


def run(job: tuple[str, str], args: argparse.Namespace) -> dict:
    name, method = job
    start = time.perf_counter()
    for command in commands(name, method, args):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if result.returncode != 0:
            return {"error": f"{' '.join(command[1:3])} exited {result.returncode}: {result.stderr[-1500:]}"}
    summary = json.loads((Path(args.work_dir) / name / method / "results.json").read_text())
    if "seeds" in summary:  # several seeds: their mean and std
        test, seconds = summary["test"], summary["seconds"]["mean"]
    else:
        test = {k: {"mean": summary["test"][k], "std": 0.0} for k in ("auc", "acc")}
        seconds = summary["seconds"]
    return {"auc_mean": test["auc"]["mean"], "auc_std": test["auc"]["std"], "acc_mean": test["acc"]["mean"],
            "acc_std": test["acc"]["std"], "wall_clock_s": round(time.perf_counter() - start, 1),
            "fine_tune_seconds_per_seed": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default="vit_scratch,vit_mae,resnet18_medmnist")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=50, help="ViT fine-tuning epochs")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--pretrain_epochs", type=int, default=200)
    parser.add_argument("--pretrain_lr", type=float, default=1.5e-3, help="absolute: the blr rule gives too little at small batches")
    parser.add_argument("--mask_ratio", type=float, default=0.75)
    parser.add_argument("--resnet_epochs", type=int, default=100, help="the MedMNIST recipe's 100")
    parser.add_argument("--setup_epochs", type=int, default=100, help="epochs of the setup methods (early stopping may end sooner)")
    parser.add_argument("--train_samples", type=int, default=None, help="setup methods: train on N samples (CPU smoke runs)")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--work_dir", default="/tmp/volmae_medmnist")
    parser.add_argument("--skip", default="", help="comma-separated dataset/method pairs to leave out")
    parser.add_argument("--progress_file", default=None, help="also append each finished run here as a JSON line")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    jobs = [(d, m) for d in args.datasets.split(",") for m in args.methods.split(",") if f"{d}/{m}" not in skip]
    start = time.perf_counter()

    def run_and_record(job):
        result = run(job, args)
        if args.progress_file:
            with open(args.progress_file, "a") as f:
                f.write(json.dumps({"run": "/".join(job), **result}) + "\n")
        return result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(jobs, pool.map(run_and_record, jobs)))
    table = {f"{d}/{m}": r for (d, m), r in results.items()}
    print(json.dumps({"benchmark": "medmnist_results", "seeds": args.seeds, "vit_epochs": args.epochs,
                      "pretrain_epochs": args.pretrain_epochs, "resnet_epochs": args.resnet_epochs,
                      "total_wall_clock_s": round(time.perf_counter() - start, 1), "results": table}, indent=2))


if __name__ == "__main__":
    main()
