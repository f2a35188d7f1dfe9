"""A fine-tuning run's configuration, resolved once (main_finetune) from the flags and the data, then frozen.

Frozen, so that no code downstream (search, model choice, the loop, the checkpoint) can change a setting for code
elsewhere to read: a candidate or a seed is a new copy (`with_candidate`, `for_seed`).
"""
import argparse
from dataclasses import asdict, dataclass, replace

from ..datasets.data_profile import DataProfile
from ..datasets.finetune_augment import AugmentConfig
from ..datasets.task_data import TaskData
from ..util.lr_sched import effective_lr
from .model_choice import EXPLICIT_MODEL_FLAGS, ModelConfig, auto_architecture, input_normalization, pretrained_config
from .recipes import PRETRAINED_LAYER_DECAY
from .setups import SETUPS, resolve_augment


@dataclass(frozen=True)
class TrainingConfig:
    """What the loop reads: the optimisation of one candidate (finetuning.finetune_config resolves it)."""
    seed: int
    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_epochs: float
    weight_decay: float
    layer_decay: float
    optimizer: str
    schedule: str
    smoothing: float
    clip_grad: float | None
    class_weights: str
    patience: int | None
    precision: str
    deepspeed: str | None
    num_workers: int
    mae_loss_weight: float
    probe_epochs: int = 0  # LP-FT: epochs in which only the head trains


@dataclass(frozen=True)
class FinetuneRun:
    setup: str
    recipe: str
    model: ModelConfig
    training: TrainingConfig
    augment: str  # a preset, or auto (datasets.data_profile.choose_augment)
    full_augment: AugmentConfig  # the setup's whole pipeline, what `full` means
    search: str  # none, fallback or full (finetuning.search)
    search_budget: int
    given: tuple[str, ...]  # recipe settings the user set: never searched
    train_fraction: float | None
    seeds: tuple[int, ...]
    bootstrap: int
    explain: int
    log_dir: str | None

    def for_seed(self, seed: int) -> "FinetuneRun":
        return replace(self, training=replace(self.training, seed=seed))

    def with_candidate(self, lr: float, augment: str) -> "FinetuneRun":
        return replace(self, training=replace(self.training, lr=lr), augment=augment)

    def augmentation(self, profile: DataProfile) -> tuple[AugmentConfig, dict]:
        """The augmentation this run trains with on these images, and why (setups.resolve_augment)."""
        return resolve_augment(self.augment, self.full_augment, profile)

    def to_dict(self) -> dict:
        return asdict(self)


def _search_mode(args: argparse.Namespace) -> str:
    if args.search != "auto":
        return args.search
    return "fallback" if args.setup == "volumes" else "none"


def resolve_run(args: argparse.Namespace, data: TaskData, profile: DataProfile, world_size: int) -> FinetuneRun:
    """The run the flags ask for on these data: --model auto's architecture, the input standardisation, the
    layer decay (only pretrained layers decay) and the lr from --blr and the effective batch."""
    encoder = pretrained_config(args.finetune)
    name, architecture = (args.model, {}) if args.model != "auto" else \
        auto_architecture(args.finetune, data.input_size, encoder)
    model = ModelConfig(
        name=name, architecture=architecture,
        normalization=input_normalization(name, args.finetune, args.normalize, profile, encoder),
        finetune=args.finetune, pretrained=args.pretrained, drop_path=args.drop_path, global_pool=args.global_pool,
        head_norm=args.head_norm, explicit={k: getattr(args, k) for k in EXPLICIT_MODEL_FLAGS if getattr(args, k) is not None},
        mae_loss_weight=args.mae_loss_weight, mae_mask_ratio=args.mae_mask_ratio)
    layer_decay = args.layer_decay if args.layer_decay is not None else \
        (PRETRAINED_LAYER_DECAY if args.finetune else 1.0)
    lr = args.lr if args.lr is not None else effective_lr(args.blr, None, args.batch_size * world_size)
    training = TrainingConfig(
        seed=args.seeds[0], epochs=args.epochs, batch_size=args.batch_size, lr=lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay, layer_decay=layer_decay,
        optimizer=args.optimizer, schedule=args.schedule, smoothing=args.smoothing, clip_grad=args.clip_grad,
        class_weights=args.class_weights, patience=args.patience, precision=args.precision, deepspeed=args.deepspeed,
        num_workers=args.num_workers, mae_loss_weight=args.mae_loss_weight, probe_epochs=args.probe_epochs)
    return FinetuneRun(
        setup=args.setup, recipe=args.recipe, model=model, training=training, augment=args.augment,
        full_augment=SETUPS[args.setup].full_augment(args), search=_search_mode(args),
        search_budget=args.search_budget, given=tuple(args.given), train_fraction=args.train_fraction,
        seeds=tuple(args.seeds), bootstrap=args.bootstrap, explain=args.explain, log_dir=args.log_dir)
