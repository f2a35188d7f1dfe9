"""What the studies share: running a step as the command a user would type, timing it in CPU seconds (every
attempt's, a killed one's included), remembering finished steps so that a re-run goes on where a killed one
stopped, and summarising a fine-tuning run over seeds.

A finished step's record holds the command it ran and the hashes of the files it read (the lists and tables a
study writes for it). A re-run skips it only when both are the same; otherwise it is refused in one line naming
the change, never reported "already done" for other work."""
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..util.atomic import atomic_write
from ..util.errors import UsageError, VolMAEError

REPO = Path(__file__).resolve().parents[1]  # where the mains are, in a checkout and in the installed package
# A tqdm progress bar ("epoch 3:  40%|####      | 8/20 [...]"). Popen's text mode turns its carriage returns
# into newlines, so bars are recognised by their shape, not by '\r'.
PROGRESS_BAR = re.compile(r"\d+%\|")
CPU_SAMPLE_SECONDS = 30.0  # how often a running step's CPU time so far is saved, for when it is killed


def cpu_so_far(pid: int) -> float:
    """CPU seconds a live process and the children it has waited for have used (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime stime cutime cstime


def _save_cpu(partial: Path, seconds: float) -> None:
    atomic_write(partial, lambda tmp: tmp.write_text(json.dumps({"cpu_seconds": round(seconds, 1)})))


class StepFailed(VolMAEError, RuntimeError):
    """A step's command exited with an error; the message names it and its log."""


class StepChanged(UsageError):
    """A finished step was asked again with other arguments or inputs; the message names the change."""


def file_hashes(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file, keyed by its name: what a step read, for its record."""
    hashes = {}
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        hashes[Path(path).name] = digest.hexdigest()
    return hashes


def flag_values(command: list[str]) -> dict[str, str]:
    """`--flag value` pairs (and bare switches) of a command line, in order."""
    values, i = {}, 0
    while i < len(command):
        item = command[i]
        if item.startswith("--"):
            following = command[i + 1] if i + 1 < len(command) else None
            is_value = following is not None and not following.startswith("--")
            values[item] = following if is_value else "(set)"
            i += 2 if is_value else 1
        else:
            values[item] = item
            i += 1
    return values


def describe_change(before: dict, now: dict) -> str:
    """The differences between two records' commands and inputs, as `--flag A there, B here`."""
    old, new = flag_values(before.get("command", [])), flag_values(now["command"])
    changes = [f"{key} {old.get(key, '(absent)')} there, {new.get(key, '(absent)')} here"
               for key in dict.fromkeys([*old, *new]) if old.get(key) != new.get(key)]
    changes += [f"{name} changed" for name in dict.fromkeys([*before.get("inputs", {}), *now["inputs"]])
                if before.get("inputs", {}).get(name) != now["inputs"].get(name)]
    return "; ".join(changes[:4]) + (f" and {len(changes) - 4} more" if len(changes) > 4 else "")


def check_same_work(done: Path, command: list[str], inputs: dict[str, str]) -> dict:
    """The finished step's record if it ran exactly this command on these inputs; StepChanged otherwise."""
    record = json.loads(done.read_text())
    asked = {"command": command[1:], "inputs": inputs}  # the interpreter may differ between machines
    if "command" not in record:
        raise StepChanged(f"{done} records no arguments (an older VolMAE wrote it), so this step cannot be known to "
                          f"be the same work; give the study a new --output_dir")
    if record["command"] != asked["command"] or record.get("inputs", {}) != inputs:
        raise StepChanged(f"{done.parent.parent} holds a finished step {done.stem} done with other arguments "
                          f"({describe_change(record, asked)}); give this study its own --output_dir, or delete "
                          f"{done} to redo that step")
    return record


def run(command: list[str], log: Path, done: Path | None = None, threads: int | None = None,
        echo: bool = True, inputs: list[Path] = ()) -> dict:
    """Run one step with its output in `log` (and, with `echo`, on our stdout); its CPU and wall-clock seconds,
    the CPU time being the step's own (its process and what it waited for), so steps may run side by side.
    `threads` sets OMP_NUM_THREADS for it. With `done`, a step that finished before (its record in `done`) is
    not run again and keeps its recorded times, and the CPU time counts every attempt: a failed one's, and a
    killed one's as last sampled (every CPU_SAMPLE_SECONDS, beside `done`), so a resumed pretraining is not
    costed at its last part alone. The wall-clock time is the last attempt's. `inputs` are the files the step
    reads that the command line does not describe (check_same_work)."""
    hashes = file_hashes(list(inputs))
    if done is not None and done.exists():
        record = check_same_work(done, command, hashes)
        print(f"already done: {' '.join(command[1:3])} ... ({done})", flush=True)
        return record
    partial = None if done is None else done.with_name(f"{done.stem}.partial.json")  # earlier attempts' CPU
    earlier = json.loads(partial.read_text())["cpu_seconds"] if partial is not None and partial.exists() else 0.0
    if partial is not None:
        partial.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    wall = time.perf_counter()
    print(f"$ {' '.join(command)}", flush=True)
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1, env=env)
        sampled = time.monotonic()
        for line in process.stdout:
            out.write(line)
            if echo and not PROGRESS_BAR.search(line):  # progress bars stay in the log
                sys.stdout.write(line)
            if partial is not None and time.monotonic() - sampled >= CPU_SAMPLE_SECONDS:
                _save_cpu(partial, earlier + cpu_so_far(process.pid))
                sampled = time.monotonic()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = code = os.waitstatus_to_exitcode(status)
    cpu = earlier + usage.ru_utime + usage.ru_stime
    if code != 0:
        if partial is not None:
            _save_cpu(partial, cpu)
        raise StepFailed(f"{command[1]} exited with {code}; its log: {log}")
    record = {"cpu_seconds": round(cpu, 1), "wall_seconds": round(time.perf_counter() - wall, 1),
              "command": command[1:], "inputs": hashes}
    if done is not None:
        atomic_write(done, lambda tmp: tmp.write_text(json.dumps(record)))
        partial.unlink(missing_ok=True)
    if not echo:
        print(f"finished in {record['wall_seconds']:.0f} s: {' '.join(command[1:3])} ... (log: {log})", flush=True)
    return record


def flags(options: dict) -> list[str]:
    return [item for pair in options.items() for item in pair]


def seed_summary(runs: list[dict], extra_cpu: float = 0.0) -> dict:
    """Mean and std of test AUC and ACC over seeds; `runs` are per-seed results.json contents."""
    rows = [{"seed": r["seed"], "test_auc": r["test"]["auc"], "test_acc": r["test"]["acc"], "val_auc": r["val"]["auc"],
             "test_acc_at_val_threshold": r.get("test_acc_at_val_threshold"), "best_epoch": r["best_epoch"],
             "collapsed": r["collapsed"], "test_at_prior": r["test"]["at_prior"],
             "cpu_seconds": r["cpu_seconds"], "seconds": r["seconds"]} for r in runs]
    auc, acc = [r["test_auc"] for r in rows], [r["test_acc"] for r in rows]
    finetune_cpu = sum(r["cpu_seconds"] for r in rows)
    return {"test_auc_mean": float(np.mean(auc)), "test_auc_std": float(np.std(auc)),
            "test_acc_mean": float(np.mean(acc)), "test_acc_std": float(np.std(acc)),
            "collapsed_seeds": [r["seed"] for r in rows if r["collapsed"]], "per_seed": rows,
            "cpu_seconds": round(extra_cpu + finetune_cpu, 1),
            "cpu_seconds_one_seed": round(extra_cpu + finetune_cpu / len(rows), 1)}


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def probe_curve(log: Path) -> list[dict]:
    return [{k: r[k] for k in ("step", "epoch", "probe_knn_auc", "probe_linear_auc")} for r in read_log(log)
            if "probe_knn_auc" in r]


def loss_curve(log: Path) -> list[dict]:
    """The pretraining loss (and the held-out reconstruction loss, where measured) per log line."""
    keys = ("step", "epoch", "loss", "val_loss", "lr")
    return [{k: r[k] for k in keys if k in r} for r in read_log(log) if "loss" in r or "val_loss" in r]
