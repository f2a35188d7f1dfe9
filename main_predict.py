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
import os
import re
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .datasets.cases import CaseDataset, InputSpec, collate_cases, read_cases
from .inference.load_model import LoadedModel, load_for_inference
from .inference.onnx_runtime import OnnxModel
from .models.ensemble import ProbabilityEnsemble
from .util.atomic import atomic_write
from .util.capped import print_capped
from .util.cli import HelpFormatter, non_negative_int, positive_int, run_main
from .util.dist import init_distributed, shutdown
from .util.errors import UsageError
from .util.explain import explain_predictions
from .util.metrics import MULTI_LABEL, scores_from_logits
from .util.sampler import ShardSampler
from .util.train_backend import AUTOCAST_DTYPES, resolve_precision

EMBEDDING_TYPES = ("mean", "cls", "concat")


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


def unwritable_reason(target: Path, overwrite: bool) -> str | None:
    """Why `target` cannot be written as a file, checked before any volume is read so no work is lost."""
    if target.is_dir():
        return "is a directory"
    if target.exists() and not overwrite:
        return "exists; pass --overwrite to replace it"
    parent = target.parent
    if not parent.is_dir():
        return f"its folder {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"its folder {parent} is not writable"
    return None


def check_outputs(args: argparse.Namespace) -> None:
    """Refuse before any work: outputs that cannot be written (or would be overwritten without --overwrite),
    unknown embedding formats."""
    if args.explain and not args.output_csv:
        raise UsageError("--explain explains predictions; give --output_csv too")
    for target in filter(None, (args.output_csv, args.embeddings)):
        if reason := unwritable_reason(Path(target), args.overwrite):
            raise UsageError(f"{target} {reason}")
    refuse_shared_paths(args)
    if args.explain and Path(args.explain).exists() and not Path(args.explain).is_dir():
        raise UsageError(f"--explain {args.explain} is a file, not a folder")
    if args.embeddings and Path(args.embeddings).suffix.lower() not in (".npy", ".h5"):
        raise UsageError(f"--embeddings must end in .npy or .h5, got {args.embeddings}")


def refuse_shared_paths(args: argparse.Namespace) -> None:
    """Each output a file of its own, never one of the inputs: --output_csv equal to --embeddings would replace
    the scores with the array, and an output over the input CSV or checkpoint would destroy it."""
    named = [(flag, getattr(args, flag)) for flag in ("output_csv", "embeddings", "explain", "input_csv", "checkpoint")
             if getattr(args, flag)]
    for i, (flag, path) in enumerate(named):
        for other, other_path in named[i + 1:]:
            if Path(path).resolve() == Path(other_path).resolve() and flag in ("output_csv", "embeddings", "explain"):
                raise UsageError(f"--{flag} and --{other} are the same path ({path}); give each output its "
                                 f"own file")


def unique_names(values: list[str]) -> list[str]:
    """`values` made safe for a file or HDF5 key and unique: a clash after sanitising (`a/b` and `a_b`) gets a
    suffix (`a_b-2`), so no case takes another's file; callers keep the mapping beside the id."""
    taken, names = set(), []
    for value in values:
        base = re.sub(r"[^A-Za-z0-9._-]", "_", value)
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        names.append(name)
    return names


def embed(model: torch.nn.Module, features: torch.Tensor, kind: str) -> torch.Tensor:
    """The embedding of `model.forward_features` (models.contract): tokens [N, T, E] pooled as `kind`; feature
    maps pooled as the head pools them."""
    if features.dim() != 3:
        if kind != "mean":
            raise UsageError(f"--embedding_type {kind} needs tokens; this model gives feature maps (mean)")
        return model.forward_head(features, pre_logits=True)
    cls, mean = features[:, 0], features[:, 1:].mean(dim=1)
    return {"cls": cls, "mean": mean, "concat": torch.cat([cls, mean], dim=-1)}[kind]


def explanation_names(table: pd.DataFrame, id_col: str) -> list[str]:
    """File names for each row's explanation: its id made safe for a file name, else row<N> (0-based)."""
    if id_col not in table.columns:
        return [f"row{row}" for row in range(len(table))]
    return unique_names([str(value) or f"row{row}" for row, value in enumerate(table[id_col])])


def refuse_onnx_limits(args: argparse.Namespace, loaded: LoadedModel) -> None:
    """An ONNX graph computes one output: a classifier's logits (no features to embed, no gradients to explain),
    or an encoder's mean-pooled embedding. An ensemble of fold models has no single feature vector or map."""
    if isinstance(loaded.model, ProbabilityEnsemble) and (args.embeddings or args.explain):
        raise UsageError(f"{args.checkpoint} is an ensemble of {loaded.meta['ensemble']['members']} fold models: it "
                         f"predicts their mean probability; --embeddings and --explain need one model (a member, "
                         f"e.g. fold_0.pth of a final_model folder)")
    if not isinstance(loaded.model, OnnxModel):
        return
    if args.explain:
        raise UsageError(f"--explain needs gradients through the model, which an ONNX export does not give; explain "
                         f"with the run's best.pth or a safetensors export of it ({args.checkpoint})")
    if args.embeddings and loaded.is_classifier:
        raise UsageError(f"{args.checkpoint} is an ONNX classifier: it gives logits only; for --embeddings use the "
                         f"best.pth or a safetensors export, or an ONNX export of the encoder")
    if args.embeddings and args.embedding_type != "mean":
        raise UsageError(f"an ONNX encoder export gives the mean of the patch tokens only; --embedding_type "
                         f"{args.embedding_type} needs the encoder.pth or a safetensors export")


def predict_rows(loaded: LoadedModel, dataset: CaseDataset, args, dist_info, names: list[str]) -> dict[int, dict]:
    """This rank's rows: {row: {"scores", "embedding", "error", "explanation"}}."""
    device = dist_info.device
    model = loaded.model.to(device)
    dtype = AUTOCAST_DTYPES[resolve_precision(args.precision, device)]
    task = loaded.meta.get("task")
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers, collate_fn=collate_cases,
                        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size))
    results = {}
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not dist_info.is_main):
        for row, error in batch["failed"]:
            results[row] = {"error": error}
        if batch["input"] is None:
            continue
        x = batch["input"].to(device)
        # explanations need gradients; otherwise inference mode (no autograd bookkeeping at all)
        with torch.no_grad() if args.explain else torch.inference_mode(), \
                torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = model.forward_features(x)
            logits = model.forward_head(features) if loaded.is_classifier else None
            scores = None if logits is None else scores_from_logits(logits.float(), task).cpu().numpy()
            embedding = embed(model, features, args.embedding_type).float().cpu().numpy() if args.embeddings else None
        overlays = [""] * len(batch["rows"])
        if args.explain:
            overlays = [str(path) for path in explain_predictions(model, x, scores, task, loaded.meta["class_names"],
                                                                  Path(args.explain), [names[r] for r in batch["rows"]])]
        for i, row in enumerate(batch["rows"]):
            results[row] = {"error": "", "scores": None if scores is None else scores[i],
                            "embedding": None if embedding is None else embedding[i], "explanation": overlays[i]}
    return results


def gather(results: dict, dist_info) -> dict:
    if not dist_info.distributed:
        return results
    parts = [None] * dist_info.world_size
    torch_dist.all_gather_object(parts, results)
    return {row: value for part in parts for row, value in part.items()}


def prediction_table(table: pd.DataFrame, results: dict, meta: dict, is_classifier: bool,
                     explained: bool = False) -> pd.DataFrame:
    out = table.copy()
    ok = [not results[row]["error"] for row in range(len(table))]
    if is_classifier:
        names = meta["class_names"]
        scores = np.full((len(table), len(names)), np.nan)
        for row in range(len(table)):
            if ok[row]:
                scores[row] = results[row]["scores"]
        for j, name in enumerate(names):
            out[f"prob_{name}"] = scores[:, j]
        if meta.get("task") == MULTI_LABEL:
            out["pred_index"] = pd.array([pd.NA] * len(table), dtype="Int64")
            out["pred_label"] = [";".join(n for n, s in zip(names, scores[r]) if s > 0.5) if ok[r] else ""
                                 for r in range(len(table))]
        else:
            index = pd.array([int(np.argmax(scores[r])) if ok[r] else pd.NA for r in range(len(table))], dtype="Int64")
            out["pred_index"] = index
            out["pred_label"] = [names[int(i)] if ok[r] else "" for r, i in enumerate(index)]
    if explained:
        out["explanation"] = [results[row].get("explanation", "") for row in range(len(table))]
    out["status"] = ["ok" if flag else "error" for flag in ok]
    out["error"] = [results[row]["error"] for row in range(len(table))]
    return out


def write_embeddings(path: Path, table: pd.DataFrame, results: dict, id_col: str, kind: str,
                     overwrite: bool) -> None:
    rows = range(len(table))
    dim = next(len(results[r]["embedding"]) for r in rows if not results[r]["error"])
    if path.suffix.lower() == ".npy":
        array = np.full((len(table), dim), np.nan, dtype=np.float32)
        for r in rows:
            if not results[r]["error"]:
                array[r] = results[r]["embedding"]
        atomic_write(path, lambda tmp: np.save(tmp, array), replace=overwrite)
        return
    ids = [str(v) for v in table[id_col]] if id_col in table.columns else [str(r) for r in rows]
    keys = embedding_keys(table, id_col)

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            f.attrs["embedding_type"] = kind
            f.attrs["key_column"] = id_col if id_col in table.columns else "row"
            for r in rows:
                if not results[r]["error"]:
                    f.create_dataset(keys[r], data=results[r]["embedding"]).attrs["id"] = ids[r]

    atomic_write(path, write, replace=overwrite)


def embedding_keys(table: pd.DataFrame, id_col: str) -> list[str]:
    """Each row's key in an .h5 of embeddings: its id made a unique HDF5 name (the CSV's `embedding_key`)."""
    return unique_names([str(v) for v in table[id_col]] if id_col in table.columns else
                        [str(r) for r in range(len(table))])


def main(args: argparse.Namespace) -> int:
    dist_info = init_distributed(args.device)
    check_outputs(args)
    loaded = load_for_inference(args.checkpoint, allow_encoder=bool(args.embeddings))
    table = read_cases(args.input_csv, args.path_col, args.id_col)
    if loaded.is_classifier and not args.output_csv:
        raise UsageError("--output_csv is required to predict with a classifier")
    if args.explain and not loaded.is_classifier:
        raise UsageError("--explain needs a fine-tuned classifier; this checkpoint is an encoder")
    if not args.output_csv and not args.embeddings:
        raise UsageError("nothing to write: give --output_csv and/or --embeddings")
    refuse_onnx_limits(args, loaded)
    spec = InputSpec.from_meta(loaded.meta, args.allow_external_data)
    dataset = CaseDataset(list(table[args.path_col]), Path(args.input_csv).resolve().parent, spec)
    start = time.perf_counter()
    names = explanation_names(table, args.id_col)
    results = gather(predict_rows(loaded, dataset, args, dist_info, names), dist_info)
    seconds = time.perf_counter() - start
    if dist_info.is_main:
        ok = sum(1 for r in results.values() if not r["error"])
        if args.output_csv:
            output = prediction_table(table, results, loaded.meta, loaded.is_classifier, bool(args.explain))
            if args.embeddings and Path(args.embeddings).suffix.lower() == ".h5":
                output["embedding_key"] = embedding_keys(table, args.id_col)
            atomic_write(Path(args.output_csv), lambda tmp: output.to_csv(tmp, index=False), replace=args.overwrite)
        written = [args.output_csv] if args.output_csv else []
        if args.embeddings and ok:
            write_embeddings(Path(args.embeddings), table, results, args.id_col, args.embedding_type, args.overwrite)
            written.append(args.embeddings)
        print(f"{len(table)} rows: {ok} ok, {len(table) - ok} error; {ok / max(seconds, 1e-9):.2f} volumes/s "
              f"on {dist_info.world_size} rank(s); wrote {', '.join(written) or 'nothing'}")
        if args.embeddings and not ok:
            print(f"not written: {args.embeddings} (no row could be read, so there is no embedding to store)",
                  file=sys.stderr)
        errors = [f"row {row + 2} ({table[args.path_col].iloc[row]}): {value['error']}"
                  for row, value in sorted(results.items()) if value["error"]]
        if errors:
            print_capped(f"{len(errors)} row(s) could not be predicted:", errors,
                         Path(args.output_csv) if args.output_csv else None, sys.stderr)
    shutdown()
    return 0


def cli() -> None:
    """The `volmae-predict` command: the same as `python main_predict.py`."""
    sys.exit(run_main(main, get_args_parser().parse_args()))


if __name__ == "__main__":
    cli()
