"""Export (volmae-export): a classifier, a fold ensemble or an MAE encoder written for other tools, with its
preprocessing beside the weights, built beside the output folder and swapped in once complete and checked.

Every export writes config.json (the model, its input grid and layout, the full preprocessing; for a classifier its
classes, task and the run's scores with their floors; the data it saw) and MODEL_CARD.md. `safetensors` writes
model.safetensors; `onnx` model.onnx (the classifier's logits, or the encoder's mean-pooled embedding), checked
against PyTorch with onnxruntime on real volumes; `monai` (plain patch-embedding ViT encoders) MONAI's ViT state
dict and the arguments that build it. config.json records the hash of every file and the weights carry the hash
of config.json's model definition (inference.exported), so an edited or swapped file is refused when read. A
folder holding anything an export did not write (a run folder, a user's files) is never written
(inference.exported.refuse_folder, util.folder_swap).
"""
import copy
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..datasets.cases import CaseDataset, CasesError, InputSpec, collate_cases, read_cases
from ..models.mae3d import PRETRAINING_ONLY_PREFIXES
from ..util.atomic import atomic_write
from ..util.checkpoint import CheckpointError, atomic_save
from ..util.errors import DataError, UsageError
from ..util.folder_swap import building, recover
from ..util.run_state import unfinished_reason
from ..volumes.phantoms import write_phantom_corpus
from .checkpoints import PretrainingCheckpoint, load_checkpoint
from .ensemble_folder import is_ensemble
from .exported import (
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
from .hub_card import write_hub_readme
from .load_model import LoadedModel, NotAVolMAECheckpoint, load_for_inference
from .model_card import LAYOUT, card_facts, render_card
from .monai_bundle import network_args, write_bundle
from .monai_vit import (
    VOLMAE_LAYER_NORM_EPS,
    UnmappableEncoder,
    monai_vit_kwargs,
    monai_vit_weights,
    set_layer_norm_eps,
)
from .onnx_runtime import ONNX_INPUT, OnnxModel, PooledEmbedding

FORMATS = ("safetensors", "onnx", "monai", "monai-bundle", "hf")
HUB_CARD_FILE = "README.md"
ONNX_TOLERANCE = 1e-4
MONAI_TOLERANCE = 1e-5
CHECK_CASES = 4

@dataclass(frozen=True)
class ExportRequest:
    """What volmae-export was asked (main_export.py)."""
    checkpoint: str
    output_dir: str
    format: str
    overwrite: bool
    allow_unfinished: bool
    check_csv: str | None
    onnx_fp16: bool = False
    license: str = "other"


def read_results(checkpoint_path: Path) -> dict | None:
    """The fine-tuning run's results.json beside its best.pth or final_model folder (symlinks resolved), for the
    card's scores and floors."""
    path = checkpoint_path.parent / "results.json"
    own = checkpoint_path.is_file() or is_ensemble(checkpoint_path)
    return json.loads(path.read_text()) if own and path.is_file() else None


def check_inputs(request: ExportRequest, loaded: LoadedModel, source: Path) -> tuple[torch.Tensor, str]:
    """Up to CHECK_CASES preprocessed volumes to compare an export with PyTorch on, and where they came from:
    --check_csv, else the run's own test cases, else synthetic CT phantoms written for the check."""
    spec = InputSpec.from_meta(loaded.meta)
    csv = Path(request.check_csv) if request.check_csv else source.parent / "test_scores.csv"
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


ONNX_OPSET = 18  # pinned: the graph is the same whichever opset torch would pick by default
FP16_TOLERANCE = 1e-2  # fp16 against fp32 outputs, relative to their largest magnitude (at least 1)
ONNX_FP16_FILE = "model_fp16.onnx"


def trace_onnx(module: torch.nn.Module, example: torch.Tensor, output: str, path: Path, config_hash: str) -> int:
    """`module` traced by torch.export into an ONNX graph at `path` (dynamic batch axis, opset ONNX_OPSET), tagged
    with the config hash; the opset written."""
    program = torch.onnx.export(module, (example,), dynamo=True, input_names=[ONNX_INPUT], output_names=[output],
                                dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=ONNX_OPSET,
                                verbose=False)
    program.save(str(path))
    tag_onnx(path, config_hash)
    return int(program.model_proto.opset_import[0].version)


def export_onnx(request: ExportRequest, loaded: LoadedModel, source: Path, out: Path, config_hash: str) -> dict:
    """model.onnx (and, with --onnx_fp16, model_fp16.onnx), traced, tagged with the config hash and checked with
    onnxruntime: fp32 against PyTorch within ONNX_TOLERANCE, fp16 against fp32 within FP16_TOLERANCE; the record."""
    module = loaded.model if loaded.is_classifier else PooledEmbedding(loaded.model)
    module.eval()
    volumes, where = check_inputs(request, loaded, source)
    example = volumes[:2] if len(volumes) > 1 else volumes.repeat(2, *[1] * (volumes.dim() - 1))
    output = "logits" if loaded.is_classifier else "embedding"
    path = out / ONNX_FILE
    opset = trace_onnx(module, example, output, path, config_hash)
    with torch.no_grad():
        expected = module(volumes).float().numpy()
    actual = OnnxModel(path, output)(volumes).numpy()
    difference = float(np.abs(actual - expected).max())
    if not difference <= ONNX_TOLERANCE:
        raise DataError(f"the ONNX graph differs from PyTorch by {difference:.2e} (more than "
                        f"{ONNX_TOLERANCE:g}) on {len(volumes)} volumes from {where}; nothing was exported")
    print(f"onnx: {output} of {len(volumes)} volumes from {where} agree with PyTorch to {difference:.2e}")
    record = {"file": path.name, "input": ONNX_INPUT, "output": output, "batch_axis": "dynamic", "opset": opset,
              "checked_on": where, "checked_volumes": len(volumes), "max_abs_difference": difference}
    if request.onnx_fp16:
        record["fp16"] = export_fp16(module, example, volumes, actual, output, out, config_hash)
    return record


def export_fp16(module: torch.nn.Module, example: torch.Tensor, volumes: torch.Tensor, fp32: np.ndarray, output: str,
                out: Path, config_hash: str) -> dict:
    """model_fp16.onnx: the module in half precision, traced the same way, its outputs on the check volumes
    against the fp32 graph's; refused in one line where onnxruntime cannot run it or it strays too far."""
    path = out / ONNX_FP16_FILE
    trace_onnx(copy.deepcopy(module).half(), example.half(), output, path, config_hash)
    try:
        half = OnnxModel(path, output)(volumes).numpy()
    except Exception as err:  # noqa: BLE001 - onnxruntime's errors for kernels it lacks have many types
        raise DataError(f"onnxruntime cannot run the fp16 graph here ({type(err).__name__}); export without "
                        f"--onnx_fp16") from None
    scale = max(1.0, float(np.abs(fp32).max()))
    difference = float(np.abs(half - fp32).max())
    if not difference <= FP16_TOLERANCE * scale:
        raise DataError(f"the fp16 graph differs from fp32 by {difference:.2e} (more than {FP16_TOLERANCE:g} x "
                        f"{scale:.3g}); export without --onnx_fp16")
    print(f"onnx fp16: {output} agrees with the fp32 graph to {difference:.2e} (tolerance {FP16_TOLERANCE:g} x "
          f"{scale:.3g})")
    return {"file": path.name, "input_dtype": "float16", "max_abs_difference_to_fp32": difference,
            "tolerance": FP16_TOLERANCE * scale}


def export_monai(request: ExportRequest, checkpoint: dict, loaded: LoadedModel, source: Path, out: Path) -> dict:
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
    volumes, where = check_inputs(request, loaded, source)
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


def write_export(request: ExportRequest, checkpoint: dict, loaded: LoadedModel, source: Path, out: Path) -> list[str]:
    """Every file of the export into `out` (a fresh folder), config.json last; the names of the files."""
    card = card_facts(checkpoint, read_results(source), source)
    config = export_config(checkpoint, card, {"export_format": request.format})
    config_hash = definition_sha256(config)
    if request.format == "safetensors":
        write_weights(out, checkpoint["model"], config_hash)
        files = [WEIGHTS_FILE]
    elif request.format == "monai-bundle":
        volumes, where = check_inputs(request, loaded, source)
        card_text = render_card(card, ["models/model.pt", "configs/", "scripts/", CONFIG_FILE])
        files, config["monai_bundle"] = write_bundle(out, checkpoint, loaded, card, card_text, request.license,
                                                     volumes, where)
        write_config(out, config, files)
        return [*files, CONFIG_FILE]
    elif request.format == "hf":
        write_weights(out, checkpoint["model"], config_hash)
        files = [WEIGHTS_FILE]
    elif request.format == "onnx":
        config["onnx"] = export_onnx(request, loaded, source, out, config_hash)
        files = [ONNX_FILE, *([ONNX_FP16_FILE] if request.onnx_fp16 else [])]
    else:
        config.update(export_monai(request, checkpoint, loaded, source, out))
        files = ["monai_vit.pt", "monai_vit.json"]
    card_file = HUB_CARD_FILE if request.format == "hf" else CARD_FILE
    card_text = render_card(card, [*files, CONFIG_FILE, card_file])
    if request.format == "hf":
        write_hub_readme(out, card, card_text, request.license)
    else:
        atomic_write(out / CARD_FILE, lambda tmp: tmp.write_text(card_text))
    write_config(out, config, [*files, card_file])
    return [*files, CONFIG_FILE, card_file]


def run_export(request: ExportRequest) -> None:
    """Check everything that can be checked, then build the export beside OUTPUT_DIR and swap it in."""
    source = Path(request.checkpoint).resolve()  # a symlink's run records are beside its target
    out = Path(request.output_dir).resolve()  # a symlinked folder: the export it points to is replaced
    refuse_run_folder(out, source)
    for note in recover(out):
        print(f"note: {note}")
    refuse_folder(out, request.overwrite)
    if request.check_csv and not Path(request.check_csv).is_file():
        raise UsageError(f"--check_csv {request.check_csv}: no such file")
    try:
        loaded = load_for_inference(source, allow_encoder=True)
        checkpoint = None if loaded.is_classifier else load_checkpoint(source)
    except (FileNotFoundError, CheckpointError, NotAVolMAECheckpoint) as err:
        raise DataError(f"cannot export {request.checkpoint}: {err}") from None
    if request.format == "monai-bundle":
        network_args(loaded.meta, loaded.is_classifier)  # refused here, naming an architecture that does not map
    if request.onnx_fp16 and request.format != "onnx":
        raise UsageError("--onnx_fp16 goes with --format onnx")
    if request.format == "monai" and loaded.is_classifier:
        raise UsageError("--format monai takes a pretrained encoder (encoder.pth or model.pth of volmae-pretrain); "
                         "export a classifier as safetensors or onnx")
    reason = unfinished_reason(source, loaded.is_classifier)
    if reason and not request.allow_unfinished:
        raise UsageError(f"{request.checkpoint} is not a finished run's model: {reason}; wait for it, or add "
                         f"--allow_unfinished to export it as it is")
    if reason:
        print(f"warning: exporting an unfinished run's checkpoint: {reason}")
    with building(out) as staging:
        files = write_export(request, exportable(checkpoint, loaded, source), loaded, source, staging)
    print(f"exported {request.checkpoint} as {request.format} to {out}: {', '.join(files)}")
