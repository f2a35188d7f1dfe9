"""Shared test helpers: where the real data is, and running the entry points as users do."""
import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from volmae.util.cli import run_main

REPO = Path(__file__).resolve().parents[1]
# The demo in the suite: a few pretraining epochs and fewer fine-tuning epochs than `make demo`; enough to leave the prior
DEMO_TEST_BUDGET = ["--held_back", "8", "--pretrain_epochs", "2", "--finetune_epochs", "30"]
# Under pytest-xdist each worker's tests get an equal share of the cores: oversubscribed OpenMP threads spin
# against each other, which made the demo 5x slower beside another test
CORES_PER_TEST = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(CORES_PER_TEST)
SHARED_DATA = Path(os.environ.get("VOLMAE_SHARED_DATA", REPO.parent / "shared" / "data"))
LIBRARY = ["util", "volumes", "datasets", "models", "inference", "pretraining", "finetuning", "studies"]


def copy_of_source(destination: Path) -> Path:
    """The repository's source, copied (no virtualenv, git, caches, build or run outputs): for a test that
    writes into the tree, or builds from it, without touching the real one."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.pyc", "build", "*.egg-info",
                                                                     "demo_output", "runs"))
    return destination


def library_files() -> list[Path]:
    """The package's library code: what the mains import and nothing imports back."""
    return sorted(p for entry in LIBRARY
                  for p in ((REPO / entry).rglob("*.py") if (REPO / entry).is_dir() else [REPO / entry]))


def shared_path(*parts: str) -> Path:
    """A path under the shared real data; the test is skipped when that data is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set VOLMAE_SHARED_DATA to the shared data folder)")
    return path


def lidc_patients(malignant: int, benign: int) -> tuple[pd.DataFrame, list[str]]:
    """Every real LIDC crop of the first `malignant` patients with a malignant nodule and the first `benign`
    without one, paths absolute; and those patients, in that order."""
    root = shared_path("lidc_nodules")
    table = pd.read_csv(root / "labels.csv")
    patients = table.groupby("patient_id")["malignant"].max()
    chosen = list(patients[patients == 1].index[:malignant]) + list(patients[patients == 0].index[:benign])
    rows = table[table["patient_id"].isin(chosen)].copy()
    rows["path"] = [str(root / p) for p in rows["path"]]
    return rows, chosen


def one_line_refusal(result, *words: str) -> str:
    """A command refused in one line naming `words`: exit status 1, no traceback, the last line `error: ...`."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(word in line for word in words), line
    return line


TINY_PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8", "--decoder_embed_dim",
                 "64", "--decoder_depth", "1", "--decoder_num_heads", "2", "--num_workers", "0", "--vis_every", "0",
                 "--warmup_epochs", "1", "--epochs", "1", "--batch_size", "4", "--precision", "fp32"]


def tiny_encoder(folder: Path, corpus: Path) -> Path:
    """encoder.pth of a one-epoch tiny MAE pretrained on `corpus` into `folder`."""
    run_cli(["main_pretrain.py", "--data_path", str(corpus), *TINY_PRETRAIN, "--output_dir", str(folder)])
    return folder / "encoder.pth"


def lidc_classifier(folder: Path) -> Path:
    """`folder`/ft: a classifier fine-tuned for one epoch on 24 real LIDC crops (its whole run folder: best.pth,
    results, scores, the volume cache, logs), and `folder`/cases.csv naming its test crops; `folder`."""
    rows, _ = lidc_patients(8, 8)
    rows.to_csv(folder / "labels.csv", index=False)
    run_cli(["main_finetune.py", "--setup", "volumes", "--meta", str(folder / "labels.csv"), "--label", "malignant",
             "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25", "--input_size", "16,24,24", "--model", "auto",
             "--epochs", "1", "--batch_size", "8", "--bootstrap", "0", "--search", "none",
             "--output_dir", str(folder / "ft")])
    scores = pd.read_csv(folder / "ft" / "test_scores.csv")
    scores[["path"]].assign(id=[f"case{i}" for i in range(len(scores))]).to_csv(folder / "cases.csv", index=False)
    return folder


def run_cli(args: list[str], timeout: float = 600, check: bool = True, env: dict | None = None,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run `python ARGS` (or `python -m torch.distributed.run ...`) from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True,
                            text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}"
                             f"\n--- stderr\n{result.stderr[-4000:]}")
    return result


def run_entry(capsys, module: str, args: list[str], cwd: Path | None = None) -> SimpleNamespace:
    """`python MODULE.py ARGS` inside this process, as its console script runs it (util.cli.run_main): the same
    exit status and output, without the seconds an interpreter takes to import torch, timm and MONAI. For the
    mains with `get_args_parser()` (predict, export); `cwd` is where relative paths are read from."""
    entry = importlib.import_module(f"volmae.{module}")
    previous = Path.cwd()
    os.chdir(cwd or previous)
    try:
        status = run_main(entry.main, entry.get_args_parser().parse_args([str(a) for a in args]))
    finally:
        os.chdir(previous)
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=status, stdout=captured.out, stderr=captured.err)


@pytest.fixture(autouse=True)
def fast_tests_start_no_process(request, monkeypatch) -> None:
    """A test marked `fast` (the in-process set of `make test-fast`) may not start a command: it would not be
    fast for long."""
    if request.node.get_closest_marker("fast"):
        def refuse(*args, **kwargs):
            raise AssertionError("a test marked fast started a process; leave it out of the fast set")
        monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Eight small synthetic CT phantoms as NIfTI files."""
    from volmae.volumes.phantoms import write_phantom_corpus

    folder = tmp_path_factory.mktemp("phantoms")
    write_phantom_corpus(folder, count=8, seed=0, size_range=(24, 40), progress=False)
    return folder


@pytest.fixture(scope="session")
def finetuned(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A classifier from main_finetune.py on AdrenalMNIST3D (one quick epoch) and its test scores."""
    out = tmp_path_factory.mktemp("ft")
    run_cli(["main_finetune.py", "--data_flag", "adrenalmnist3d", "--data_root", str(shared_path("medmnist")),
             "--model", "vit3d_tiny_patch14", "--epochs", "1", "--bootstrap", "0", "--train_samples", "128",
             "--output_dir", str(out)])
    scores = pd.read_csv(next(out.glob("*_test_*.csv")), header=None, index_col=0).sort_index().values
    return out / "best.pth", scores


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """`make demo`'s pipeline (launch/recipes/demo.sh) on a smaller budget; its output folder."""
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run(["bash", str(REPO / "launch" / "recipes" / "demo.sh"), "--output_dir", str(out), *DEMO_TEST_BUDGET],
                            cwd=REPO, env={**os.environ, "VOLMAE_PYTHON": sys.executable, "OMP_NUM_THREADS": str(CORES_PER_TEST)},
                            capture_output=True, text=True, timeout=1800)
    (out / "demo_stdout.txt").write_text(result.stdout)
    if result.returncode != 0:
        raise AssertionError(f"demo.sh exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return out
