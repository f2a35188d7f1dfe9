"""Setups: each is one object saying where its data come from, its default recipe, its full augmentation
pipeline and what it writes besides the classifier. main_finetune.py knows them only through SETUPS."""
import argparse
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..datasets.data_profile import DataProfile, choose_augment
from ..datasets.finetune_augment import VITMEDNET_AUGMENT, AugmentConfig, describe, preset
from ..datasets.labelled_volumes import VolumeTaskOptions, volume_task
from ..datasets.medmnist_data import MedMNISTSpec, subset_indices
from ..datasets.task_data import TaskData, medmnist_task, meta_image_task, meta_volume_task, slivit_medmnist_task
from ..util.checkpoint import atomic_save
from ..util.cli import grid_or_auto
from ..util.errors import DataError
from ..volumes.flags import preprocess_config_from_args
from ..volumes.preprocess import AUTO


def _labels(args: argparse.Namespace) -> list[str]:
    return args.label or []


def _ratio(args: argparse.Namespace) -> tuple[float, ...]:
    text = args.split_ratio or SETUPS[args.setup].split_ratio
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--split_ratio takes three numbers train,val,test; got {text!r}") from None


def _spec(args: argparse.Namespace) -> MedMNISTSpec:
    return MedMNISTSpec(args.data_flag, args.size, args.data_root)


def medmnist_data(args: argparse.Namespace, _output_dir: Path) -> TaskData:
    return medmnist_task(_spec(args), args.download)


def vitmednet_data(args: argparse.Namespace, _output_dir: Path) -> TaskData:
    spec = _spec(args)
    if not spec.is_3d:
        raise ValueError(f"the 3DViTMedNet setup takes MedMNIST3D flags; {spec.flag} is 2D")
    return medmnist_task(spec, args.download)


def slivit_data(args: argparse.Namespace, output_dir: Path) -> TaskData:
    if args.meta:
        if not _labels(args):
            raise ValueError("--setup slivit with --meta needs --label")
        return meta_volume_task(Path(args.meta), _labels(args), args.task, _ratio(args), args.slices or 28,
                                args.sparsing, args.slice_size, 0, output_dir)
    return slivit_medmnist_task(_spec(args), args.slices or args.size, args.sparsing, args.slice_size, args.download,
                                args.split_file)


def volumes_data(args: argparse.Namespace, output_dir: Path) -> TaskData:
    """A labels CSV of the user's volumes (datasets.labelled_volumes), preprocessed as given or as chosen from
    their headers, cached in --volume_cache."""
    if not args.meta or not _labels(args):
        raise ValueError("--setup volumes needs --meta (the labels CSV) and --label (its label column or columns)")
    automatic = args.resample == AUTO
    if args.input_size == AUTO and not automatic:
        raise ValueError(f"--input_size auto is chosen together with the resampling: give --resample auto, or a grid "
                         f"with --resample {args.resample}")
    size = grid_or_auto(args.input_size)
    config = preprocess_config_from_args(args, size or (1, 1, 1))
    options = VolumeTaskOptions(labels=_labels(args), requested_task=args.task, ratio=_ratio(args), group=args.group,
                                split_seed=args.split_seed, label_case=args.label_case, folds=args.folds,
                                preprocess=None if automatic else config, base=config,
                                input_size=size, workers=args.cache_workers)
    return volume_task(Path(args.meta), options, Path(args.volume_cache or output_dir / "volume_cache"), output_dir)


def slice_backbone_data(args: argparse.Namespace, output_dir: Path) -> TaskData:
    if not args.meta or not _labels(args):
        raise ValueError("--setup slivit_backbone needs --meta and --label (the one-hot pathology columns)")
    return meta_image_task(Path(args.meta), _labels(args), _ratio(args), args.slice_size, 0, output_dir)


def save_backbone(output_dir: Path, model: torch.nn.Module, data: TaskData) -> None:
    """backbone.pth: the ConvNeXt that `--setup slivit --fe_path` loads into SLIViT."""
    atomic_save({"backbone": model.backbone.state_dict(), "backbone_name": model.config["backbone"],
                 "class_names": data.class_names}, output_dir / "backbone.pth")


def no_extra_outputs(_output_dir: Path, _model: torch.nn.Module, _data: TaskData) -> None:
    """Nothing besides the classifier and its reports."""


@dataclass(frozen=True)
class Setup:
    name: str
    recipe: str
    build_data: Callable[[argparse.Namespace, Path], TaskData]
    full_augment: Callable[[argparse.Namespace], AugmentConfig] = lambda _args: AugmentConfig()
    extra_outputs: Callable[[Path, torch.nn.Module, TaskData], None] = no_extra_outputs
    split_ratio: str = "0.85,0.15,0"  # train,val,test shares of the patients of a labels CSV without a split column
    early_stop: bool = False  # --patience auto unless the recipe or the command line says otherwise


SETUPS = {setup.name: setup for setup in (
    Setup("medmnist", "mae", medmnist_data),
    Setup("vitmednet", "vitmednet", vitmednet_data, lambda args: replace(VITMEDNET_AUGMENT, elastic=args.elastic)),
    Setup("slivit", "slivit", slivit_data),
    Setup("slivit_backbone", "slivit", slice_backbone_data, extra_outputs=save_backbone),
    # volumes resampled to a common spacing keep their physical size, often the label's strongest signal:
    # the affine augmentation rotates and shifts them but does not rescale them
    Setup("volumes", "mae", volumes_data, lambda _args: replace(AugmentConfig(), scale=(1.0, 1.0)),
          split_ratio="0.7,0.15,0.15", early_stop=True),
)}


def resolve_augment(requested: str, full: AugmentConfig, profile: DataProfile) -> tuple[AugmentConfig, dict]:
    """The run's augmentation, and a record of what was chosen and why (printed and kept in results.json):
    `auto` picks from the training images (datasets.data_profile), `full` is the setup's pipeline."""
    name, why = (requested, "set by the recipe or the command line") if requested != "auto" \
        else choose_augment(profile)
    config = preset(name, full)
    return config, {"preset": name, "requested": requested, "reason": why, "does": describe(config)}


def load_task_data(args: argparse.Namespace, output_dir: Path) -> TaskData:
    """The setup's data; with --train_samples, a random subset of the training split."""
    try:
        data = SETUPS[args.setup].build_data(args, output_dir)
    except ValueError as err:
        raise DataError(str(err)) from None
    if args.train_samples:
        images, labels = data.splits["train"]
        keep = subset_indices(len(images), args.train_samples)
        data.splits["train"] = (images[keep], labels[keep])
    return data
