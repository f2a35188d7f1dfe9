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
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .datasets.cases import CaseDataset, CasesError, InputSpec, collate_cases, read_cases
from .inference.checkpoints import PretrainingCheckpoint, load_checkpoint
from .inference.ensemble_folder import is_ensemble
from .inference.exported import (
    CARD_FILE,
    CONFIG_FILE,
    CONFIG_HASH_KEY,
    ONNX_FILE,
    WEIGHTS_FILE,
    definition_sha256,
    export_config,
    refuse_folder,
    write_config,
    write_weights,
)
from .inference.load_model import LoadedModel, NotAVolMAECheckpoint, load_for_inference
from .inference.model_card import LAYOUT, card_facts, render_card
from .inference.monai_vit import (
    VOLMAE_LAYER_NORM_EPS,
    UnmappableEncoder,
    monai_vit_kwargs,
    monai_vit_weights,
    set_layer_norm_eps,
)
from .inference.onnx_runtime import ONNX_INPUT, OnnxModel, PooledEmbedding
from .models.mae3d import PRETRAINING_ONLY_PREFIXES
from .util.atomic import atomic_write
from .util.checkpoint import CheckpointError, atomic_save
from .util.cli import HelpFormatter, run_main
from .util.errors import DataError, UsageError
from .util.folder_swap import building, recover
from .util.run_state import unfinished_reason
from .volumes.phantoms import write_phantom_corpus

FORMATS = ("safetensors", "onnx", "monai")
ONNX_TOLERANCE = 1e-4
MONAI_TOLERANCE = 1e-5
CHECK_CASES = 4


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
    output.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in OUTPUT_DIR, once the new one is complete and checked")
    return parser


def read_results(checkpoint_path: Path) -> dict | None:
    """The fine-tuning run's results.json beside its best.pth or final_model folder (symlinks resolved), for the
    card's scores and floors."""
    path = checkpoint_path.parent / "results.json"
    own = checkpoint_path.is_file() or is_ensemble(checkpoint_path)
    return json.loads(path.read_text()) if own and path.is_file() else None


def check_inputs(args: argparse.Namespace, loaded: LoadedModel, source: Path) -> tuple[torch.Tensor, str]:
    """Up to CHECK_CASES preprocessed volumes to compare an export with PyTorch on, and where they came from:
    --check_csv, else the run's own test cases, else synthetic CT phantoms written for the check."""
    spec = InputSpec.from_meta(loaded.meta)
    csv = Path(args.check_csv) if args.check_csv else source.parent / "test_scores.csv"
    with tempfile.TemporaryDirectory() as phantoms:
        if csv.is_file():
            try:
                table = read_cases(csv, "path", "id", path_flag=None)
            except CasesError as err:
                raise UsageError(f"--check_csv: {err}") from None
            paths, base, where = list(table["path"][:CHECK_CASES]), csv.resolve().parent, str(csv)
        else:
            write_phantom_corpus(phantoms, count=CHECK_CASES, seed=0, progress=False)
            paths = [str(p) for p in sorted(Path(phantoms).glob("*.nii.gz"))[:CHECK_CASES]]
            base, where = Path(phantoms), "synthetic CT phantoms (volumes.phantoms)"
        batch = collate_cases([CaseDataset(paths, base, spec)[i] for i in range(len(paths))])
    if batch["input"] is None:
        raise DataError(f"none of the check cases from {where} could be read ({batch['failed'][:1]})")
    return batch["input"], where


def tag_onnx(path: Path, config_hash: str) -> None:
    """Write the config hash into the graph's metadata_props, so that the file names the config it belongs to."""
    import onnx

    graph = onnx.load(str(path))
    entry = graph.metadata_props.add()
    entry.key, entry.value = CONFIG_HASH_KEY, config_hash
    atomic_write(path, lambda tmp: onnx.save(graph, str(tmp)))


def export_onnx(args: argparse.Namespace, loaded: LoadedModel, source: Path, out: Path, config_hash: str) -> dict:
    """model.onnx, traced by torch.export, tagged with the config hash and checked with onnxruntime; its record."""
    module = loaded.model if loaded.is_classifier else PooledEmbedding(loaded.model)
    module.eval()
    volumes, where = check_inputs(args, loaded, source)
    example = volumes[:2] if len(volumes) > 1 else volumes.repeat(2, *[1] * (volumes.dim() - 1))
    output = "logits" if loaded.is_classifier else "embedding"
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[output],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    path = out / ONNX_FILE
    program.save(str(path))
    tag_onnx(path, config_hash)
    with torch.no_grad():
        expected = module(volumes).float().numpy()
    actual = OnnxModel(path, output)(volumes).numpy()
    difference = float(np.abs(actual - expected).max())
    if not difference <= ONNX_TOLERANCE:
        raise DataError(f"the ONNX graph differs from PyTorch by {difference:.2e} (more than "
                        f"{ONNX_TOLERANCE:g}) on {len(volumes)} volumes from {where}; nothing was exported")
    print(f"onnx: {output} of {len(volumes)} volumes from {where} agree with PyTorch to {difference:.2e}")
    return {"file": path.name, "input": ONNX_INPUT, "output": output, "batch_axis": "dynamic",
            "checked_on": where, "checked_volumes": len(volumes), "max_abs_difference": difference,
            "opset": int(program.model_proto.opset_import[0].version)}


def export_monai(args: argparse.Namespace, checkpoint: dict, loaded: LoadedModel, source: Path, out: Path) -> dict:
    """monai_vit.pt (a MONAI ViT state dict) and monai_vit.json (its kwargs), checked: the MONAI ViT's hidden
    states equal the VolMAE encoder's tokens on real (or phantom) volumes."""
    from monai.networks.nets import ViT

    try:
        kwargs = monai_vit_kwargs(checkpoint["model_config"])
        mapped = monai_vit_weights(checkpoint["model"], checkpoint["model_config"])
    except UnmappableEncoder as err:
        raise UsageError(f"cannot map {checkpoint.get('model_name')} to MONAI's ViT: {err}") from None
    vit = ViT(**kwargs)
    state = {**vit.state_dict(), **mapped}
    vit.load_state_dict(state, strict=True)
    volumes, where = check_inputs(args, loaded, source)
    with torch.no_grad():
        expected = loaded.model.forward_features(volumes)
        default_eps = vit.eval().norm(vit(volumes)[1][-1])
        set_layer_norm_eps(vit)
        actual = vit.norm(vit(volumes)[1][-1])
    difference = float((actual - expected).abs().max())
    if not difference <= MONAI_TOLERANCE:
        raise DataError(f"MONAI's ViT differs from the VolMAE encoder by {difference:.2e} (more than "
                        f"{MONAI_TOLERANCE:g}) on {len(volumes)} volumes from {where}; nothing was exported")
    atomic_save(state, out / "monai_vit.pt")
    record = {"kwargs": kwargs, "layer_norm_eps": VOLMAE_LAYER_NORM_EPS, "input_layout": LAYOUT,
              "checked_on": where, "checked_volumes": len(volumes), "max_abs_difference": difference,
              "max_abs_difference_with_monai_default_eps": float((default_eps - expected).abs().max()),
              "usage": "vit = monai.networks.nets.ViT(**kwargs); vit.load_state_dict(torch.load('monai_vit.pt', "
                       "weights_only=True)); then set every nn.LayerNorm's eps to layer_norm_eps; hidden states "
                       "[N, 1 + L, E] (class token first) equal VolMAE's encoder tokens. UNETR builds its ViT "
                       "without the class token: load with strict=False there, and its features differ from "
                       "VolMAE's by the class token's share of attention."}
    atomic_write(out / "monai_vit.json", lambda tmp: tmp.write_text(json.dumps(record, indent=2)))
    print(f"monai: the ViT's hidden states of {len(volumes)} volumes from {where} equal the encoder's to "
          f"{difference:.2e}")
    return {"monai": {"file": "monai_vit.pt", "kwargs_file": "monai_vit.json", "max_abs_difference": difference}}


def refuse_run_folder(out: Path, source: Path) -> None:
    """An export never goes into the folder of the checkpoint it exports, or into a folder above it: those hold
    the run it came from."""
    if out == source.parent or out in source.parent.parents:
        where = "the checkpoint's own folder" if out == source.parent else f"a folder that holds {source}"
        raise UsageError(f"--output_dir {out} is {where}; export into a folder of its own (e.g. {source.parent / 'export'})")


def exportable(checkpoint: dict | None, loaded: LoadedModel, source: Path) -> dict:
    """What the export carries: the weights and the checkpoint's plain entries (the model, classes,
    preprocessing, data), never a resume checkpoint's optimizer or random state. An MAE gives its encoder; an
    ensemble of fold models all its members' weights (members.<i>.)."""
    if loaded.is_classifier:
        return {**loaded.meta, "model": loaded.model.state_dict()}
    mae = PretrainingCheckpoint.from_dict(checkpoint, source)
    encoder = {k: v for k, v in mae.weights.items() if not k.startswith(PRETRAINING_ONLY_PREFIXES)}
    return {**mae.state(), "model": encoder, "input_size": loaded.meta["input_size"]}


def write_export(args: argparse.Namespace, checkpoint: dict, loaded: LoadedModel, source: Path, out: Path) -> list[str]:
    """Every file of the export into `out` (a fresh folder), config.json last; the names of the files."""
    card = card_facts(checkpoint, read_results(source), source)
    config = export_config(checkpoint, card, {"export_format": args.format})
    config_hash = definition_sha256(config)
    if args.format == "safetensors":
        write_weights(out, checkpoint["model"], config_hash)
        files = [WEIGHTS_FILE]
    elif args.format == "onnx":
        config["onnx"] = export_onnx(args, loaded, source, out, config_hash)
        files = [ONNX_FILE]
    else:
        config.update(export_monai(args, checkpoint, loaded, source, out))
        files = ["monai_vit.pt", "monai_vit.json"]
    card_text = render_card(card, [*files, CONFIG_FILE])
    atomic_write(out / CARD_FILE, lambda tmp: tmp.write_text(card_text))
    write_config(out, config, [*files, CARD_FILE])
    return [*files, CONFIG_FILE, CARD_FILE]


def main(args: argparse.Namespace) -> int:
    source = Path(args.checkpoint).resolve()  # a symlink's run records are beside its target
    out = Path(args.output_dir).resolve()  # a symlinked folder: the export it points to is replaced
    refuse_run_folder(out, source)
    for note in recover(out):
        print(f"note: {note}")
    refuse_folder(out, args.overwrite)
    if args.check_csv and not Path(args.check_csv).is_file():
        raise UsageError(f"--check_csv {args.check_csv}: no such file")
    try:
        loaded = load_for_inference(source, allow_encoder=True)
        checkpoint = None if loaded.is_classifier else load_checkpoint(source)
    except (FileNotFoundError, CheckpointError, NotAVolMAECheckpoint) as err:
        raise DataError(f"cannot export {args.checkpoint}: {err}") from None
    if args.format == "monai" and loaded.is_classifier:
        raise UsageError("--format monai takes a pretrained encoder (encoder.pth or model.pth of volmae-pretrain); "
                         "export a classifier as safetensors or onnx")
    reason = unfinished_reason(source, loaded.is_classifier)
    if reason and not args.allow_unfinished:
        raise UsageError(f"{args.checkpoint} is not a finished run's model: {reason}; wait for it, or add "
                         f"--allow_unfinished to export it as it is")
    if reason:
        print(f"warning: exporting an unfinished run's checkpoint: {reason}")
    with building(out) as staging:
        files = write_export(args, exportable(checkpoint, loaded, source), loaded, source, staging)
    print(f"exported {args.checkpoint} as {args.format} to {out}: {', '.join(files)}")
    return 0


def cli() -> None:
    """The `volmae-export` command: the same as `python main_export.py`."""
    sys.exit(run_main(main, get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
