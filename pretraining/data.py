"""The pretraining corpus: a MedMNIST training split (--data_flag), or volumes (a cache, a folder, a list) read
through the cache's preprocessing, or the built-in phantoms; and the share held out for val_loss."""
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from ..datasets.pretrain_data import build_pretrain_dataset, hold_out, medmnist_pretrain_dataset, phantom_corpus
from ..util.dist import DistInfo
from ..util.errors import UsageError
from ..volumes.flags import preprocess_config_from_args
from ..volumes.preprocess import PreprocessConfig
from .pretrain_config import resolve_input_size


@dataclass(frozen=True)
class PretrainData:
    dataset: Dataset  # what the loop trains on
    holdout: Dataset | None  # volumes never trained on, for val_loss; None without --val_fraction
    input_size: tuple[int, ...]
    in_chans: int
    normalization: dict  # input standardisation the model applies and records (MedMNIST only)
    info: dict  # recorded in every checkpoint
    preprocess: PreprocessConfig | None  # None for MedMNIST images
    path: str  # where the data came from, for the log and the checkpoints
    notes: tuple[str, ...] = ()  # lines for the log


def load_pretrain_data(args: Namespace, dist_info: DistInfo) -> PretrainData:
    """The corpus the flags name; the phantoms are written once, by the main rank."""
    notes: tuple[str, ...] = ()
    if args.data_flag:
        dataset, spec, profile = medmnist_pretrain_dataset(args.data_flag, args.size, args.data_root,
                                                           not args.no_augment, args.seed, args.train_samples)
        augmentation = "none" if args.no_augment else "flips" if profile.is_label_like else "flips and intensity jitter"
        notes = (f"training images: {profile.describe()}; augmentation: {augmentation}",)
        input_size, in_chans, info, preprocess = spec.input_size, spec.in_chans, spec.to_dict(), None
        normalization = profile.normalization if args.normalize == "auto" else {}
        path = f"{spec.root}/{spec.filename} (train split)"
    else:
        input_size, in_chans, normalization = resolve_input_size(args.input_size, args.data_path), 1, {}
        path = args.data_path or phantom_corpus(args.output_dir, args.num_phantoms, args.seed, dist_info.is_main)
        dataset, preprocess = build_pretrain_dataset(path, input_size, preprocess_config_from_args(args, input_size),
                                                     not args.no_augment, args.seed, dist_info.is_main,
                                                     Path(args.output_dir) / "skipped_sources.txt")
        info = {"source": "volumes", "data_path": path, "volumes": len(dataset)}
    holdout = None
    if args.val_fraction:
        try:
            dataset, holdout = hold_out(dataset, args.val_fraction)
        except ValueError as err:
            raise UsageError(f"--val_fraction: {err}") from None
    return PretrainData(dataset, holdout, input_size, in_chans, normalization, info, preprocess, path, notes)
