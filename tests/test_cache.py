"""The HDF5 cache: building (parallel, resumable, robust to bad inputs), reading, and training on it."""
import gzip
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import REPO, run_cli, shared_path
from tests.volumes import reoriented_copy, write_bad_inputs
from volmae.datasets.volume_dataset import CacheDataset, collate_volumes
from volmae.util.atomic import TEMPORARY_GLOB
from volmae.volumes.build_cache import CacheSettingsError, build_cache
from volmae.volumes.cache import VolumeCache, encode
from volmae.volumes.phantoms import write_phantom_corpus
from volmae.volumes.preprocess import PreprocessConfig, load_volume, preprocess_image
from volmae.volumes.reading import read_image, unreadable_reason

HALF_STEP = 0.5 / 65535 + 1e-7  # uint16 storage rounds to the nearest of 65536 levels


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """The shared real volumes cached at 32^3 by the command users run, with 2 workers."""
    volumes = shared_path("volumes")
    output = tmp_path_factory.mktemp("cache") / "c32"
    result = run_cli(["main_cache.py", "--input", str(volumes), "--output", str(output),
                      "--size", "32", "--workers", "2"])
    assert "cached 7 of 7 volumes" in result.stdout
    return output


def test_shared_volumes_are_cached_one_ok_row_each(shared_cache):
    cache = VolumeCache(shared_cache)
    manifest = pd.read_csv(shared_cache / "manifest.csv", keep_default_na=False)
    assert len(manifest) == 7 and set(manifest["status"]) == {"ok"}
    assert manifest["source"].str.endswith("example_ct_dicom").sum() == 1  # the series is one volume
    assert {"source", "status", "reason", "shard", "key"} <= set(manifest.columns)
    assert len(cache) == 7 and list(cache.manifest["index"]) == sorted(cache.manifest["index"])
    volume = cache[0]
    assert volume.shape == (1, 32, 32, 32) and volume.dtype == np.float32
    assert 0.0 <= volume.min() and volume.max() <= 1.0


def test_cache_round_trip_equals_direct_preprocessing(shared_cache):
    cache = VolumeCache(shared_cache)
    for i in range(len(cache)):
        direct = load_volume(cache.source(i), cache.preprocess)
        assert np.abs(cache[i] - direct).max() <= HALF_STEP, cache.source(i)


def test_volume_attributes_record_geometry_and_settings(shared_cache):
    cache = VolumeCache(shared_cache)
    i = next(i for i in range(len(cache)) if cache.source(i).endswith("example_ct.nii.gz"))
    attrs = cache.attrs(i)
    image = read_image(cache.source(i))
    assert list(attrs["original_size"]) == list(image.GetSize())
    np.testing.assert_allclose(attrs["original_spacing"], image.GetSpacing())
    np.testing.assert_allclose(attrs["original_origin"], image.GetOrigin())
    np.testing.assert_allclose(attrs["original_direction"], image.GetDirection())
    assert attrs["modality"] == "ct" and '"resample": "fit"' in attrs["preprocess"]
    with h5py.File(shared_cache / cache.manifest.loc[i, "shard"]) as f:
        dataset = f["volumes"][cache.manifest.loc[i, "key"]]
        assert dataset.chunks == (1, 32, 32, 32) and dataset.dtype == np.uint16
        assert "32001" in dataset._filters  # blosc, through hdf5plugin


def test_pretraining_runs_on_the_cache(shared_cache, tmp_path):
    out = tmp_path / "run"
    result = run_cli(["main_pretrain.py", "--data_path", str(shared_cache), "--model", "mae_vit_tiny_patch16",
                      "--input_size", "24", "--patch_size", "8", "--decoder_depth", "1", "--batch_size", "2",
                      "--max_steps", "3", "--num_workers", "2", "--output_dir", str(out), "--log_every", "1"])
    assert "CacheDataset" in result.stdout and (out / "encoder.pth").exists()


def test_loader_with_two_workers_reads_the_cache_correctly(shared_cache):
    cache = VolumeCache(shared_cache)
    loader = DataLoader(CacheDataset(cache, (32, 32, 32)), batch_size=3, num_workers=2, collate_fn=collate_volumes)
    seen = {}
    for batch in loader:
        assert batch["volume"].dtype == torch.uint16
        for index, volume in zip(batch["index"].tolist(), batch["volume"]):
            seen[index] = volume.numpy()
    assert sorted(seen) == list(range(len(cache)))
    for i, stored in seen.items():
        np.testing.assert_array_equal(stored, encode(cache[i], "uint16"))


def test_random_crops_come_from_the_cached_volume(shared_cache):
    cache = VolumeCache(shared_cache)
    dataset = CacheDataset(cache, (16, 20, 24), augment=True, seed=3)
    item = dataset[2]
    full = encode(cache[2], "uint16")[0]
    crop = item["volume"].numpy()[0]
    matches = [(d, h, w) for d in range(17) for h in range(13) for w in range(9)
               if np.array_equal(full[d:d + 16, h:h + 20, w:w + 24], crop)]
    assert matches
    assert dataset[2]["volume"].equal(item["volume"])  # same (seed, epoch, index): same crop
    with pytest.raises(ValueError, match="larger than the cache"):
        CacheDataset(cache, (40, 32, 32))


def test_reoriented_copies_give_equal_cached_arrays(tmp_path):
    image = read_image(str(shared_path("volumes", "example_ct_sm.nii.gz")))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    import SimpleITK as sitk

    sitk.WriteImage(image, str(corpus / "a_original.nii.gz"))
    sitk.WriteImage(reoriented_copy(image, (2, 0, 1), (True, False, True)), str(corpus / "b_copy.nii.gz"))
    build_cache(str(corpus), tmp_path / "cache", PreprocessConfig(size=(24, 24, 24)), progress=False)
    cache = VolumeCache(tmp_path / "cache")
    assert len(cache) == 2
    np.testing.assert_array_equal(cache[0], cache[1])


def test_bad_inputs_are_skipped_with_reasons_and_good_ones_cached(tmp_path, phantom_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(phantom_dir, corpus)
    expected = write_bad_inputs(corpus / "broken", sorted(phantom_dir.glob("*.nii.gz"))[0])
    result = run_cli(["main_cache.py", "--input", str(corpus), "--output", str(tmp_path / "c"),
                      "--size", "16", "--workers", "2"])
    manifest = pd.read_csv(tmp_path / "c" / "manifest.csv", keep_default_na=False)
    assert len(manifest) == 8 + len(expected)
    ok = manifest[manifest["status"] == "ok"]
    assert sorted(ok["source"].map(lambda s: os.path.basename(s))) == sorted(p.name for p in phantom_dir.glob("*"))
    skipped = manifest[manifest["status"] == "skipped"]
    skipped = skipped.set_index(skipped["source"].map(os.path.basename))
    for name, fragment in expected.items():
        assert fragment in skipped.loc[name, "reason"], (name, skipped.loc[name, "reason"])
    assert f"cached 8 of {8 + len(expected)} volumes" in result.stdout and "skipped 8" in result.stdout
    assert len(VolumeCache(tmp_path / "c")) == 8


def test_nothing_cachable_exits_non_zero(tmp_path, phantom_dir):
    write_bad_inputs(tmp_path / "broken", sorted(phantom_dir.glob("*.nii.gz"))[0])
    result = run_cli(["main_cache.py", "--input", str(tmp_path / "broken"), "--output",
                      str(tmp_path / "c"), "--size", "16", "--workers", "1"], check=False)
    assert result.returncode == 1 and "no volume could be cached" in result.stderr


def test_a_killed_build_resumes_without_duplicates_or_rework(tmp_path):
    sources = tmp_path / "sources"
    write_phantom_corpus(sources, count=12, seed=5, size_range=(150, 180), progress=False)
    output = tmp_path / "cache"
    command = [sys.executable, str(REPO / "main_cache.py"), "--input", str(sources), "--output", str(output),
               "--size", "32", "--workers", "1", "--shard_size", "1"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = output / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("shard-*.csv"))) < 3:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    # A shard is done once its manifest rows are recorded, after its file is renamed into place: the kill can
    # land between the two, and that shard is then built again.
    recorded = {p.stem for p in parts.glob("shard-*.csv")}
    done_before = {p.name: p.stat().st_mtime_ns for p in output.glob("shard-*.h5") if p.stem in recorded}
    assert 3 <= len(done_before) < 12, "the kill should land midway"
    for shard in output.glob("shard-*.h5"):  # whatever was renamed into place is complete
        with h5py.File(shard) as f:
            assert len(f["volumes"]) == 1

    result = run_cli(command[1:])
    assert f"{len(done_before)} of 12 sources already done" in result.stdout
    manifest = pd.read_csv(output / "manifest.csv", keep_default_na=False)
    assert len(manifest) == 12 and manifest["source"].is_unique and manifest["key"].is_unique
    assert set(manifest["status"]) == {"ok"}
    for name, mtime in done_before.items():
        assert (output / name).stat().st_mtime_ns == mtime, f"{name} was rebuilt"
    assert not list(output.glob(TEMPORARY_GLOB)) and not list(parts.glob(TEMPORARY_GLOB))
    assert len(VolumeCache(output)) == 12


def corpus_of(folder: Path, files: list[Path]) -> Path:
    """A corpus folder holding copies of `files`."""
    folder.mkdir(exist_ok=True)
    for f in files:
        shutil.copy(f, folder / f.name)
    return folder


def test_new_sources_are_appended_and_other_settings_refused(tmp_path, phantom_dir):
    files = sorted(phantom_dir.glob("*.nii.gz"))
    corpus = corpus_of(tmp_path / "corpus", files[:3])
    config = PreprocessConfig(size=(16, 16, 16))
    build_cache(str(corpus), tmp_path / "c", config, progress=False)
    first = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").glob("shard-*.h5")}
    corpus_of(corpus, files[3:5])
    manifest = build_cache(str(corpus), tmp_path / "c", config, progress=False)
    assert len(manifest) == 5 and manifest["key"].is_unique
    assert all((tmp_path / "c" / n).stat().st_mtime_ns == m for n, m in first.items())
    with pytest.raises(CacheSettingsError, match="other settings"):
        build_cache(str(corpus), tmp_path / "c", PreprocessConfig(size=(24, 24, 24)), progress=False)


def test_a_source_replaced_at_its_path_or_appearing_later_is_cached_again(tmp_path, phantom_dir):
    files = sorted(phantom_dir.glob("*.nii.gz"))
    corpus = corpus_of(tmp_path / "corpus", files[:3])
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(str(corpus / f.name) for f in files[:4]))  # the 4th is not there yet
    config = PreprocessConfig(size=(16, 16, 16))
    first = build_cache(str(listed), tmp_path / "c", config, progress=False)
    assert list(first["status"]) == ["ok", "ok", "ok", "skipped"]
    shutil.copy(files[5], corpus / files[0].name)  # another scan at the same path
    shutil.copy(files[3], corpus / files[3].name)  # the missing one appears
    manifest = build_cache(str(listed), tmp_path / "c", config, progress=False)
    assert len(manifest) == 4 and (manifest["status"] == "ok").all() and manifest["source"].is_unique
    recached = dict(zip(manifest["source"].map(lambda s: s.rsplit("/", 1)[1]), manifest["recached"]))
    assert recached == {files[0].name: True, files[1].name: False, files[2].name: False, files[3].name: True}
    cache = VolumeCache(tmp_path / "c")
    row = int(np.flatnonzero(cache.manifest["source"] == str(corpus / files[0].name))[0])
    np.testing.assert_allclose(cache[row][0], load_volume(str(files[5]), config)[0], atol=HALF_STEP)
    again = build_cache(str(listed), tmp_path / "c", config, progress=False)  # nothing changed: nothing rebuilt
    assert set(again["index"]) == set(manifest["index"])


@pytest.mark.parametrize("spacing,why", [(0.0, "not a usable spacing"), (float("nan"), "not a usable spacing"),
                                         (float("inf"), "not a usable spacing"), (1e30, "outside the plausible")])
def test_implausible_spacings_are_refused_per_volume_and_cannot_steer_the_grid(tmp_path, spacing, why):
    crops = sorted((shared_path("lidc_nodules") / "images").glob("*.nii.gz"))[:6]
    odd = tmp_path / "odd.nii.gz"
    raw = bytearray(gzip.decompress(crops[0].read_bytes()))
    raw[80:84] = struct.pack("<f", spacing)  # pixdim[2], as written (nibabel would repair a 0 on saving)
    odd.write_bytes(gzip.compress(bytes(raw)))
    reason = unreadable_reason(str(odd))
    assert reason is not None and why in reason, reason
    listed = tmp_path / "list.txt"
    listed.write_text("\n".join(map(str, [*crops, odd])))
    with_odd = run_cli(["main_cache.py", "--input", str(listed), "--output", str(tmp_path / "a"),
                        "--size", "auto", "--resample", "auto"])
    listed.write_text("\n".join(map(str, crops)))
    without = run_cli(["main_cache.py", "--input", str(listed), "--output", str(tmp_path / "b"),
                       "--size", "auto", "--resample", "auto"])
    grid = [json.loads((tmp_path / name / "cache.json").read_text())["preprocess"]["size"] for name in "ab"]
    assert grid[0] == grid[1] and "cached 6 of 7" in with_odd.stdout and "cached 6 of 6" in without.stdout
    manifest = pd.read_csv(tmp_path / "a" / "manifest.csv", keep_default_na=False)
    assert why in manifest.loc[manifest["source"] == str(odd), "reason"].item()


def test_volume_cache_refuses_a_folder_that_is_not_a_cache(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a VolMAE cache"):
        VolumeCache(tmp_path)


def test_storage_dtype_error_is_within_half_a_level():
    volume = preprocess_image(read_image(str(shared_path("volumes", "example_ct_sm.nii.gz"))),
                              PreprocessConfig(size=(16, 16, 16))).array
    stored = encode(volume, "uint16")
    assert np.abs(stored / 65535.0 - volume).max() <= HALF_STEP


def test_ctrl_c_during_a_build_ends_in_one_line_and_the_next_run_finishes(tmp_path):
    sources = tmp_path / "sources"
    write_phantom_corpus(sources, count=12, seed=5, size_range=(150, 180), progress=False)
    output = tmp_path / "cache"
    command = [sys.executable, str(REPO / "main_cache.py"), "--input", str(sources), "--output", str(output),
               "--size", "32", "--workers", "2", "--shard_size", "1"]
    # a background job of a non-interactive shell inherits SIGINT ignored: restore it, as a terminal has it
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and len(list((output / ".parts").glob("shard-*.csv"))) < 2:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C does: the whole foreground group, workers included
    _, err = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert "interrupted: the finished shards" in err.strip().splitlines()[-1]
    result = run_cli(command[1:])
    assert "cached 12 of 12 volumes" in result.stdout


def _ignores_sigint(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    ignored = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(ignored & (1 << (signal.SIGINT - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the workers' signal masks from /proc, which only Linux has")
def test_cache_workers_are_born_ignoring_ctrl_c_so_one_still_importing_prints_no_traceback():
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from volmae.volumes.build_cache import _submit_deaf_to_ctrl_c

    before = signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN where a shell started pytest in the background
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        futures = _submit_deaf_to_ctrl_c(pool, [(abs, -1), (abs, -2)])
        pids = list(pool._processes)  # read before they finish importing: the disposition is set at birth
        assert pids and all(_ignores_sigint(pid) for pid in pids)
        assert [f.result(timeout=300) for f in futures] == [1, 2]
    assert signal.getsignal(signal.SIGINT) is before  # this process's own Ctrl-C handling is put back


def test_pretraining_on_an_unfinished_cache_says_so_in_one_line(tmp_path, phantom_dir):
    cache = tmp_path / "cache"
    build_cache(str(phantom_dir), cache, PreprocessConfig(size=(16, 16, 16)), progress=False)
    (cache / "manifest.csv").unlink()  # as a build stopped before its last step leaves it
    result = run_cli(["main_pretrain.py", "--data_path", str(cache), "--model", "mae_vit_tiny_patch16",
                      "--patch_size", "8", "--epochs", "1", "--output_dir", str(tmp_path / "run")], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "unfinished cache" in result.stderr.strip().splitlines()[-1]


def test_a_long_list_of_unreadable_sources_is_summarised_with_the_full_list_in_a_file(tmp_path, phantom_dir):
    listed = tmp_path / "corpus.txt"
    missing = [str(tmp_path / f"gone{i:03d}.nii.gz") for i in range(30)]
    listed.write_text("\n".join([*map(str, sorted(phantom_dir.glob("*.nii.gz"))), *missing]))
    result = run_cli(["main_pretrain.py", "--data_path", str(listed), "--model", "mae_vit_tiny_patch16",
                      "--input_size", "32", "--patch_size", "8", "--epochs", "1", "--batch_size", "4",
                      "--num_workers", "0", "--output_dir", str(tmp_path / "run")])
    full_list = tmp_path / "run" / "skipped_sources.txt"
    assert "skipping 30 of 38 sources" in result.stderr
    assert f"... and 10 more; all 30 in {full_list}" in result.stderr
    assert sum("gone" in line for line in result.stderr.splitlines()) == 20
    assert len(full_list.read_text().splitlines()) == 30
