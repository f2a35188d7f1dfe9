"""Real full disks (issue 26): small tmpfs mounts made and removed by each test, not /dev/full. Every write
that meets one ends the run in one line naming the file and the free space, and keeps what was there."""
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import run_cli, shared_path
from volmae.util.atomic import DiskWriteError
from volmae.util.checkpoint import atomic_save
from volmae.util.run_lock import lock_output_folder
from volmae.util.run_log import RunLog

TINY_PRETRAIN = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8", "--decoder_embed_dim",
                 "64", "--decoder_depth", "1", "--decoder_num_heads", "2", "--num_workers", "0", "--vis_every", "0",
                 "--warmup_epochs", "1", "--epochs", "2", "--batch_size", "4"]


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that size; `remount(path, size)` resizes it; all unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount(point: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)


def fill(point: Path) -> None:
    """Take every free byte of the file system."""
    with open(point / "filler", "wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\0" * 4096)
        except OSError:
            pass


def one_line_error(result: subprocess.CompletedProcess, *words: str) -> str:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "error: cannot write" in line and "MB free there" in line and all(w in line for w in words), line
    return line


def test_a_checkpoint_that_does_not_fit_keeps_the_old_one(small_disk):
    disk = small_disk("256k")
    atomic_save({"w": torch.ones(10)}, disk / "checkpoint.pth")
    with pytest.raises(DiskWriteError, match=r"checkpoint.pth: no space left on the device \(0\.\d+ MB free"):
        atomic_save({"w": torch.zeros(200_000)}, disk / "checkpoint.pth")
    assert torch.load(disk / "checkpoint.pth", weights_only=True)["w"].sum() == 10
    assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.pth"]  # no temporary left


def test_the_log_tensorboard_and_lock_record_name_themselves(small_disk):
    disk = small_disk("1m")
    log = RunLog(disk, disk / "tensorboard", enabled=True)
    log.scalars({"step": 0, "loss": 1.0}, 0)
    fill(disk)
    with pytest.raises(DiskWriteError, match="log.txt: no space left.*the lines written before are kept"):
        log.scalars({"step": 1, "note": "x" * 10_000}, 1)  # beyond the page log.txt already has
    assert (disk / "log.txt").read_text().splitlines()[0] == '{"step": 0, "loss": 1.0}'
    with pytest.raises(DiskWriteError, match="tensorboard2: no space left"):
        RunLog(disk, disk / "tensorboard2", enabled=True)
    with pytest.raises(DiskWriteError, match=r"\.volmae-run\.lock: no space left"):
        lock_output_folder(disk)


def test_pretraining_on_a_full_disk_ends_in_one_line(small_disk, phantom_dir):
    disk = small_disk("1m")
    one_line_error(run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), *TINY_PRETRAIN,
                            "--output_dir", str(disk / "pretrain")], check=False), "checkpoint-last.pth")
    full = small_disk("1m")
    (full / "pretrain").mkdir()
    fill(full)
    one_line_error(run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), *TINY_PRETRAIN,
                            "--output_dir", str(full / "pretrain")], check=False), ".volmae-run.lock")


def test_fine_tuning_on_a_full_disk_ends_in_one_line(small_disk):
    disk = small_disk("2m")
    result = run_cli(["main_finetune.py", "--data_flag", "adrenalmnist3d", "--data_root", str(shared_path("medmnist")),
                      "--model", "vit3d_tiny_patch14", "--epochs", "1", "--bootstrap", "0", "--train_samples", "64",
                      "--output_dir", str(disk / "ft")], check=False)
    one_line_error(result, "best.pth")
    assert not (disk / "ft" / "results.json").exists()


def test_a_cache_build_on_a_full_disk_stops_in_one_line_and_resumes_with_nothing_lost(small_disk):
    sources = shared_path("hippocampus_mri") / "images"
    disk = small_disk("3m")
    command = ["main_cache.py", "--input", str(sources), "--output", str(disk / "cache"),
               "--size", "32,32,32", "--workers", "2", "--shard_size", "16"]
    one_line_error(run_cli(command, check=False), "shard-")
    remount(disk, "64m")
    run_cli(command)
    manifest = pd.read_csv(disk / "cache" / "manifest.csv")
    assert (manifest["status"] == "ok").all() and len(manifest) == len(list(sources.glob("*.nii.gz")))


def test_prediction_outputs_on_a_full_disk_end_in_one_line(small_disk, finetuned, tmp_path):
    checkpoint, _ = finetuned
    volumes = np.load(shared_path("medmnist") / "adrenalmnist3d.npz")["test_images"][:4]
    rows = []
    for i, volume in enumerate(volumes):
        np.save(tmp_path / f"case{i}.npy", volume)
        rows.append({"id": f"case{i}", "path": f"case{i}.npy"})
    pd.DataFrame(rows).to_csv(tmp_path / "cases.csv", index=False)
    disk = small_disk("1m")
    fill(disk)
    result = run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", str(tmp_path / "cases.csv"),
                      "--output_csv", str(disk / "predictions.csv")], check=False)
    one_line_error(result, "predictions.csv")
    assert not (disk / "predictions.csv").exists()
