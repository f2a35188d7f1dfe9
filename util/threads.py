"""How many threads torch uses on a CPU: its default is one per core, which is right on an idle machine and
ruinous on a shared one. OpenMP threads that wait for a core spin, so a training step with more threads than free
cores can run several times slower than with one (docs/performance.md, "Threads")."""
import os

import torch


def available_cores() -> int:
    """The cores this process may run on (a SLURM allocation or taskset narrows them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(cores: int, local_ranks: int, load: float) -> int:
    """One share of the cores per rank on this node, less the cores other work keeps busy (the load average
    before this run starts), at least one."""
    share = max(1, cores // max(1, local_ranks))
    free = max(1, cores - round(load))
    return max(1, min(share, free))


def set_cpu_threads() -> str:
    """Set torch's intra-op threads unless OMP_NUM_THREADS says; returns the choice and why, for the log."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = available_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = choose_threads(cores, local_ranks, load)
    torch.set_num_threads(threads)
    why = f"{cores} core(s), {local_ranks} rank(s) on this node, load average {load:.1f}"
    return f"{threads} ({why}; OMP_NUM_THREADS overrides)"
