"""Process-group setup: torchrun, or srun starting one task per rank; nccl on CUDA, gloo on CPU."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UsageError
from .threads import set_cpu_threads


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_threads: str = ""  # on a CPU: torch's thread count and why (util.threads)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int) -> torch.device:
    """'auto' picks this rank's GPU when there is one, else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was asked for, but no CUDA device is available")
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    return device


def rank_environment(env=os.environ) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else from srun's (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID) when a job step runs one task per rank without torchrun."""
    if "RANK" in env:
        return int(env["RANK"]), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    if int(env.get("SLURM_NTASKS", 1)) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(requested_device: str = "auto") -> DistInfo:
    """Join the process group when there is more than one rank (MASTER_ADDR/PORT from the launcher,
    or for srun from the batch script, defaulting to the node that launched the step)."""
    rank, world_size, local_rank = rank_environment()
    if world_size > 1 and "RANK" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", os.environ.get("SLURM_LAUNCH_NODE_IPADDR", "127.0.0.1"))
        os.environ.setdefault("MASTER_PORT", "29500")
    for name, value in (("RANK", rank), ("WORLD_SIZE", world_size), ("LOCAL_RANK", local_rank)):
        os.environ.setdefault(name, str(value))  # what libraries such as DeepSpeed read
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restart != "0":
            # torchrun's store outlives the workers it restarts (--max_restarts): under a fresh prefix, the new
            # group never reads the dead group's addresses, which left gloo connecting to them forever
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                                  is_master=False)
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"volmae-restart-{restart}", store),
                                    rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, device, set_cpu_threads() if device.type == "cpu" else "")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; a no-op outside a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
