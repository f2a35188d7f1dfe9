"""How many threads torch uses on a CPU: its default is one per core, which is right on an idle machine and
ruinous on a shared one. OpenMP threads that wait for a core spin, so a training step with more threads than free
cores can run several times slower than with one (docs/performance.md, "Threads")."""
import os
import time
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")
SAMPLE_SECONDS = 0.2  # 20 clock ticks per core: enough to tell a busy core from an idle one


def available_cores() -> int:
    """The cores this process may run on (a SLURM allocation or taskset narrows them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(cores: int, local_ranks: int, load: float) -> int:
    """One share of the cores per rank on this node, less the cores other work keeps busy, at least one."""
    share = max(1, cores // max(1, local_ranks))
    free = max(1, cores - round(load))
    return max(1, min(share, free))


def cpu_ticks(stat: str) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, all ticks)} from the text of /proc/stat; waiting on I/O counts as idle."""
    ticks = {}
    for line in stat.splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            counts = [int(v) for v in values[:8]]  # user nice system idle iowait irq softirq steal
            ticks[int(name[3:])] = (sum(counts) - counts[3] - counts[4], sum(counts))
    return ticks


def busy_cores(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: set[int]) -> float:
    """How many of `cpus` other work kept busy between two readings of /proc/stat."""
    busy = 0.0
    for cpu in cpus & before.keys() & after.keys():
        elapsed = after[cpu][1] - before[cpu][1]
        busy += (after[cpu][0] - before[cpu][0]) / elapsed if elapsed > 0 else 0.0
    return busy


def current_load() -> tuple[float, str]:
    """(busy cores among this process's, how measured): /proc/stat over SAMPLE_SECONDS while this process
    sleeps, so it counts only other work. The 1-minute load average, where there is no /proc/stat, lags:
    a step a recipe ran just before still counts as busy there, and the next step would take one thread."""
    if PROC_STAT.is_file() and hasattr(os, "sched_getaffinity"):
        before = cpu_ticks(PROC_STAT.read_text())
        time.sleep(SAMPLE_SECONDS)
        after = cpu_ticks(PROC_STAT.read_text())
        return busy_cores(before, after, os.sched_getaffinity(0)), f"busy over {SAMPLE_SECONDS:g} s"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return load, "1-minute load average"


def set_cpu_threads() -> str:
    """Set torch's intra-op threads unless OMP_NUM_THREADS says; returns the choice and why, for the log."""
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    cores = available_cores()
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    load, measured = current_load()
    threads = choose_threads(cores, local_ranks, load)
    torch.set_num_threads(threads)
    why = f"{cores} core(s), {local_ranks} rank(s) on this node, {load:.1f} core(s) {measured}"
    return f"{threads} ({why}; OMP_NUM_THREADS overrides)"
