"""Prediction (volmae-predict): a CSV of cases through a classifier, an encoder or an exported model, one output
row per input row, in order, with embeddings and explanations on request.

The rows are validated up front and every output is checked before any volume is read (no work is lost to a
folder that cannot be written). Preprocessing and class names come from the checkpoint; a row that cannot be read
is an `error` row with its reason, and the others are predicted. Under torchrun each rank predicts its share of
the rows (util.sampler.ShardSampler) and rank 0 gathers and writes them.
"""
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..datasets.cases import CaseDataset, InputSpec, collate_cases, read_cases
from ..models.ensemble import ProbabilityEnsemble
from ..util.atomic import atomic_write
from ..util.capped import print_capped
from ..util.dist import DistInfo
from ..util.errors import UsageError
from ..util.explain import explain_predictions
from ..util.metrics import MULTI_LABEL, scores_from_logits
from ..util.sampler import ShardSampler
from ..util.train_backend import AUTOCAST_DTYPES, resolve_precision
from .load_model import LoadedModel, load_for_inference
from .onnx_runtime import OnnxModel

EMBEDDING_TYPES = ("mean", "cls", "concat")


@dataclass(frozen=True)
class PredictionRequest:
    """What volmae-predict was asked, its flags resolved (main_predict.py)."""
    checkpoint: str
    input_csv: str
    path_col: str
    id_col: str
    allow_external_data: bool
    output_csv: str | None
    overwrite: bool
    embeddings: str | None
    embedding_type: str
    explain: str | None
    batch_size: int
    num_workers: int
    precision: str


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


def check_outputs(request: PredictionRequest) -> None:
    """Refuse before any work: outputs that cannot be written (or would be overwritten without --overwrite),
    unknown embedding formats."""
    if request.explain and not request.output_csv:
        raise UsageError("--explain explains predictions; give --output_csv too")
    for target in filter(None, (request.output_csv, request.embeddings)):
        if reason := unwritable_reason(Path(target), request.overwrite):
            raise UsageError(f"{target} {reason}")
    refuse_shared_paths(request)
    if request.explain and Path(request.explain).exists() and not Path(request.explain).is_dir():
        raise UsageError(f"--explain {request.explain} is a file, not a folder")
    if request.embeddings and Path(request.embeddings).suffix.lower() not in (".npy", ".h5"):
        raise UsageError(f"--embeddings must end in .npy or .h5, got {request.embeddings}")


def refuse_shared_paths(request: PredictionRequest) -> None:
    """Each output a file of its own, never one of the inputs: --output_csv equal to --embeddings would replace
    the scores with the array, and an output over the input CSV or checkpoint would destroy it."""
    named = [(flag, getattr(request, flag)) for flag in ("output_csv", "embeddings", "explain", "input_csv", "checkpoint")
             if getattr(request, flag)]
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


def refuse_onnx_limits(request: PredictionRequest, loaded: LoadedModel) -> None:
    """An ONNX graph computes one output: a classifier's logits (no features to embed, no gradients to explain),
    or an encoder's mean-pooled embedding. An ensemble of fold models has no single feature vector."""
    if isinstance(loaded.model, ProbabilityEnsemble) and request.embeddings:
        raise UsageError(f"{request.checkpoint} is an ensemble of {loaded.meta['ensemble']['members']} fold models: it "
                         f"predicts their mean probability (and explains with the mean of their maps); --embeddings "
                         f"needs one model: a member, e.g. fold_0.pth of a final_model folder")
    if not isinstance(loaded.model, OnnxModel):
        return
    if request.explain:
        raise UsageError(f"--explain needs gradients through the model, which an ONNX export does not give; explain "
                         f"with the run's best.pth or a safetensors export of it ({request.checkpoint})")
    if request.embeddings and loaded.is_classifier:
        raise UsageError(f"{request.checkpoint} is an ONNX classifier: it gives logits only; for --embeddings use the "
                         f"best.pth or a safetensors export, or an ONNX export of the encoder")
    if request.embeddings and request.embedding_type != "mean":
        raise UsageError(f"an ONNX encoder export gives the mean of the patch tokens only; --embedding_type "
                         f"{request.embedding_type} needs the encoder.pth or a safetensors export")


def predict_rows(loaded: LoadedModel, dataset: CaseDataset, request, dist_info, names: list[str]) -> dict[int, dict]:
    """This rank's rows: {row: {"scores", "embedding", "error", "explanation"}}."""
    device = dist_info.device
    model = loaded.model.to(device)
    dtype = AUTOCAST_DTYPES[resolve_precision(request.precision, device)]
    task = loaded.meta.get("task")
    loader = DataLoader(dataset, batch_size=request.batch_size, num_workers=request.num_workers, collate_fn=collate_cases,
                        sampler=ShardSampler(len(dataset), dist_info.rank, dist_info.world_size))
    results = {}
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not dist_info.is_main):
        for row, error in batch["failed"]:
            results[row] = {"error": error}
        if batch["input"] is None:
            continue
        x = batch["input"].to(device)
        # explanations need gradients; otherwise inference mode (no autograd bookkeeping at all)
        with torch.no_grad() if request.explain else torch.inference_mode(), \
                torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features = model.forward_features(x)
            logits = model.forward_head(features) if loaded.is_classifier else None
            scores = None if logits is None else scores_from_logits(logits.float(), task).cpu().numpy()
            embedding = embed(model, features, request.embedding_type).float().cpu().numpy() if request.embeddings else None
        overlays = [""] * len(batch["rows"])
        if request.explain:
            overlays = [str(path) for path in explain_predictions(model, x, scores, task, loaded.meta["class_names"],
                                                                  Path(request.explain), [names[r] for r in batch["rows"]])]
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


def run_prediction(request: PredictionRequest, dist_info: DistInfo) -> None:
    """Predict every row of the input CSV and write what was asked; report the rows that could not be read."""
    check_outputs(request)
    loaded = load_for_inference(request.checkpoint, allow_encoder=bool(request.embeddings))
    table = read_cases(request.input_csv, request.path_col, request.id_col)
    if loaded.is_classifier and not request.output_csv:
        raise UsageError("--output_csv is required to predict with a classifier")
    if request.explain and not loaded.is_classifier:
        raise UsageError("--explain needs a fine-tuned classifier; this checkpoint is an encoder")
    if not request.output_csv and not request.embeddings:
        raise UsageError("nothing to write: give --output_csv and/or --embeddings")
    refuse_onnx_limits(request, loaded)
    spec = InputSpec.from_meta(loaded.meta, request.allow_external_data)
    dataset = CaseDataset(list(table[request.path_col]), Path(request.input_csv).resolve().parent, spec)
    start = time.perf_counter()
    names = explanation_names(table, request.id_col)
    results = gather(predict_rows(loaded, dataset, request, dist_info, names), dist_info)
    seconds = time.perf_counter() - start
    if dist_info.is_main:
        ok = sum(1 for r in results.values() if not r["error"])
        if request.output_csv:
            output = prediction_table(table, results, loaded.meta, loaded.is_classifier, bool(request.explain))
            if request.embeddings and Path(request.embeddings).suffix.lower() == ".h5":
                output["embedding_key"] = embedding_keys(table, request.id_col)
            atomic_write(Path(request.output_csv), lambda tmp: output.to_csv(tmp, index=False), replace=request.overwrite)
        written = [request.output_csv] if request.output_csv else []
        if request.embeddings and ok:
            write_embeddings(Path(request.embeddings), table, results, request.id_col, request.embedding_type, request.overwrite)
            written.append(request.embeddings)
        print(f"{len(table)} rows: {ok} ok, {len(table) - ok} error; {ok / max(seconds, 1e-9):.2f} volumes/s "
              f"on {dist_info.world_size} rank(s); wrote {', '.join(written) or 'nothing'}")
        if request.embeddings and not ok:
            print(f"not written: {request.embeddings} (no row could be read, so there is no embedding to store)",
                  file=sys.stderr)
        errors = [f"row {row + 2} ({table[request.path_col].iloc[row]}): {value['error']}"
                  for row, value in sorted(results.items()) if value["error"]]
        if errors:
            print_capped(f"{len(errors)} row(s) could not be predicted:", errors,
                         Path(request.output_csv) if request.output_csv else None, sys.stderr)
