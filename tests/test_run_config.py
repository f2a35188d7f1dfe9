"""Typed boundaries (issue 27): the fine-tuning run configuration is resolved once and never written to, and one
versioned type each writes and reads best.pth and the pretraining checkpoints, older files included."""
import ast
import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.conftest import REPO, library_files
from volmae import models
from volmae.datasets.data_profile import profile_images
from volmae.finetuning.finetune_config import FinetuneRun, TrainingConfig, resolve_run
from volmae.finetuning.flags import parse_args
from volmae.finetuning.model_choice import ModelConfig
from volmae.inference.checkpoints import (
    CHECKPOINT_VERSION,
    ClassifierCheckpoint,
    ClassifierCheckpointError,
    PretrainingCheckpoint,
    PretrainingCheckpointError,
)
from volmae.inference.load_model import load_for_inference
from volmae.util.checkpoint import atomic_save

pytestmark = pytest.mark.fast

CONFIG_TYPES = {"Namespace", "FinetuneRun", "TrainingConfig", "ModelConfig"}
CONFIG_NAMES = {"args", "run", "config", "flags"}


def _resolved(argv: list[str]) -> FinetuneRun:
    images = np.random.default_rng(0).integers(0, 255, size=(4, 1, 8, 8, 8), dtype=np.uint8)
    profile = profile_images(images, np.array([[0], [1], [0], [1]]))
    return resolve_run(parse_args(argv), SimpleNamespace(input_size=(16, 16, 16)), profile, world_size=1)


def test_a_resolved_run_is_frozen_and_a_seed_or_candidate_is_a_new_copy():
    run = _resolved(["--setup", "volumes", "--meta", "m.csv", "--label", "y", "--model", "auto", "--seeds", "3,4"])
    assert run.model.name == "vit3d" and run.model.architecture["patch_size"]  # --model auto, resolved from the grid
    assert run.training.layer_decay == 1.0 and run.search == "fallback" and run.seeds == (3, 4)
    for frozen in (run, run.training, run.model):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.seed = 1
    other = run.for_seed(4).with_candidate(1e-2, "flips")
    assert (other.training.seed, other.training.lr, other.augment) == (4, 1e-2, "flips")
    assert (run.training.seed, run.augment) == (3, "auto") and run.training.lr != 1e-2


def _assigned_names(target: ast.AST) -> list[ast.Attribute]:
    """Attributes a target assigns: `a.b = ` and `a.b, c = `, not what a subscript's index mentions."""
    if isinstance(target, ast.Attribute):
        return [target]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [a for element in target.elts for a in _assigned_names(element)]
    return []


def _config_parameters(function: ast.FunctionDef) -> set[str]:
    names = set()
    for arg in function.args.args + function.args.kwonlyargs:
        annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
        if arg.arg in CONFIG_NAMES or any(kind in annotation for kind in CONFIG_TYPES):
            names.add(arg.arg)
    return names


def test_no_library_function_assigns_to_the_run_configuration_it_was_given():
    writes = []
    for path in library_files():
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, ast.FunctionDef):
                continue
            params = _config_parameters(function)
            for node in ast.walk(function):
                targets = node.targets if isinstance(node, ast.Assign) else \
                    [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
                written = [a for t in targets for a in _assigned_names(t)]
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args:
                    written.append(ast.Attribute(value=node.args[0], attr="?"))
                writes += [f"{path.relative_to(REPO)}:{node.lineno} {function.name}: {ast.unparse(a.value)}.{a.attr}"
                           for a in written if isinstance(a.value, ast.Name) and a.value.id in params]
    assert not writes, writes


def _tiny_classifier() -> torch.nn.Module:
    return models.create_model("resnet18_3d", num_classes=2)


def test_best_pth_round_trips_through_its_type(tmp_path):
    model = _tiny_classifier()
    written = ClassifierCheckpoint("resnet18_3d", model.config, ["no", "yes"], "binary-class", [16, 16, 16],
                                   run={"setup": "volumes"}, args={"lr": None}).with_weights(
                                       model.state_dict(), 3, {"val_auc": 0.75})
    written.save(tmp_path / "best.pth")
    read = ClassifierCheckpoint.load(tmp_path / "best.pth")
    assert (read.epoch, read.val_scores, read.run, read.class_names) == (3, {"val_auc": 0.75}, {"setup": "volumes"},
                                                                         ["no", "yes"])
    stored = torch.load(tmp_path / "best.pth", weights_only=True)
    assert stored["format_version"] == CHECKPOINT_VERSION and stored["val_auc"] == 0.75


def test_a_version_1_best_pth_still_loads_and_a_newer_one_is_refused_in_one_line(tmp_path):
    model = _tiny_classifier()
    version_1 = {"kind": "volmae-classifier", "model": model.state_dict(), "epoch": 2, "val_auc": 0.8,
                 "model_name": "resnet18_3d", "model_config": model.config, "class_names": ["a", "b"],
                 "task": "binary-class", "data": {"source": "volumes"}, "setup": "volumes",
                 "input_size": [16, 16, 16], "args": {"lr": 0.001}, "preprocess": None}
    atomic_save(version_1, tmp_path / "old.pth")
    loaded = load_for_inference(tmp_path / "old.pth")
    assert loaded.is_classifier and loaded.meta["class_names"] == ["a", "b"] and loaded.meta["run"] == {}
    assert ClassifierCheckpoint.load(tmp_path / "old.pth").val_scores == {"val_auc": 0.8}
    with pytest.raises(ClassifierCheckpointError, match="version 99.*update VolMAE"):
        ClassifierCheckpoint.from_dict({**version_1, "format_version": 99}, "new.pth")
    with pytest.raises(ClassifierCheckpointError, match="without class_names"):
        ClassifierCheckpoint.from_dict({k: v for k, v in version_1.items() if k != "class_names"}, "cut.pth")


def test_pretraining_checkpoints_round_trip_and_version_1_files_count_every_step_applied(tmp_path):
    state = PretrainingCheckpoint("mae_vit3d_tiny", {"embed_dim": 8}, {"source": "cache"}, None, {"mask_ratio": 0.9})
    at_step = state.at(step=25, steps_per_epoch=10, applied_steps=24, nonfinite_steps=1)
    at_step.with_weights({"w": torch.ones(2)}).save(tmp_path / "model.pth")
    read = PretrainingCheckpoint.load(tmp_path / "model.pth")
    assert (read.epoch, read.step, read.applied_steps, read.nonfinite_steps) == (2, 25, 24, 1)
    assert read.args == {"mask_ratio": 0.9} and torch.equal(read.weights["w"], torch.ones(2))
    version_1 = {"model": {}, "epoch": 1, "step": 12, "args": {}, "model_name": "mae_vit3d_tiny",
                 "model_config": {}, "data": {}, "preprocess": None}
    old = PretrainingCheckpoint.from_dict(version_1, "old.pth")
    assert (old.step, old.applied_steps, old.nonfinite_steps) == (12, 12, 0)
    with pytest.raises(PretrainingCheckpointError, match="no model_name"):
        PretrainingCheckpoint.from_dict({"model": {}}, "foreign.pth")


def test_a_pretraining_saved_from_a_ddp_wrapper_loads_for_inference_and_export(tmp_path):
    """Every reader of an MAE's weights (prediction, embeddings, export, --mae_loss_weight) goes through
    PretrainingCheckpoint, so a `module.` prefix is dropped in one place."""
    config = {"img_size": 16, "patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2, "decoder_embed_dim": 16,
              "decoder_depth": 1, "decoder_num_heads": 2}
    mae = models.create_model("mae_vit_tiny_patch16", **config)
    wrapped = {f"module.{key}": value for key, value in mae.state_dict().items()}
    PretrainingCheckpoint("mae_vit_tiny_patch16", config, weights=wrapped).save(tmp_path / "model.pth")
    assert set(PretrainingCheckpoint.load(tmp_path / "model.pth").weights) == set(mae.state_dict())
    loaded = load_for_inference(tmp_path / "model.pth", allow_encoder=True)
    assert not loaded.is_classifier
    for key, value in mae.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_the_loops_and_the_model_choice_read_typed_configurations_only():
    import inspect

    from volmae.finetuning.engine import Finetuner, build_optimizer
    from volmae.finetuning.model_choice import build_model, with_reconstruction
    from volmae.pretraining.engine import Pretrainer
    from volmae.pretraining.pretrain_config import PretrainConfig

    assert inspect.signature(Pretrainer).parameters["config"].annotation is PretrainConfig
    assert dataclasses.fields(PretrainConfig) and PretrainConfig.__dataclass_params__.frozen
    assert inspect.signature(Finetuner).parameters["config"].annotation is TrainingConfig
    assert inspect.signature(build_optimizer).parameters["config"].annotation is TrainingConfig
    for function in (build_model, with_reconstruction):
        assert inspect.signature(function).parameters["config"].annotation is ModelConfig


def test_pretraining_resolves_every_auto_into_a_new_namespace_and_refuses_in_typed_errors():
    from volmae.pretraining.flags import get_args_parser
    from volmae.pretraining.pretrain_config import (
        AUTO_BLR,
        AUTO_MAE,
        PretrainConfig,
        build_model,
        check_flags,
        resolve_flags,
    )
    from volmae.util.errors import UsageError

    args = get_args_parser().parse_args(["--model", "auto", "--batch_size", "4", "--output_dir", "out"])
    given = dict(vars(args))
    name, core = build_model(args, (16, 16, 16), 1, {})
    resolved, note = resolve_flags(args, name, "corpus", samples=40, world_size=1)
    assert vars(args) == given  # the flags themselves are never written to
    assert (resolved.model, resolved.data_path, resolved.lr) == (AUTO_MAE, "corpus", AUTO_BLR * 4 / 256)
    assert "auto" not in (resolved.epochs, resolved.warmup_epochs) and "epochs auto" in note
    config = PretrainConfig.from_flags(resolved)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.lr = 1.0
    with pytest.raises(UsageError, match="--max_bad_samples"):
        check_flags(get_args_parser().parse_args(["--max_bad_samples", "2"]))
    with pytest.raises(UsageError):
        build_model(get_args_parser().parse_args(["--model", "auto", "--mask_ratio", "1.0"]), (16, 16, 16), 1, {})


def test_pretraining_input_size_auto_is_the_cache_grid_and_a_broken_manifest_names_the_cache(tmp_path):
    import json

    from volmae.pretraining.pretrain_config import resolve_input_size
    from volmae.util.errors import DataError
    from volmae.volumes.cache import CACHE_FORMAT, CACHE_VERSION, META_FILE

    cache = tmp_path / "cache"
    cache.mkdir()
    meta = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "preprocess": {"size": [24, 40, 40]}}
    (cache / META_FILE).write_text(json.dumps(meta))
    assert resolve_input_size("auto", str(cache)) == (24, 40, 40)
    assert resolve_input_size("auto", str(tmp_path / "volumes")) == (256, 256, 256)
    assert resolve_input_size("auto", None) == (256, 256, 256)
    assert resolve_input_size((32,), str(cache)) == (32, 32, 32)
    (cache / META_FILE).write_text(json.dumps({**meta, "preprocess": {"size": [24, 40]}}))
    with pytest.raises(DataError, match=f"cannot read the grid of the cache {cache}"):
        resolve_input_size("auto", str(cache))
