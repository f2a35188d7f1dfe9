"""A VolMAE model as a MONAI bundle (`volmae-export --format monai-bundle`): MONAI's unit of exchange, which its
bundle runner (`python -m monai.bundle run`) executes with MONAI alone, VolMAE not installed.

    configs/metadata.json    MONAI's metadata (versions, the input and output formats) and the card's facts: the data,
                             the scores beside their floors, the intended use
    configs/inference.json   network_def, preprocessing, inferer, postprocessing, an evaluator and `run`: every NIfTI
                             in `dataset_dir` through VolMAE's preprocessing (scripts/transforms.py), the network and
                             a CSV of class probabilities (a classifier) or embeddings (an encoder), `eval/outputs.csv`
    models/model.pt          the network's state dict: VolMAE's own keys, since scripts/network.py names them alike
    models/unetr_vit.pt      an encoder UNETR can take as it is (models.mae3d.UNETR_ENCODER): UNETR's `vit.*` weights
    scripts/                 the network, the preprocessing as a MONAI transform, the CSV writer (inference/bundle_scripts)
    docs/README.md, LICENSE  the model card; the license named by --license
    config.json              VolMAE's export record: the sha256 of every file above (inference.exported), so a
                             tampered metadata.json, script or weight file is refused when VolMAE reads the bundle

The network is VolMAE's ViT (the hybrid stem of `--model auto` included) written again in plain torch, its LayerNorm
eps in the definition. Other architectures (3D ResNets, MedViT-3D, SLIViT, 3DViTMedNet, 2D models) are refused,
naming the architecture.
"""
import json
import shutil
from importlib import metadata
from pathlib import Path

import torch

from ..util.atomic import atomic_write
from ..util.checkpoint import atomic_save
from ..util.errors import UsageError
from .bundle_scripts.network import VolMAEEnsemble, VolMAEViT
from .monai_vit import UnmappableEncoder, unetr_kwargs, unetr_vit_weights

SCRIPTS = Path(__file__).with_name("bundle_scripts")
SCRIPT_FILES = ("__init__.py", "network.py", "transforms.py", "outputs.py")
VIT_MODELS = ("vit3d", "mae_vit")  # VolMAE's ViT classifiers and MAE encoders: what scripts/network.py defines
BUNDLE_TOLERANCE = 1e-5
SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def network_args(meta: dict, classifier: bool) -> dict:
    """scripts/network.py's arguments for this model, or UsageError naming an architecture that does not map."""
    name, config = str(meta.get("model_name")), meta.get("model_config") or {}
    dims = len(config.get("img_size") or meta.get("input_size") or [])
    if not name.startswith(VIT_MODELS) or dims != 3:
        raise UsageError(f"{name} does not map to a MONAI bundle: the bundle's network is VolMAE's 3D ViT "
                         f"(vit3d*, mae_vit*, the hybrid stem included); export {name} as safetensors or onnx")
    per_axis = lambda value: [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * 3  # noqa: E731
    pool = config.get("global_pool", "avg") if classifier else None
    if pool == "attention":
        raise UsageError(f"{name} with attention pooling does not map to a MONAI bundle yet (the bundle's network "
                         f"pools by the mean, the class token or both); export it as safetensors or onnx")
    return {"img_size": per_axis(config["img_size"]), "patch_size": per_axis(config["patch_size"]),
            "in_chans": int(config.get("in_chans", 1)), "embed_dim": int(config["embed_dim"]),
            "depth": int(config["depth"]), "num_heads": int(config["num_heads"]),
            "mlp_ratio": float(config.get("mlp_ratio", 4.0)), "input_mean": float(config.get("input_mean", 0.0)),
            "input_std": float(config.get("input_std", 1.0)), "stem_channels": int(config.get("stem_channels", 0)),
            "layer_norm_eps": float(config.get("layer_norm_eps", 1e-6)),
            "isolated_class_token": bool(config.get("isolated_class_token", False)),
            "final_norm": (not classifier) or pool == "token", "global_pool": pool,
            "head_norm": bool(config.get("head_norm", False)), "num_classes": int(config.get("num_classes", 2))}


def build_network(args: dict, members: int | None) -> torch.nn.Module:
    return VolMAEEnsemble(members, **args) if members else VolMAEViT(**args)


def preprocessing_args(meta: dict) -> dict:
    """The transform's arguments: volmae-predict's preprocessing for this model (datasets.cases.InputSpec)."""
    preprocess = dict(meta.get("preprocess") or {"size": list(meta["input_size"]), "resample": "fit",
                                                 "spacing": None, "modality": "auto", "ct_window": [-1000.0, 1000.0],
                                                 "mr_percentiles": [0.5, 99.5]})
    return {"size": list(preprocess["size"]), "resample": preprocess["resample"], "spacing": preprocess.get("spacing"),
            "modality": preprocess.get("modality", "auto"), "ct_window": list(preprocess.get("ct_window", [-1000.0, 1000.0])),
            "mr_percentiles": list(preprocess.get("mr_percentiles", [0.5, 99.5])),
            "stored_dtype": (meta.get("data") or {}).get("stored_dtype"), "input_size": list(meta["input_size"])}


def inference_config(network: dict, preprocess: dict, columns: list[str], classifier: bool) -> dict:
    """configs/inference.json, with MONAI's standard keys."""
    target = "scripts.network.VolMAEEnsemble" if "members" in network else "scripts.network.VolMAEViT"
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True}] if classifier else []
    post.append({"_target_": "scripts.outputs.WriteRowsd", "keys": "pred", "columns": columns,
                 "output_file": "$@output_dir + '/outputs.csv'"})
    return {
        "imports": ["$import glob", "$import os", "$import scripts"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "$@bundle_root + '/sample_data'",
        "datalist": "$sorted(glob.glob(os.path.join(@dataset_dir, '*.nii.gz')) + "
                    "glob.glob(os.path.join(@dataset_dir, '*.nii')))",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": target, **network},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "scripts.transforms.VolMAEPreprocessd", "keys": "image", **preprocess}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': path} for path in @datalist]",
                    "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": post},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "strict": True}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }


def version_of(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def bundle_metadata(card: dict, network: dict, columns: list[str], classifier: bool, unetr: str) -> dict:
    """configs/metadata.json: MONAI's fields, then the card's facts under `volmae`."""
    grid = list(network["img_size"])
    kind = "probabilities" if classifier else "embedding"
    return {
        "schema": SCHEMA, "version": "0.1.0", "changelog": {"0.1.0": "exported by volmae-export"},
        "monai_version": version_of("monai"), "pytorch_version": version_of("torch"),
        "numpy_version": version_of("numpy"), "optional_packages_version": {"SimpleITK": version_of("SimpleITK")},
        "name": f"VolMAE {card['kind']} {card['model_name']}",
        "task": "classification of 3D volumes" if classifier else "embeddings of 3D volumes (feature extraction)",
        "description": "A VolMAE model: a 3D masked-autoencoder ViT encoder" + (", fine-tuned as a classifier" if
                                                                             classifier else ""),
        "authors": "VolMAE", "copyright": "see LICENSE",
        "data_source": "the run that trained it; volmae.data_seen below",
        "data_type": "nifti (any volume SimpleITK reads)",
        "intended_use": "Research on 3D medical images; not a medical device, not validated for clinical decisions",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT or MR", "num_channels": 1,
                                 "spatial_shape": grid, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": kind, "format": kind, "num_channels": len(columns), "spatial_shape": [1],
                                 "dtype": "float32", "value_range": [0, 1] if classifier else [],
                                 "is_patch_data": False,
                                 "channel_def": {str(i): name for i, name in enumerate(columns)}}}},
        "volmae": {"card": card, "unetr": unetr},
    }


def checked_network(loaded, network: dict, members: int | None, state: dict, volumes: torch.Tensor) -> float:
    """The bundle's network, built from scripts/network.py with the exported state dict (strictly), against VolMAE's
    model on the check volumes: the largest difference of the outputs the bundle writes."""
    built = build_network(network, members).eval()
    built.load_state_dict(state, strict=True)
    with torch.no_grad():
        theirs = built(volumes).float()
        if loaded.is_classifier:
            ours, theirs = torch.softmax(loaded.model(volumes).float(), dim=-1), torch.softmax(theirs, dim=-1)
        else:
            ours = loaded.model.forward_features(volumes)[:, 1:].mean(dim=1).float()
    return float((theirs - ours).abs().max())


def write_bundle(out: Path, checkpoint: dict, loaded, card: dict, card_text: str, license_id: str,
                 volumes: torch.Tensor, where: str) -> tuple[list[str], dict]:
    """Every file of the bundle but config.json into `out`; (their paths relative to `out`, the record for
    config.json). The network is checked against VolMAE's on real volumes before anything is written."""
    classifier = loaded.is_classifier
    network = network_args(loaded.meta, classifier)
    members = (loaded.meta.get("ensemble") or {}).get("members")
    state = {k: v.detach().clone().contiguous() for k, v in checkpoint["model"].items()}
    difference = checked_network(loaded, network, members, state, volumes)
    if not difference <= BUNDLE_TOLERANCE:
        raise UsageError(f"the bundle's network differs from VolMAE's by {difference:.2e} (more than "
                         f"{BUNDLE_TOLERANCE:g}) on {len(volumes)} volumes from {where}; nothing was exported")
    print(f"monai-bundle: its network's outputs on {len(volumes)} volumes from {where} equal VolMAE's to "
          f"{difference:.2e}")
    columns = [f"prob_{name}" for name in loaded.meta["class_names"]] if classifier else \
        [f"embedding_{i}" for i in range(network["embed_dim"])]
    if members:
        network = {**network, "members": members}
    files = []
    (out / "models").mkdir()
    atomic_save(state, out / "models" / "model.pt")
    files.append("models/model.pt")
    unetr = "not an encoder" if classifier else None
    if unetr is None:
        try:
            unetr = {"kwargs": unetr_kwargs(loaded.meta["model_config"]), "file": "models/unetr_vit.pt"}
            atomic_save(unetr_vit_weights(state, loaded.meta["model_config"]), out / "models" / "unetr_vit.pt")
            files.append("models/unetr_vit.pt")
        except UnmappableEncoder as err:
            unetr = str(err)
    (out / "configs").mkdir()
    configs = {"configs/inference.json": inference_config(network, preprocessing_args(loaded.meta), columns,
                                                          classifier),
               "configs/metadata.json": bundle_metadata(card, network, columns, classifier, unetr)}
    for name, content in configs.items():
        text = json.dumps(content, indent=2, allow_nan=False)
        atomic_write(out / name, lambda tmp, t=text: tmp.write_text(t))
        files.append(name)
    (out / "scripts").mkdir()
    for name in SCRIPT_FILES:
        shutil.copyfile(SCRIPTS / name, out / "scripts" / name)
        files.append(f"scripts/{name}")
    (out / "docs").mkdir()
    atomic_write(out / "docs" / "README.md", lambda tmp: tmp.write_text(card_text))
    atomic_write(out / "LICENSE", lambda tmp: tmp.write_text(
        f"This model is released under: {license_id}\n(chosen by whoever exported it with volmae-export --license). "
        f"The data it was trained on keep their own licenses: see configs/metadata.json, volmae.card.data_seen.\n"))
    files += ["docs/README.md", "LICENSE"]
    record = {"max_abs_difference": difference, "checked_on": where, "checked_volumes": int(len(volumes)),
              "outputs": "probabilities" if classifier else "embedding (the mean of the patch tokens)",
              "unetr": unetr if isinstance(unetr, str) else unetr["file"],
              "run": "cd BUNDLE && python -m monai.bundle run --config_file configs/inference.json "
                     "--dataset_dir DIR_OF_NIFTI  (writes eval/outputs.csv)"}
    return files, record
