"""The whole mission on built-in data, as the commands a user types: labelled synthetic CT phantoms (half with
a lung mass) written as NIfTI, cached in sharded HDF5, a 3D MAE pretrained on the cache, a classifier
fine-tuned from its encoder on the labels CSV, held-back phantoms predicted with explanations, and a summary.

    launch/recipes/demo.sh                      # what `make demo` runs: about 4 minutes on 2 CPU cores
    launch/recipes/demo.sh --output_dir /tmp/demo --pretrain_epochs 2 --finetune_epochs 30   # the suite's budget

Every step's output goes to OUTPUT_DIR/logs/; OUTPUT_DIR/summary.json holds the figures the summary prints.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

from ..util.cli import HelpFormatter, positive_int
from ..util.strict_json import write_json
from .own_data import own_data_lines
from .steps import run

# The small hybrid ViT of the recipes (a conv stem, 4 blocks of 96) with their small decoder
MODEL = ["--model", "auto", "--decoder_embed_dim", "96", "--decoder_depth", "2", "--decoder_num_heads", "3"]
# A lung mass is a few dozen of the 32^3 voxels. After a short pretraining, the default layer decay (0.75) did
# not find it in 60 epochs (docs/results.md, the demo); one lr for every layer and flips find it within the budget.
FINETUNE = ["--layer_decay", "1.0", "--augment", "flips"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/recipes/demo.sh", description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("built-in data")
    data.add_argument("--count", type=positive_int, default=320, help="labelled phantoms to pretrain and fine-tune on")
    data.add_argument("--held_back", type=positive_int, default=16, help="phantoms kept out of training, then predicted")
    data.add_argument("--size", type=positive_int, default=32, help="cached grid, N^3 voxels")
    data.add_argument("--workers", type=positive_int, default=2, help="processes that build the cache")
    steps = parser.add_argument_group("steps")
    steps.add_argument("--output_dir", default="demo_output", help="everything the demo writes (made if missing)")
    steps.add_argument("--pretrain_epochs", type=positive_int, default=10, help="MAE pretraining epochs")
    steps.add_argument("--finetune_epochs", type=positive_int, default=40, help="fine-tuning epochs")
    steps.add_argument("--seed", type=int, default=0, help="seed of the pretraining and the fine-tuning")
    return parser


def write_cases(out: Path, held_back_labels: Path) -> Path:
    """cases.csv for prediction: id, path (relative to it) and the true label, which prediction passes through."""
    rows = pd.read_csv(held_back_labels)
    cases = pd.DataFrame({"id": rows["patient_id"], "path": [f"{held_back_labels.parent.name}/{p}" for p in rows["path"]],
                          "lesion": rows["lesion"]})
    cases.to_csv(out / "cases.csv", index=False)
    return out / "cases.csv"


def summarise(out: Path, seconds: float) -> dict:
    """The fine-tuned classifier's test scores beside the majority share, and the held-back predictions scored."""
    results = json.loads((out / "finetune" / "results.json").read_text())
    test = results["test"]
    supports = [entry["support"] for entry in test["per_class"].values()]
    predictions = pd.read_csv(out / "predictions.csv")
    ok = predictions[predictions["status"] == "ok"]
    positive = ok["prob_lesion=1"]  # prediction names its columns prob_<class>, the class being lesion=1
    return {
        "test_auc": test["auc"], "test_acc": test["acc"], "test_n": test["n"], "test_at_prior": test["at_prior"],
        "test_majority_share": max(supports) / sum(supports),
        "collapsed": results["collapsed"],
        "held_back_n": len(predictions), "held_back_ok": len(ok),
        "held_back_auc": float(roc_auc_score(ok["lesion"], positive)) if ok["lesion"].nunique() == 2 else None,
        "held_back_acc": float((ok["pred_index"] == ok["lesion"]).mean()),
        "held_back_predicted_classes": sorted(int(c) for c in ok["pred_index"].unique()),
        "wall_seconds": round(seconds, 1),
    }


def print_summary(out: Path, summary: dict) -> None:
    own_data = "\n".join(own_data_lines("  "))
    explained = sorted((out / "explanations").glob("*_overlay.png"))
    held_back_auc = "undefined (one class)" if summary["held_back_auc"] is None else f"{summary['held_back_auc']:.3f}"
    print(f"""
VolMAE demo finished in {summary['wall_seconds'] / 60:.1f} minutes.

The classifier (MAE encoder, fine-tuned on {out}/phantoms/labels.csv: lung mass or not)
  test split: AUC {summary['test_auc']:.3f}, accuracy {summary['test_acc']:.3f} on {summary['test_n']} phantoms \
(majority share {summary['test_majority_share']:.3f}{'; AT THE CLASS PRIOR' if summary['test_at_prior'] else ''})
  {summary['held_back_n']} held-back phantoms: AUC {held_back_auc}, accuracy {summary['held_back_acc']:.3f}

Where everything is
  MAE encoder          {out}/pretrain/encoder.pth  (reconstructions: {out}/pretrain/reconstruction.png)
  classifier           {out}/finetune/best.pth  (results.json, roc_curve.png, test_scores.csv beside it)
  predictions          {out}/predictions.csv
  explanation overlay  {explained[0] if explained else out / 'explanations'}
  tensorboard          tensorboard --logdir {out}
  step logs            {out}/logs/

The same on your own folder of scans and a labels CSV (path, label and patient columns; here malignant and
patient_id), predicting new cases with the final model (the ensemble of the 5 fold models):
{own_data}
""")


def run_study(args: argparse.Namespace) -> int:
    out = Path(args.output_dir).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    start = time.perf_counter()

    run([python, "main_phantoms.py", "--output", str(out / "phantoms"), "--count", str(args.count),
         "--lesions"], logs / "phantoms.log", done=logs / "phantoms.done")
    held_back = out / "held_back"
    run([python, "main_phantoms.py", "--output", str(held_back), "--count", str(args.held_back),
         "--seed", "1", "--lesions"], logs / "held_back.log", done=logs / "held_back.done")
    cases = write_cases(out, held_back / "labels.csv")
    run([python, "main_cache.py", "--input", str(out / "phantoms"), "--output", str(out / "cache"),
         "--size", str(args.size), "--resample", "fit", "--workers", str(args.workers)], logs / "cache.log", done=logs / "cache.done")
    run([python, "main_pretrain.py", "--data_path", str(out / "cache"), *MODEL, "--input_size", str(args.size),
         "--batch_size", "8", "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "2", "--lr", "1.5e-3",
         "--num_workers", "1", "--log_every", "20", "--vis_every", "0", "--keep_every", "0", "--seed", str(args.seed),
         "--output_dir", str(out / "pretrain")], logs / "pretrain.log", done=logs / "pretrain.done")
    run([python, "main_finetune.py", "--setup", "volumes", "--meta", str(out / "phantoms" / "labels.csv"),
         "--label", "lesion", "--group", "patient_id", "--finetune", str(out / "pretrain" / "encoder.pth"),
         "--model", "auto", "--input_size", str(args.size), "--resample", "fit", "--batch_size", "8", "--lr", "1e-3",
         *FINETUNE, "--epochs", str(args.finetune_epochs), "--seeds", str(args.seed), "--bootstrap", "200",
         "--output_dir", str(out / "finetune"), "--overwrite",
         "--volume_cache", str(out / "volume_cache")], logs / "finetune.log", done=logs / "finetune.done")
    run([python, "main_predict.py", "--checkpoint", str(out / "finetune" / "best.pth"), "--input_csv", str(cases),
         "--output_csv", str(out / "predictions.csv"), "--explain", str(out / "explanations"), "--overwrite"],
        logs / "predict.log", done=logs / "predict.done")

    summary = summarise(out, time.perf_counter() - start)
    write_json(out / "summary.json", summary)
    print_summary(out, summary)
    return 0 if not summary["test_at_prior"] and np.isfinite(summary["test_auc"]) else 1

