"""Bad inputs and operations, as a new user makes them: every source and row accounted for with its reason,
exit codes as documented, nothing silent, no traceback, no unpickled code.

Cache: every source is a manifest row (ok, or skipped with the reason). Prediction: one output row per
input row, exit 0 whatever the rows hold; outputs that cannot be written stop the run before any volume
is read. Pretraining: exit 1 with the unreadable files named, and no encoder, when nothing (or too much)
could be loaded. Resume: an unreadable checkpoint is named, `--resume auto` falls back to the newest
readable one, a crafted one is refused in one line.
"""
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from tests.conftest import run_cli, shared_path
from tests.volumes import write_bad_inputs
from volmae.inference.checkpoints import load_checkpoint
from volmae.util.atomic import DiskWriteError, atomic_write, temporary_for
from volmae.util.checkpoint import CheckpointError, atomic_save
from volmae.util.deepspeed_checkpoint import consolidated_fp32_weights
from volmae.util.run_lock import LOCK_FILE, output_folder_lock
from volmae.volumes.cache import VolumeCache

TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "28", "--patch_size", "14", "--decoder_embed_dim", "64",
        "--decoder_depth", "1", "--decoder_num_heads", "2", "--num_workers", "0", "--log_every", "1",
        "--vis_every", "0", "--warmup_epochs", "1", "--lr", "1e-3"]


class Payload:
    """Unpickling this creates a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def crafted_checkpoint(path: Path, marker: Path) -> None:
    torch.save({"model": {}, "step": 1, "payload": Payload(marker)}, path)


def float_volume(nonfinite: int = 0, shape=(12, 14, 16), seed: int = 0) -> np.ndarray:
    """A grey-level float32 volume (z, y, x) with `nonfinite` NaN/Inf voxels, or all of them with -1."""
    array = (np.random.default_rng(seed).random(shape) * 400 - 100).astype(np.float32)
    flat = array.reshape(-1)
    if nonfinite < 0:
        flat[:] = np.nan
    else:
        flat[:nonfinite:2] = np.nan
        flat[1:nonfinite:2] = np.inf
    return array


def write_sitk(array: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def write_header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """An honest NIfTI header promising an enormous int16 volume, without its data."""
    image = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    image.header.set_data_shape(shape)
    block = image.header.binaryblock
    path.write_bytes(block + b"\0" * (352 - len(block)) + b"\0" * 64)
    return path


def write_zero_length_axis(path: Path) -> Path:
    """A NIfTI whose header gives one axis length 0 (ITK reads it as length 1 and carries on)."""
    write_sitk(float_volume(), path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<h", data, 40 + 2 * 3, 0)
    path.write_bytes(bytes(data))
    return path


# ---- cache -----------------------------------------------------------------------------------------------


def nonfinite_sources(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    write_sitk(float_volume(2), folder / "nan_inf.nii.gz")
    write_sitk(float_volume(1), folder / "nan.mha")
    write_sitk(float_volume(-1), folder / "all_nan.nii.gz")
    write_zero_length_axis(folder / "zero_axis.nii")
    write_header_only(folder / "enormous.nii", (2048, 2048, 2048))
    return {"nan_inf.nii.gz": "2 non-finite voxels", "nan.mha": "1 non-finite voxels",
            "all_nan.nii.gz": f"all {12 * 14 * 16} voxels are non-finite",
            "zero_axis.nii": "axis of length 0", "enormous.nii": "more than --max_voxels"}


def build(corpus: Path, output: Path, *extra: str, check: bool = True):
    return run_cli(["main_cache.py", "--input", str(corpus), "--output", str(output), "--size", "16",
                    "--workers", "1", *extra], check=check)


def test_every_cache_source_is_in_the_manifest_with_its_reason(tmp_path, phantom_dir):
    corpus = tmp_path / "corpus"
    good = sorted(phantom_dir.glob("*.nii.gz"))[:2]
    corpus.mkdir()
    for path in good:
        shutil.copy(path, corpus)
    expected = {**write_bad_inputs(corpus / "broken", good[0]), **nonfinite_sources(corpus / "nonfinite")}
    result = build(corpus, tmp_path / "cache")
    manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv", keep_default_na=False)
    assert len(manifest) == len(good) + len(expected)
    reasons = manifest.set_index(manifest["source"].map(os.path.basename))
    assert (reasons.loc[[p.name for p in good], "status"] == "ok").all()
    for name, fragment in expected.items():
        assert reasons.loc[name, "status"] == "skipped" and fragment in reasons.loc[name, "reason"], \
            (name, reasons.loc[name, "reason"])
    assert result.returncode == 0 and f"skipped {len(expected)}" in result.stdout


def test_nonfinite_fill_caches_the_background_and_says_so(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    array = float_volume(6)
    write_sitk(array, corpus / "ct_with_nan.nii.gz")
    write_sitk(np.nan_to_num(array, nan=-1024.0, posinf=-1024.0), corpus / "ct_with_air.nii.gz")
    result = build(corpus, tmp_path / "cache", "--nonfinite", "fill", "--modality", "ct")
    manifest = pd.read_csv(tmp_path / "cache" / "manifest.csv")
    manifest = manifest.set_index(manifest["source"].map(os.path.basename))
    assert (manifest["status"] == "ok").all()
    assert manifest.loc["ct_with_nan.nii.gz", "nonfinite_filled"] == 6
    assert manifest.loc["ct_with_air.nii.gz", "nonfinite_filled"] == 0
    assert "warning: NaN/Inf voxels replaced" in result.stdout and "ct_with_nan.nii.gz: 6 voxels" in result.stdout
    cache = VolumeCache(tmp_path / "cache")
    cached = {os.path.basename(cache.source(i)): cache[i] for i in range(len(cache))}
    with_nan, with_air = cached["ct_with_nan.nii.gz"], cached["ct_with_air.nii.gz"]
    assert np.isfinite(with_nan).all()
    np.testing.assert_allclose(with_nan, with_air, atol=1e-3)  # NaN became air (-1024 HU), exactly as if it were


# ---- prediction ------------------------------------------------------------------------------------------


def test_one_output_row_per_input_row_whatever_the_rows_hold(tmp_path, finetuned):
    checkpoint, _ = finetuned
    good = (np.random.default_rng(0).random((28, 28, 28)) > 0.98).astype(np.uint8) * 255
    np.save(tmp_path / "good.npy", good)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "fake.npz").write_bytes(b"PK\x03\x04 this starts like a zip archive but is not one")
    np.save(tmp_path / "nan.npy", np.full((28, 28, 28), np.nan, np.float32))
    write_sitk(float_volume(2), tmp_path / "nan.nii.gz")
    write_header_only(tmp_path / "enormous.nii", (2048, 2048, 2048))
    rows = {"good": "good.npy", "empty": "empty.npy", "fake": "fake.npz", "nan_array": "nan.npy",
            "nan_volume": "nan.nii.gz", "enormous": "enormous.nii", "missing": "missing.npy", "blank": ""}
    pd.DataFrame({"id": list(rows), "path": list(rows.values())}).to_csv(tmp_path / "cases.csv", index=False)
    result = run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", str(tmp_path / "cases.csv"),
                      "--output_csv", str(tmp_path / "out.csv")])
    out = pd.read_csv(tmp_path / "out.csv", keep_default_na=False).set_index("id")
    assert list(out.index) == list(rows) and "8 rows: 1 ok, 7 error" in result.stdout
    assert out.loc["good", "status"] == "ok"
    expected = {"empty": "EOFError", "fake": "BadZipFile", "nan_array": "uint8", "nan_volume": "2 non-finite",
                "enormous": "more than --max_voxels", "missing": "no such file", "blank": "empty path"}
    for row, fragment in expected.items():
        assert out.loc[row, "status"] == "error" and fragment in out.loc[row, "error"], (row, out.loc[row, "error"])


@pytest.mark.parametrize("make_output,extra,message", [
    (lambda tmp: tmp / "no_such_folder" / "out.csv", [], "does not exist"),
    (lambda tmp: tmp, ["--overwrite"], "is a directory"),
])
def test_an_unwritable_output_stops_before_any_volume_is_read(tmp_path, finetuned, make_output, extra, message):
    checkpoint, _ = finetuned
    pd.DataFrame({"path": ["a.npy"]}).to_csv(tmp_path / "cases.csv", index=False)
    result = run_cli(["main_predict.py", "--checkpoint", str(checkpoint), "--input_csv", str(tmp_path / "cases.csv"),
                      "--output_csv", str(make_output(tmp_path)), *extra], check=False)
    assert result.returncode != 0 and message in result.stderr and "predict" not in result.stderr
    assert "Traceback" not in result.stderr


# ---- pretraining -----------------------------------------------------------------------------------------


def pretrain(data: Path, out: Path, *extra: str, check: bool = False):
    return run_cli(["main_pretrain.py", "--data_path", str(data), *TINY, "--output_dir", str(out), *extra],
                   check=check)


def test_pretraining_on_nothing_loadable_fails_and_writes_no_encoder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for seed in (0, 1):  # headers fine, so they pass the start-up check; their data are NaN
        write_sitk(float_volume(5, seed=seed), corpus / f"nan{seed}.nii.gz")
    result = pretrain(corpus, tmp_path / "out", "--batch_size", "2", "--max_steps", "1", "--max_bad_samples", "1")
    assert result.returncode == 1, result.stdout[-2000:]
    assert "none of the 1 optimizer steps changed the weights" in result.stderr
    assert "nan0.nii.gz" in result.stderr and "nan1.nii.gz" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "encoder.pth").exists() and "done:" not in result.stdout


def test_pretraining_stops_when_too_many_samples_fail(tmp_path, phantom_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(phantom_dir, corpus)
    write_sitk(float_volume(3), corpus / "nan.nii.gz")
    stopped = pretrain(corpus, tmp_path / "stopped", "--batch_size", "9", "--epochs", "1", "--max_bad_samples", "0.05")
    assert stopped.returncode == 1 and "1 samples of epoch 0 could not be loaded" in stopped.stderr
    assert "nan.nii.gz: 3 non-finite voxels" in stopped.stderr and not (tmp_path / "stopped" / "encoder.pth").exists()
    tolerated = pretrain(corpus, tmp_path / "tolerated", "--batch_size", "9", "--epochs", "1", "--max_bad_samples", "0.2")
    assert tolerated.returncode == 0 and "1 volume(s) could not be loaded" in tolerated.stdout


def test_max_bad_samples_must_be_a_share(tmp_path, phantom_dir):
    result = pretrain(phantom_dir, tmp_path / "out", "--max_bad_samples", "2")
    assert result.returncode != 0 and "--max_bad_samples is a share of the epoch" in result.stderr


# ---- resume ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, phantom_dir) -> Path:
    """A finished pretraining run with checkpoint-last.pth (epoch 2) and a kept checkpoint-0.pth."""
    out = tmp_path_factory.mktemp("two_epochs")
    pretrain(phantom_dir, out, "--batch_size", "4", "--epochs", "2", "--keep_every", "1", check=True)
    return out


def test_resume_auto_falls_back_past_a_truncated_checkpoint(tmp_path, phantom_dir, two_epochs):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    last = out / "checkpoint-last.pth"
    last.write_bytes(last.read_bytes()[:4096])
    (out / "checkpoint-1.pth").write_bytes(b"")
    result = pretrain(phantom_dir, out, "--batch_size", "4", "--epochs", "3", "--keep_every", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"cannot resume from {last}: unreadable" in result.stdout
    assert f"{out / 'checkpoint-1.pth'}: unreadable" in result.stdout
    assert f"resumed from {out / 'checkpoint-0.pth'} at step 2" in result.stdout


@pytest.mark.parametrize("changed,flag", [(["--mask_ratio", "0.6"], "--mask_ratio 0.75 there, 0.6 here"),
                                          (["--norm_pix_loss"], "--norm_pix_loss False there, True here"),
                                          (["--input_size", "42"], "--input_size"),
                                          (["--decoder_embed_dim", "32"], "--decoder_embed_dim")])
def test_resume_refuses_another_model_grid_masking_or_target_naming_the_flag(tmp_path, phantom_dir, two_epochs,
                                                                              changed, flag):
    out = tmp_path / "run"
    shutil.copytree(two_epochs, out)
    before = (out / "checkpoint-last.pth").read_bytes()
    result = pretrain(phantom_dir, out, "--batch_size", "4", "--epochs", "3", *changed)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot resume:") and flag in line and "new --output_dir" in line, line
    assert (out / "checkpoint-last.pth").read_bytes() == before


def test_no_readable_checkpoint_stops_in_one_line(tmp_path, phantom_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"not a checkpoint")
    result = pretrain(phantom_dir, out, "--batch_size", "4", "--epochs", "3")
    assert result.returncode == 1 and "pass --resume none to start afresh" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(tmp_path, phantom_dir):
    marker, crafted = tmp_path / "payload-ran", tmp_path / "crafted.pth"
    crafted_checkpoint(crafted, marker)
    pickle.loads(pickle.dumps(Payload(marker)))  # the payload works when unpickled without weights_only ...
    assert marker.exists()
    marker.unlink()
    result = pretrain(phantom_dir, tmp_path / "out", "--batch_size", "4", "--epochs", "1", "--resume", str(crafted))
    assert result.returncode == 1 and "error: cannot resume:" in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()  # ... and never ran here
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(crafted)
    assert not marker.exists()


def test_deepspeed_resume_and_consolidation_refuse_a_crafted_file(tmp_path, phantom_dir):
    out, marker = tmp_path / "ds", tmp_path / "payload-ran"
    deepspeed = ["--batch_size", "2", "--deepspeed", "launch/deepspeed/zero2_cpu.json", "--num_phantoms", "4"]
    pretrain(phantom_dir, out, *deepspeed, "--epochs", "1", check=True)
    folder = out / "deepspeed"
    tag = folder / (folder / "latest").read_text().strip()
    optimizer_states = next(tag.glob("*optim_states.pt"))
    crafted_checkpoint(optimizer_states, marker)
    result = pretrain(phantom_dir, out, *deepspeed, "--epochs", "2")
    assert result.returncode == 1 and "error: cannot resume:" in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr and not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        consolidated_fp32_weights(folder)
    assert not marker.exists()


def _parser(name: str):
    from volmae import main_cache, main_predict, main_pretrain
    from volmae.finetuning import flags
    return {"pretrain": main_pretrain.get_args_parser, "finetune": flags.get_args_parser,
            "predict": main_predict.get_args_parser, "cache": main_cache.get_args_parser}[name]()


REQUIRED = {"predict": ["--checkpoint", "c.pth", "--input_csv", "c.csv"], "cache": ["--input", "a", "--output", "b"]}


@pytest.mark.parametrize("command,flag,value", [
    ("finetune", "--train_samples", "0"), ("finetune", "--train_samples", "-5"), ("finetune", "--batch_size", "0"),
    ("finetune", "--batch_size", "-4"), ("finetune", "--epochs", "0"), ("finetune", "--epochs", "-1"),
    ("finetune", "--train_fraction", "1.5"), ("finetune", "--lr", "-1e-3"), ("finetune", "--seeds", "0,1,0"),
    ("finetune", "--layer_decay", "0"), ("pretrain", "--batch_size", "0"), ("pretrain", "--epochs", "0"),
    ("pretrain", "--accum_iter", "0"), ("pretrain", "--lr", "nan"), ("pretrain", "--max_steps", "-1"),
    ("pretrain", "--warmup_epochs", "-1"), ("predict", "--batch_size", "0"), ("cache", "--workers", "0"),
    ("cache", "--shard_size", "0"),
])
def test_an_out_of_range_argument_is_refused_when_parsed_in_one_line(command, flag, value, capsys):
    """A value that would silently mean something else (0 samples: all; -5: all but 5) or crash later."""
    with pytest.raises(SystemExit) as stop:
        _parser(command).parse_args([*REQUIRED.get(command, []), flag, value])
    assert stop.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in message and "Traceback" not in message


def test_a_diverged_pretraining_ends_non_zero_without_an_encoder(tmp_path, phantom_dir):
    """lr 1e3 in fp32: the first step is applied, the later ones are non-finite and skipped. That is no success.
    (bf16, the auto precision on CPUs that compute it natively, can keep such a loss finite.)"""
    out = tmp_path / "out"
    result = pretrain(phantom_dir, out, "--batch_size", "2", "--max_steps", "4", "--lr", "1e3", "--precision", "fp32")
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "the run diverged" in result.stderr and "lower --lr" in result.stderr and "Traceback" not in result.stderr
    assert not (out / "encoder.pth").exists() and not (out / "model.pth").exists() and "done:" not in result.stdout
    assert (out / "checkpoint-last.pth").exists()
    healthy = pretrain(phantom_dir, tmp_path / "healthy", "--batch_size", "2", "--max_steps", "2", check=True)
    assert "0 of 2 steps skipped for a non-finite loss or gradient" in healthy.stdout


def test_a_diverged_fine_tuning_ends_non_zero_in_one_line(tmp_path):
    out = tmp_path / "ft"
    result = run_cli(["main_finetune.py", "--data_root", str(shared_path("medmnist")), "--data_flag", "breastmnist",
                      "--model", "vit_tiny_patch7", "--train_samples", "64", "--batch_size", "16", "--epochs", "2",
                      "--lr", "1e6", "--recipe", "medmnist", "--bootstrap", "0", "--output_dir", str(out)], check=False)
    assert result.returncode == 1 and "fine-tuning diverged" in result.stderr, result.stdout[-1500:] + result.stderr
    assert "Traceback" not in result.stderr and not (out / "results.json").exists()


# ---- disk faults ------------------------------------------------------------------------------------------


def test_a_full_disk_during_a_save_is_named_and_keeps_the_previous_checkpoint(tmp_path):
    """The save's temporary leads to /dev/full, where every write fails with ENOSPC, as on a full disk."""
    path = tmp_path / "checkpoint-last.pth"
    atomic_save({"step": 1}, path)
    temporary_for(path).symlink_to("/dev/full")
    with pytest.raises(DiskWriteError, match=f"cannot write {path}: no space left on the device"):
        atomic_save({"step": 2, "weights": torch.zeros(100_000)}, path)
    assert load_checkpoint(path)["step"] == 1 and not temporary_for(path).exists()


def test_cleaning_up_a_failed_write_never_hides_its_error(tmp_path):

    def fail(tmp: Path) -> None:
        tmp.mkdir()  # a temporary that cannot be unlinked
        raise ValueError("the first error")

    with pytest.raises(ValueError, match="the first error"):
        atomic_write(tmp_path / "out.json", fail)


@pytest.mark.parametrize("command", [["main_pretrain.py", "--max_steps", "1"],
                                     ["main_cache.py", "--input", "PHANTOMS"]])
def test_an_output_folder_the_disk_refuses_stops_in_one_line(command, phantom_dir):
    flag = "--output" if "main_cache.py" in command else "--output_dir"
    command = [str(phantom_dir) if part == "PHANTOMS" else part for part in command]
    result = run_cli([*command, flag, "/dev/full/run"], check=False)
    assert result.returncode == 1 and "cannot create the output folder /dev/full/run" in result.stderr
    assert "Traceback" not in result.stderr


# ---- one run per output folder ---------------------------------------------------------------------------


def test_a_second_pretraining_in_a_live_folder_is_refused_and_a_dead_one_s_lock_is_taken_over(tmp_path, phantom_dir):

    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "main_pretrain.py", "--data_path", str(phantom_dir), *TINY,
                              "--epochs", "1000", "--output_dir", str(out)], cwd=Path(__file__).parents[1],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not ((out / "log.txt").exists() and (out / "log.txt").stat().st_size > 0):
            assert first.poll() is None and time.time() < deadline, "the first run never logged a step"
            time.sleep(0.2)
        second = pretrain(phantom_dir, out, "--seed", "1", "--max_steps", "1")
        assert second.returncode == 1 and f"is in use by pid {first.pid}" in second.stderr, second.stderr[-1500:]
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid  # what a killed run leaves
    third = pretrain(phantom_dir, out, "--max_steps", "2", check=True)
    assert f"taking over {out / LOCK_FILE} from pid {first.pid}" in third.stdout
    assert (out / LOCK_FILE).read_text() == ""  # a run that ended leaves nothing to take over


@pytest.mark.parametrize("command", ["finetune", "cache"])
def test_a_run_on_a_folder_another_run_holds_is_refused_in_one_line(command, tmp_path, phantom_dir):
    out = tmp_path / "held"
    out.mkdir()
    args = ["main_cache.py", "--input", str(phantom_dir), "--output", str(out)] if command == "cache" \
        else ["main_finetune.py", "--data_root", str(shared_path("medmnist")), "--data_flag", "breastmnist",
              "--epochs", "1", "--output_dir", str(out)]
    with output_folder_lock(out):
        result = run_cli(args, check=False)
    assert result.returncode == 1 and f"{out} is in use by pid {os.getpid()}" in result.stderr
    assert "Traceback" not in result.stderr


# ---- a damaged cache --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def four_shard_cache(tmp_path_factory, phantom_dir) -> Path:
    cache = tmp_path_factory.mktemp("four_shards") / "cache"
    run_cli(["main_cache.py", "--input", str(phantom_dir), "--output", str(cache), "--size", "28",
             "--shard_size", "2", "--workers", "1"])
    return cache


def damaged_cache(tmp_path: Path, four_shard_cache: Path) -> tuple[Path, list[Path]]:
    """A fresh copy of eight phantoms in four shards, to damage."""
    cache = tmp_path / "cache"
    shutil.copytree(four_shard_cache, cache)
    shards = sorted(cache.glob("shard-*.h5"))
    assert len(shards) == 4
    return cache, shards


def test_a_missing_or_truncated_shard_is_found_when_the_cache_opens(tmp_path, four_shard_cache):
    cache, shards = damaged_cache(tmp_path, four_shard_cache)
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:2000])
    result = pretrain(cache, tmp_path / "run", "--batch_size", "2", "--epochs", "1", check=True)
    assert "4 volume(s) of the cache" in result.stdout and "left out" in result.stdout
    assert f"{shards[0].name} cannot be opened" in result.stdout and f"{shards[1].name} cannot be opened" in result.stdout
    assert "data: 4 volumes" in result.stdout


def test_a_damaged_chunk_is_one_bad_sample_named_and_counted(tmp_path, four_shard_cache):
    """Bit-rot inside a compressed chunk passes the opening check and fails at decompression: that volume is
    one bad sample, named with its shard, key and source, counted against --max_bad_samples."""
    cache, shards = damaged_cache(tmp_path, four_shard_cache)
    with h5py.File(shards[2], "r") as handle:
        key = sorted(handle["volumes"])[0]
        chunk = handle["volumes"][key].id.get_chunk_info(0)
    data = bytearray(shards[2].read_bytes())
    data[chunk.byte_offset:chunk.byte_offset + chunk.size] = np.random.default_rng(0).bytes(chunk.size)
    shards[2].write_bytes(bytes(data))
    tolerated = pretrain(cache, tmp_path / "tolerated", "--batch_size", "2", "--epochs", "1", "--max_bad_samples",
                         "0.2", check=True)
    assert "1 volume(s) could not be loaded" in tolerated.stdout
    assert f"{shards[2].name}, volume {key}" in tolerated.stdout + tolerated.stderr
    stopped = pretrain(cache, tmp_path / "stopped", "--batch_size", "2", "--epochs", "1", "--max_bad_samples", "0.1")
    assert stopped.returncode == 1 and "could not be loaded" in stopped.stderr and shards[2].name in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (tmp_path / "stopped" / "encoder.pth").exists()


@pytest.mark.parametrize("crafted", ["external storage", "external link", "soft link", "virtual dataset",
                                     "object dtype", "wrong shape"])
def test_a_crafted_cache_volume_that_reads_outside_its_shard_is_left_out(tmp_path, four_shard_cache, crafted):
    cache, shards = damaged_cache(tmp_path, four_shard_cache)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\x07" * (2 * 28 ** 3))
    with h5py.File(shards[3], "a") as handle:
        group = handle["volumes"]
        key = sorted(group)[0]
        del group[key]
        if crafted == "external storage":
            group.create_dataset(key, shape=(1, 28, 28, 28), dtype="uint16", external=[(str(outside), 0, 2 * 28 ** 3)])
        elif crafted == "external link":
            group[key] = h5py.ExternalLink(str(shards[2]), f"volumes/{sorted(h5py.File(shards[2])['volumes'])[0]}")
        elif crafted == "soft link":
            group[key] = h5py.SoftLink(f"/volumes/{sorted(group)[0]}")
        elif crafted == "virtual dataset":
            layout = h5py.VirtualLayout(shape=(1, 28, 28, 28), dtype="uint16")
            layout[...] = h5py.VirtualSource(str(shards[2]), f"volumes/{sorted(h5py.File(shards[2])['volumes'])[0]}",
                                             shape=(1, 28, 28, 28))
            group.create_virtual_dataset(key, layout)
        elif crafted == "object dtype":
            group.create_dataset(key, data=np.array(["x"], dtype=object), dtype=h5py.string_dtype())
        else:
            group.create_dataset(key, data=np.zeros((1, 20, 28, 28), np.uint16))
    cache_object = VolumeCache(cache)
    assert len(cache_object) == 7 and len(cache_object.unreadable) == 1
    assert shards[3].name in next(iter(cache_object.unreadable.values()))


@pytest.mark.parametrize("named", ["../elsewhere/shard-00000.h5", "/tmp/shard-00000.h5", "shard-00000.h5/../x.h5"])
def test_a_manifest_that_names_a_shard_outside_the_cache_is_not_followed(tmp_path, four_shard_cache, named):
    cache, shards = damaged_cache(tmp_path, four_shard_cache)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(shards[0], elsewhere / "shard-00000.h5")
    manifest = pd.read_csv(cache / "manifest.csv", keep_default_na=False)
    moved = manifest["shard"] == shards[1].name
    manifest.loc[moved, "shard"] = named
    manifest.to_csv(cache / "manifest.csv", index=False)
    cache_object = VolumeCache(cache)
    assert len(cache_object) == 8 - moved.sum() and set(cache_object.manifest["shard"]) == {
        p.name for p in shards if p != shards[1]}
    assert all("not a shard file of this cache folder" in why for why in cache_object.unreadable.values())



@pytest.mark.parametrize("field,value,message", [("dtype", "uint8", "stored as uint16, cache.json says uint8"),
                                                 ("size", [20, 28, 28], "cache.json says (1, 20, 28, 28)"),
                                                 ("size", [-1, 28, 28], "is malformed: size must be three positive")])
def test_a_cache_json_that_disagrees_with_its_shards_is_refused_in_one_line(tmp_path, four_shard_cache, field, value,
                                                                             message):
    cache, _ = damaged_cache(tmp_path, four_shard_cache)
    meta = json.loads((cache / "cache.json").read_text())
    if field == "dtype":
        meta["dtype"] = value
    else:
        meta["preprocess"]["size"] = value
    (cache / "cache.json").write_text(json.dumps(meta))
    result = pretrain(cache, tmp_path / "run", "--max_steps", "1")
    assert result.returncode == 1 and message in result.stderr, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_prediction_from_cache_rows_gets_the_same_checks(tmp_path, four_shard_cache, finetuned):
    """A crafted volume (an external link) costs its row; a cache.json that disagrees with its shards costs
    every row of that cache, each with the reason, and the run still writes one row per input."""
    cache, shards = damaged_cache(tmp_path, four_shard_cache)
    keys = pd.read_csv(cache / "manifest.csv")["key"].tolist()
    with h5py.File(shards[3], "a") as handle:
        crafted = sorted(handle["volumes"])[0]
        del handle["volumes"][crafted]
        handle["volumes"][crafted] = h5py.ExternalLink(str(shards[2]), f"volumes/{keys[4]}")
    rows = pd.DataFrame({"path": [f"{cache}::{key}" for key in keys[:2] + [crafted]]})
    rows.to_csv(tmp_path / "cases.csv", index=False)
    run_cli(["main_predict.py", "--checkpoint", str(finetuned[0]), "--input_csv", str(tmp_path / "cases.csv"),
             "--output_csv", str(tmp_path / "pred.csv")])
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert out["status"].tolist() == ["ok", "ok", "error"] and "no volume" in out["error"][2]
    meta = json.loads((cache / "cache.json").read_text())
    (cache / "cache.json").write_text(json.dumps({**meta, "dtype": "uint8"}))
    result = run_cli(["main_predict.py", "--checkpoint", str(finetuned[0]), "--input_csv",
                      str(tmp_path / "cases.csv"), "--output_csv", str(tmp_path / "pred2.csv")], check=False)
    out = pd.read_csv(tmp_path / "pred2.csv", keep_default_na=False)
    assert len(out) == 3 and (out["status"] == "error").all() and "cache.json says uint8" in out["error"][0]
    assert "Traceback" not in result.stderr


def test_sigterm_during_a_checkpoint_save_lets_the_save_finish(tmp_path, phantom_dir):
    """A base-size MAE takes a second or more to save: SIGTERM sent while the temporary is being written waits
    for the save, then the run stops with a loadable checkpoint, no temporary left and the status a shell gives
    SIGTERM."""
    out = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "main_pretrain.py", "--data_path", str(phantom_dir),
                                "--model", "mae_vit_base_patch16", "--input_size", "28", "--patch_size", "14",
                                "--decoder_depth", "1", "--batch_size", "2", "--epochs", "50", "--num_workers", "0",
                                "--vis_every", "0", "--output_dir", str(out)], cwd=Path(__file__).parents[1],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not list(out.glob(".tmp-*")):
        assert process.poll() is None and time.time() < deadline, "no checkpoint save was seen"
        time.sleep(0.001)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 143
    assert load_checkpoint(out / "checkpoint-last.pth")["step"] >= 4 and not list(out.glob(".tmp-*"))


def test_a_2000_row_prediction_with_a_few_bad_rows_keeps_every_row(tmp_path, finetuned):
    """2,000 AdrenalMNIST3D-shaped arrays plus a missing file, a wrong shape and a NaN volume: one output row
    per input row, in order, the bad ones with their reasons (docs/reliability.md: its time and peak memory)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(2000):
        np.save(tmp_path / f"case{i}.npy", rng.integers(0, 256, (28, 28, 28), dtype=np.uint8))
        rows.append(f"case{i}.npy")
    np.save(tmp_path / "flat.npy", np.zeros((28, 28), np.uint8))
    np.save(tmp_path / "nan.npy", np.full((28, 28, 28), np.nan, np.float32))
    rows[500:500] = ["missing.npy"]
    rows[1200:1200] = ["flat.npy"]
    rows.append("nan.npy")
    pd.DataFrame({"path": rows}).to_csv(tmp_path / "cases.csv", index=False)
    run_cli(["main_predict.py", "--checkpoint", str(finetuned[0]), "--input_csv", str(tmp_path / "cases.csv"),
             "--output_csv", str(tmp_path / "pred.csv"), "--batch_size", "64"])
    out = pd.read_csv(tmp_path / "pred.csv", keep_default_na=False)
    assert out["path"].tolist() == rows
    errors = out.index[out["status"] == "error"].tolist()
    assert errors == [500, 1200, 2002] and (out["status"] != "error").sum() == 2000


def test_a_volume_of_huge_float32_values_is_cached_finite(tmp_path):
    """1e30 overflows any float16 or intermediate sum: windowing must clip it before anything else."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    volume = float_volume()
    volume[::2] = 1e30
    write_sitk(volume, corpus / "huge.nii.gz")
    run_cli(["main_cache.py", "--input", str(corpus), "--output", str(tmp_path / "cache"), "--size", "16",
             "--workers", "1"])
    cache = VolumeCache(tmp_path / "cache")
    assert len(cache) == 1 and np.isfinite(cache[0]).all() and 0 <= cache[0].min() and cache[0].max() <= 1
