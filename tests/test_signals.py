"""Ctrl-C and SIGTERM end every command in one line, with what was complete kept (issue 35: R2, R3). A fine-tuning
run stopped by SIGTERM died without a word and its re-run appended to the dead run's log.txt and tensorboard
folder; Ctrl-C printed a 30-line traceback."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import REPO, TINY_PRETRAIN, lidc_patients, run_cli

FINETUNE = ["--setup", "volumes", "--label", "malignant", "--group", "patient_id", "--split_ratio", "0.5,0.25,0.25",
            "--input_size", "16,24,24", "--model", "auto", "--batch_size", "8", "--bootstrap", "0", "--search", "none"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    """24 real LIDC crops and their volume cache, built by a one-epoch run."""
    rows, _ = lidc_patients(8, 8)
    folder = tmp_path_factory.mktemp("signals")
    rows.to_csv(folder / "labels.csv", index=False)
    run_cli(["main_finetune.py", *FINETUNE, "--meta", str(folder / "labels.csv"), "--epochs", "1",
             "--volume_cache", str(folder / "cache"), "--output_dir", str(folder / "first")])
    return folder


def start(args: list[str]) -> subprocess.Popen:
    """A command as a terminal starts it: its own process group, SIGINT at its default (a background job of a
    non-interactive shell inherits it ignored)."""
    return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stop_after(process: subprocess.Popen, line_start: str, sig: int) -> tuple[int, str, str]:
    """Wait (up to 5 minutes) for a stdout line starting `line_start`, send `sig` (SIGINT to the whole group, as
    Ctrl-C does), and collect the exit status and output. The command must end within 2 minutes of the signal (it
    went on for 30 s, printing a traceback, before it stopped; a busy machine gets ample time)."""
    seen, deadline = [], time.monotonic() + 300
    for line in process.stdout:
        seen.append(line)
        if line.startswith(line_start) or time.monotonic() > deadline:
            break
    assert process.poll() is None, "".join(seen)[-2000:]
    os.killpg(process.pid, sig) if sig == signal.SIGINT else process.send_signal(sig)
    out, err = process.communicate(timeout=120)
    return process.returncode, "".join(seen) + out, err


def assert_one_line(status: int, err: str, expected: int, by: str) -> None:
    assert status == expected, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith(f"stopped by {by}: what was complete is kept")


def test_a_fine_tuning_run_stopped_by_sigterm_or_ctrl_c_says_so_and_its_rerun_starts_fresh(labels):
    out = labels / "stopped"
    command = ["main_finetune.py", *FINETUNE, "--meta", str(labels / "labels.csv"), "--epochs", "200",
               "--volume_cache", str(labels / "cache"), "--output_dir", str(out)]
    status, said, err = stop_after(start(command), "epoch 2:", signal.SIGTERM)
    assert_one_line(status, err, 143, "SIGTERM")
    assert (out / "log.txt").exists() and not (out / "results.json").exists()
    assert (out / ".volmae-run.lock").read_text() == ""  # released: no record of a live holder
    dead_log = (out / "log.txt").read_text()
    status, said, err = stop_after(start(command), "epoch 1:", signal.SIGINT)
    assert_one_line(status, err, 130, "Ctrl-C")
    assert "moved them to" in said and (out / "stopped-1" / "log.txt").read_text() == dead_log
    assert (out / "stopped-1" / "tensorboard").is_dir()
    epochs = [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()]
    assert epochs[0] == 0 and epochs == sorted(epochs)  # a fresh log, not the dead run's continued
    assert len(list((out / "tensorboard").iterdir())) == 1


def test_pretraining_stopped_by_sigterm_checkpoints_and_ctrl_c_ends_in_one_line(phantom_dir, tmp_path):
    command = ["main_pretrain.py", "--data_path", str(phantom_dir), *TINY_PRETRAIN, "--epochs", "400", "--batch_size",
               "2", "--output_dir", str(tmp_path)]
    status, said, err = stop_after(start(command), "model mae_vit_tiny_patch16", signal.SIGTERM)
    assert status == 143 and "Traceback" not in err, err[-3000:]
    assert "the checkpoint is saved" in said and (tmp_path / "checkpoint-last.pth").exists()
    status, said, err = stop_after(start(command), "resumed from", signal.SIGINT)
    assert_one_line(status, err, 130, "Ctrl-C")


def test_prediction_and_export_stopped_by_sigterm_leave_no_half_output(labels, tmp_path):
    cases = pd.DataFrame({"path": list(pd.read_csv(labels / "labels.csv")["path"]) * 40})
    cases.to_csv(tmp_path / "cases.csv", index=False)
    predicting = start(["main_predict.py", "--checkpoint", str(labels / "first" / "best.pth"), "--input_csv",
                        str(tmp_path / "cases.csv"), "--output_csv", str(tmp_path / "out.csv"), "--batch_size", "2"])
    started = ""
    while "predict:" not in started:  # the progress bar has started: volumes are being read
        started += predicting.stderr.read(16)
        assert predicting.poll() is None, started
    predicting.send_signal(signal.SIGTERM)
    _, err = predicting.communicate(timeout=300)
    assert_one_line(predicting.returncode, err, 143, "SIGTERM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]
    exporting = start(["main_export.py", "--checkpoint", str(labels / "first" / "best.pth"), "--format", "onnx",
                       "--output_dir", str(tmp_path / "export")])
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".export.building-*")) and exporting.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    exporting.send_signal(signal.SIGTERM)
    _, err = exporting.communicate(timeout=300)
    assert_one_line(exporting.returncode, err, 143, "SIGTERM")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cases.csv"]
