"""How a training step reaches the weights: plain PyTorch (single process or DDP) or DeepSpeed ZeRO.

The training loops are written once against this small interface: `autocast()`, `accumulating(last)`,
`backward(loss)`, `finish_step(skip)`, `save(...)`/`resume(...)`. Gradient accumulation, clipping and
skipping a step whose loss was non-finite behave the same on both: the loop backpropagates every
micro-batch on every rank (so collectives stay matched) and the backend drops the update when told
to (PyTorch) or when DeepSpeed's own overflow check finds the non-finite gradients (DeepSpeed, which
then reports the step as not applied).
"""
import contextlib
import json
import math
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from .atomic import remove_stale_temporaries
from .checkpoint import atomic_save, load_torch_file, resume_candidates, rng_state, set_rng_state
from .deepspeed_checkpoint import consolidated_fp32_weights, use_weights_only_loading, validate_deepspeed_checkpoint
from .dist import DistInfo, barrier

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def native_cpu_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slower than fp32."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """'auto' is bf16 autocast on CUDA. On a CPU it is bf16 only where the caller allows it (`cpu_bf16`: MAE
    pretraining steps) and the CPU has native bf16, fp32 elsewhere. Fine-tuning, evaluation and prediction on a CPU
    stay fp32: bf16 fine-tuning lost the demo's small lesions (collapsed at the class prior where fp32 reached test
    AUC 1.0, docs/performance.md), and fp32 scores do not depend on the batch they were computed in."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    return "bf16" if cpu_bf16 and native_cpu_bf16() else "fp32"


def describe_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """The training precision and, under 'auto', why: printed by the mains."""
    chosen = resolve_precision(precision, device, cpu_bf16)
    if precision != "auto":
        return f"{chosen} (--precision)"
    if device.type == "cuda":
        return "bf16 autocast (auto: CUDA)"
    if chosen == "bf16":
        return "bf16 autocast (auto: this CPU computes bf16 natively; evaluation stays fp32; --precision fp32 to turn off)"
    if cpu_bf16:
        return "fp32 (auto: this CPU has no native bf16, AVX512-BF16 or AMX)"
    return "fp32 (auto: fine-tuning on a CPU stays fp32, where bf16 lost small lesions; --precision bf16 to try it)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchBackend:
    """Single process or DDP; autocast and (for fp16) a GradScaler; checkpoints as plain dicts."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                 precision: str, accum_iter: int, clip_grad: float | None, cpu_bf16: bool = False):
        self.module = module.to(dist_info.device)
        self.dist = dist_info
        self.optimizer = optimizer
        self.accum_iter = accum_iter
        self.clip_grad = clip_grad
        self.precision = resolve_precision(precision, dist_info.device, cpu_bf16)
        self.inference_precision = resolve_precision(precision, dist_info.device)
        self.scaler = torch.amp.GradScaler(dist_info.device.type) if self.precision == "fp16" else None
        self.model = self.module
        if dist_info.distributed:
            device_ids = [dist_info.device.index] if dist_info.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.module, device_ids=device_ids, broadcast_buffers=False)

    def autocast(self, inference: bool = False):
        """Autocast for a training step, or with `inference` for evaluation (fp32 on a CPU under 'auto')."""
        dtype = AUTOCAST_DTYPES[self.inference_precision if inference else self.precision]
        return torch.autocast(self.dist.device.type, dtype=dtype, enabled=dtype is not None)

    def accumulating(self, last: bool):
        """No gradient all-reduce on micro-batches before the last one of a step."""
        if last or not self.dist.distributed:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.accum_iter
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def finish_step(self, skip: bool) -> tuple[bool, float]:
        """Apply the accumulated gradients unless `skip`; returns (applied, gradient norm)."""
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            return False, math.nan
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip_grad is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad))
        else:  # the norm for the logs, without clip_grad_norm_'s multiplication of every gradient by 1
            grad_norm = float(torch.nn.utils.get_total_norm(
                [p.grad for p in self.module.parameters() if p.grad is not None]))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips the update itself when gradients overflowed
            self.scaler.update()
            applied = True
        elif math.isfinite(grad_norm):
            self.optimizer.step()
            applied = True
        else:
            applied = False
        self.optimizer.zero_grad(set_to_none=True)
        return applied, grad_norm

    def save(self, output_dir: Path, name: str, client_state: dict) -> None:
        """Rank 0 writes OUTPUT_DIR/name atomically: weights, optimizer, scaler, RNG and client_state."""
        if self.dist.is_main:
            atomic_save({"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                         "rng": rng_state(), **client_state}, output_dir / name)

    def checkpoint_candidates(self, output_dir: Path) -> list[Path]:
        """The checkpoints `--resume auto` may use, newest first (util.checkpoint.resume_candidates)."""
        if self.dist.is_main:
            remove_stale_temporaries(output_dir)
        return resume_candidates(output_dir)

    def resume(self, path: Path, check: Callable[[dict, Path], None] | None = None) -> dict:
        """`check(saved checkpoint, path)` runs before any state is loaded (a changed model would not fit)."""
        checkpoint = load_torch_file(path)
        if check is not None:
            check(checkpoint, path)
        self.module.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.scaler is not None and checkpoint.get("scaler") is not None:
            self.scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"])
        return checkpoint

    def full_state_dict(self, output_dir: Path) -> dict | None:
        return self.module.state_dict()


class DeepSpeedBackend:
    """DeepSpeed ZeRO (stage 1, 2 or 3) from a JSON config; VolMAE's flags override the batch size,
    accumulation and clipping entries so that the same command line means the same run.

    Resume uses DeepSpeed's own checkpoints (OUTPUT_DIR/deepspeed/, `latest` written last); at the
    end `full_state_dict` consolidates the fp32 weights (DeepSpeed's zero_to_fp32) for plain files.
    Both read only files that pass weights_only loading (util.deepspeed_checkpoint).
    """

    CHECKPOINT_DIR = "deepspeed"

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                 config_path: str, batch_size: int, accum_iter: int, clip_grad: float | None):
        if dist_info.device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not torch.distributed.is_initialized():  # one process without a launcher: DeepSpeed would look for MPI
            backend = "nccl" if dist_info.device.type == "cuda" else "gloo"
            torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                                                 rank=0, world_size=1)

        config = json.loads(Path(config_path).read_text())
        config.update({"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": accum_iter,
                       "gradient_clipping": clip_grad or 0.0, "steps_per_print": 10 ** 9})
        config.pop("train_batch_size", None)
        self.config = config
        self.dist = dist_info
        self.engine, _, _, _ = deepspeed.initialize(model=module.to(dist_info.device), optimizer=optimizer,
                                                    config=config)
        use_weights_only_loading(self.engine)
        self.module = self.engine.module
        self.model = self.engine
        self.optimizer = self.engine.optimizer
        self.precision = "bf16" if config.get("bf16", {}).get("enabled") else \
            "fp16" if config.get("fp16", {}).get("enabled") else "fp32"
        self.kept_tags: set[str] = set()

    @property
    def input_dtype(self) -> torch.dtype:
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.precision]

    def autocast(self, inference: bool = False):
        return contextlib.nullcontext()  # DeepSpeed holds the weights in the configured dtype

    def accumulating(self, last: bool):
        return contextlib.nullcontext()  # DeepSpeed defers the reduction to the accumulation boundary

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        self.engine.step()  # steps the optimizer at the accumulation boundary only

    def finish_step(self, skip: bool) -> tuple[bool, float]:
        applied = self.engine.was_step_applied()
        if skip and applied:
            raise RuntimeError("DeepSpeed applied a step whose loss was non-finite; its overflow check missed it")
        norm = self.engine.get_global_grad_norm()
        return applied, float(norm) if norm is not None and applied else math.nan

    def save(self, output_dir: Path, name: str, client_state: dict) -> None:
        """Every rank writes its shard of tag `step<N>`; DeepSpeed points `latest` at it once complete.
        Older tags are removed, except those saved under a kept name (checkpoint-{epoch})."""
        folder = output_dir / self.CHECKPOINT_DIR
        tag = f"step{client_state['step']}"
        self.engine.save_checkpoint(str(folder), tag=tag, client_state={**client_state, "rng": rng_state()})
        barrier()
        if not name.startswith("checkpoint-last"):
            self.kept_tags.add(tag)
        if self.dist.is_main:
            for old in folder.glob("step*"):
                if old.is_dir() and old.name != tag and old.name not in self.kept_tags:
                    shutil.rmtree(old, ignore_errors=True)

    def checkpoint_candidates(self, output_dir: Path) -> list[Path]:
        folder = output_dir / self.CHECKPOINT_DIR
        return [folder] if (folder / "latest").exists() else []

    def resume(self, path: Path, check: Callable[[dict, Path], None] | None = None) -> dict:
        """Every file of the checkpoint passes weights_only loading before DeepSpeed reads any, and
        `check(saved client state, path)` runs before DeepSpeed loads its state."""
        saved = validate_deepspeed_checkpoint(path)
        if check is not None:
            check(saved, path)
        _, client_state = self.engine.load_checkpoint(str(path))
        set_rng_state(client_state["rng"])
        return client_state

    def full_state_dict(self, output_dir: Path) -> dict | None:
        """fp32 weights gathered from the last DeepSpeed checkpoint, on rank 0 (None elsewhere)."""
        barrier()
        if not self.dist.is_main:
            return None
        state = consolidated_fp32_weights(output_dir / self.CHECKPOINT_DIR)
        return {k: v.float() for k, v in state.items()}


def make_backend(module: torch.nn.Module, optimizer: torch.optim.Optimizer, dist_info: DistInfo,
                 deepspeed_config: str | None, precision: str, batch_size: int, accum_iter: int = 1,
                 clip_grad: float | None = None, cpu_bf16: bool = False) -> TorchBackend | DeepSpeedBackend:
    """DeepSpeed when a config is given (its JSON sets the precision), else plain PyTorch or DDP; `cpu_bf16` lets
    'auto' pick bf16 on a CPU with native bf16 (resolve_precision)."""
    if deepspeed_config:
        return DeepSpeedBackend(module, optimizer, dist_info, deepspeed_config, batch_size, accum_iter, clip_grad)
    return TorchBackend(module, optimizer, dist_info, precision, accum_iter, clip_grad, cpu_bf16)
