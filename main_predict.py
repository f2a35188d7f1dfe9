"""Predict a CSV of cases with a fine-tuned VolMAE classifier; optionally export encoder embeddings.

    python main_predict.py --checkpoint runs/ft/best.pth --input_csv cases.csv --output_csv predictions.csv
    python main_predict.py --checkpoint runs/mae/encoder.pth --input_csv cases.csv --embeddings emb.h5
    python main_predict.py --checkpoint runs/ft/best.pth --input_csv cases.csv --output_csv p.csv --explain maps/

The input needs a path column (--path_col) and may have an id column (--id_col); every column
passes through. Preprocessing and class names come from the checkpoint. The output has one row per
input row, in order: the input columns, prob_<class> for each class, pred_index, pred_label,
status (ok/error) and error. A row that cannot be read is an `error` row; the others are predicted.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import sys
from dataclasses import fields

from .inference.predict import EMBEDDING_TYPES, PredictionRequest, run_prediction
from .util.cli import HelpFormatter, non_negative_int, positive_int, run_main
from .util.dist import init_distributed, shutdown


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    inputs = parser.add_argument_group("input")
    inputs.add_argument("--checkpoint", required=True, help="best.pth of main_finetune.py (or an MAE checkpoint "
                                                            "or encoder.pth, for --embeddings only)")
    inputs.add_argument("--input_csv", required=True,
                        help="one case per row: a volume file, DICOM folder, npy, or CACHE::KEY, relative to the CSV")
    inputs.add_argument("--path_col", default="path", help="the column naming each case's volume")
    inputs.add_argument("--allow_external_data", action="store_true",
                        help="let a detached header (.mhd, .nhdr) name a data file outside its own folder")
    inputs.add_argument("--id_col", default="id", help="the column identifying each case, when the CSV has it (else the row number)")

    outputs = parser.add_argument_group("output")
    outputs.add_argument("--output_csv", default=None,
                         help="predictions, one row per input row, with a status and reason (required with a classifier)")
    outputs.add_argument("--overwrite", action="store_true", help="replace an existing output")
    outputs.add_argument("--embeddings", default=None, help="also write encoder features: OUT.npy (rows in input "
                         "order, NaN for error rows) or OUT.h5 (one dataset per ok row, keyed by id)")
    outputs.add_argument("--embedding_type", choices=EMBEDDING_TYPES, default="mean",
                         help="ViTs: mean of patch tokens, class token, or both; CNNs: their pooled features")
    outputs.add_argument("--explain", default=None, metavar="DIR",
                         help="also explain every row's prediction (attention rollout for ViTs, Grad-CAM otherwise): "
                              "DIR/<id or rowN>.npy/.nii.gz/_overlay.png/_montage.png; the overlay's path goes in "
                              "the output's `explanation` column")

    device = parser.add_argument_group("device")
    device.add_argument("--batch_size", type=positive_int, default=8, help="cases per forward pass")
    device.add_argument("--num_workers", type=non_negative_int, default=0, help="processes reading volumes (0: in the main one)")
    device.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    device.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (scores independent of the batch)")
    return parser


def main(args: argparse.Namespace) -> int:
    dist_info = init_distributed(args.device)
    run_prediction(PredictionRequest(**{f.name: getattr(args, f.name) for f in fields(PredictionRequest)}), dist_info)
    shutdown()
    return 0


def cli() -> None:
    """The `volmae-predict` command: the same as `python main_predict.py`."""
    sys.exit(run_main(main, get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
