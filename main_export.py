"""Export a VolMAE model to run elsewhere, with its preprocessing written beside the weights.

    python main_export.py --checkpoint runs/ft/best.pth --format safetensors --output_dir export/ft
    python main_export.py --checkpoint runs/ft/best.pth --format onnx --output_dir export/ft_onnx
    python main_export.py --checkpoint runs/mae/encoder.pth --format onnx --output_dir export/encoder

Every export writes config.json (the model, its input grid and layout, the full preprocessing; for a
classifier its classes, task and the run's scores with their floors; the data it saw) and MODEL_CARD.md.
`safetensors` writes model.safetensors: `volmae-predict --checkpoint DIR` and `volmae-finetune --finetune
DIR` take the folder, no pickle involved. `onnx` writes model.onnx (the classifier's logits, or the
encoder's mean-pooled embedding; a dynamic batch axis), checked against PyTorch with onnxruntime on real
volumes (the run's own test cases, or --check_csv); the export stops when they differ by more than 1e-4.
`monai` (plain patch-embedding ViT encoders such as mae_vit_*) writes monai_vit.pt, the weights as the state
dict of monai.networks.nets.ViT, and monai_vit.json, the arguments that build it; its hidden states are
checked to equal the encoder's tokens within 1e-5. A hybrid stem or MedViT-3D is refused: they do not map.

config.json records the hash of every file and the weights carry the hash of config.json's model definition
(inference.exported), so an edited or swapped file is refused when read. The export is built beside OUTPUT_DIR and
swapped in once complete (util.folder_swap): a refused or killed export leaves the old one as it was, and a
folder holding anything an export did not write (a run folder, a user's files) is never written.
"""
if not __package__:  # run as a file (python, torchrun, a spawned worker): the relative imports below resolve
    __package__ = "volmae"  # in the installed package (PEP 366; docs/contributing.md, Imports)

import argparse
import sys
from dataclasses import fields

from .inference.export import FORMATS, ExportRequest, run_export
from .util.cli import HelpFormatter, run_main


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    source = parser.add_argument_group("model")
    source.add_argument("--checkpoint", required=True,
                        help="best.pth of volmae-finetune, or encoder.pth / model.pth of volmae-pretrain")
    source.add_argument("--allow_unfinished", action="store_true",
                        help="export a checkpoint whose run is still going or stopped before it finished (an "
                             "unfinished epoch); refused otherwise")
    source.add_argument("--check_csv", default=None,
                        help="ONNX and MONAI: cases (a path column) to compare the export with PyTorch on; default: "
                             "the run's test_scores.csv beside a best.pth, else synthetic CT phantoms")
    output = parser.add_argument_group("output")
    output.add_argument("--format", choices=FORMATS, default="safetensors", help="what to write (see above)")
    output.add_argument("--output_dir", required=True,
                        help="the export folder: new, empty, or holding an earlier export (then only with "
                             "--overwrite); never the checkpoint's own folder or a folder holding other files")
    output.add_argument("--onnx_fp16", action="store_true",
                        help="with --format onnx, also model_fp16.onnx (half precision), checked against the fp32 graph "
                             "with onnxruntime")
    output.add_argument("--license", default="other",
                        help="the model's license, as the Hub names them (apache-2.0, cc-by-4.0, ...): the card's "
                             "front matter and a bundle's LICENSE; the training data keep their own")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in OUTPUT_DIR, once the new one is complete and checked")
    return parser


def main(args: argparse.Namespace) -> int:
    run_export(ExportRequest(**{f.name: getattr(args, f.name) for f in fields(ExportRequest)}))
    return 0


def cli() -> None:
    """The `volmae-export` command: the same as `python main_export.py`."""
    sys.exit(run_main(main, get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
