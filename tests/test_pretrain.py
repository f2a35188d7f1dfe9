"""main_pretrain.py end to end, on CPU, as users run it (subprocesses, torchrun)."""
import math
import shutil

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, shared_path
from volmae.inference.checkpoints import load_checkpoint
from volmae.util.lr_sched import lr_at_step
from volmae.util.run_log import read_log

TINY = ["--model", "mae_vit_tiny_patch16", "--input_size", "32", "--patch_size", "8",
        "--decoder_embed_dim", "64", "--decoder_depth", "1", "--decoder_num_heads", "2",
        "--num_workers", "0", "--log_every", "1", "--vis_every", "0", "--warmup_epochs", "1",
        "--precision", "fp32"]  # runs are compared step by step: bf16 (auto on CPUs with it) rounds with the batch split


def losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_log(output_dir / "log.txt")}


def test_pretraining_on_real_ct_and_mr_lowers_the_loss(tmp_path):
    volumes = shared_path("volumes")
    out = tmp_path / "run"
    result = run_cli(["main_pretrain.py", "--data_path", str(volumes), *TINY, "--batch_size", "2",
                      "--max_steps", "24", "--lr", "2e-3", "--output_dir", str(out)])
    assert "7 volumes" in result.stdout  # six files and one DICOM series folder
    curve = list(losses(out).values())
    assert np.mean(curve[-4:]) < 0.8 * np.mean(curve[:4])
    for name in ("checkpoint-last.pth", "encoder.pth", "reconstruction.png"):
        assert (out / name).exists(), name
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    record = read_log(out / "log.txt")[-1]
    assert {"step", "epoch", "loss", "lr", "vol_per_s", "data_wait_frac"} <= record.keys()


def test_checkpoints_load_with_weights_only_and_hold_the_documented_keys(tmp_path, phantom_dir):
    out = tmp_path / "run"
    run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), *TINY, "--batch_size", "4",
             "--max_steps", "2", "--output_dir", str(out)])
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert {"model", "optimizer", "scaler", "epoch", "step", "args", "rng"} <= checkpoint.keys()
    assert checkpoint["step"] == 2 and isinstance(checkpoint["args"], dict)
    encoder = load_checkpoint(out / "encoder.pth")["model"]
    assert "blocks.0.attn.qkv.weight" in encoder
    assert not any(k.startswith("decoder") or k == "mask_token" for k in encoder)


def test_gradient_accumulation_and_two_ranks_match_one_big_batch(tmp_path, phantom_dir):
    """Same global batch three ways: 1x4, 1x(2+2 accumulated), 2 ranks x 2 (torchrun, gloo)."""
    common = ["main_pretrain.py", "--data_path", str(phantom_dir), *TINY, "--max_steps", "4", "--lr", "1e-3"]
    run_cli([*common, "--batch_size", "4", "--output_dir", str(tmp_path / "big")])
    run_cli([*common, "--batch_size", "2", "--accum_iter", "2", "--output_dir", str(tmp_path / "accum")])
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", *common,
             "--batch_size", "2", "--output_dir", str(tmp_path / "ddp")])
    big = losses(tmp_path / "big")
    assert len(big) == 4
    for other in ("accum", "ddp"):
        curve = losses(tmp_path / other)
        assert curve.keys() == big.keys()
        for step in big:
            assert curve[step] == pytest.approx(big[step], rel=1e-4), (other, step)


def test_resumed_run_matches_an_uninterrupted_one(tmp_path, phantom_dir):
    """k epochs, resume from the kept checkpoint, k more: the losses of an uninterrupted 2k-epoch run."""
    common = ["main_pretrain.py", "--data_path", str(phantom_dir), *TINY, "--batch_size", "2",
              "--epochs", "4", "--keep_every", "1", "--lr", "1e-3"]
    full = tmp_path / "full"
    run_cli([*common, "--output_dir", str(full)])
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "checkpoint-1.pth", resumed / "checkpoint-last.pth")  # after epochs 0 and 1
    result = run_cli([*common, "--output_dir", str(resumed)])
    assert "resumed from" in result.stdout and "at step 8" in result.stdout
    full_curve, resumed_curve = losses(full), losses(resumed)
    assert sorted(resumed_curve) == list(range(9, 17))
    for step, loss in resumed_curve.items():
        assert loss == pytest.approx(full_curve[step], rel=1e-5), step
    final_full = load_checkpoint(full / "checkpoint-last.pth")["model"]
    final_resumed = load_checkpoint(resumed / "checkpoint-last.pth")["model"]
    for key in final_full:
        torch.testing.assert_close(final_resumed[key], final_full[key], rtol=1e-4, atol=1e-6)


def test_unreadable_files_are_skipped_with_a_warning(tmp_path, phantom_dir):
    corpus = tmp_path / "corpus"
    shutil.copytree(phantom_dir, corpus)
    (corpus / "notes.nii.gz").write_text("this is not an image")
    (corpus / "empty.nii").write_bytes(b"")
    result = run_cli(["main_pretrain.py", "--data_path", str(corpus), *TINY, "--batch_size", "4",
                      "--max_steps", "1", "--output_dir", str(tmp_path / "out")])
    assert "notes.nii.gz" in result.stderr and "empty.nii" in result.stderr
    assert "8 volumes" in result.stdout


@pytest.mark.parametrize("make_path,message", [
    (lambda tmp: tmp / "missing", "no such file or folder"),
    (lambda tmp: tmp, "no volumes found"),
])
def test_wrong_or_empty_corpus_fails_at_start(tmp_path, make_path, message):
    result = run_cli(["main_pretrain.py", "--data_path", str(make_path(tmp_path)), *TINY,
                      "--output_dir", str(tmp_path / "out")], check=False)
    assert result.returncode != 0 and message in result.stderr


def test_lr_schedule_warms_up_linearly_then_follows_half_cosine():
    base, low = 1e-3, 1e-5
    assert lr_at_step(0, base, low, 10, 110) == pytest.approx(base / 10)
    assert lr_at_step(9, base, low, 10, 110) == pytest.approx(base)
    assert lr_at_step(60, base, low, 10, 110) == pytest.approx(low + (base - low) * 0.5)
    assert lr_at_step(110, base, low, 10, 110) == pytest.approx(low)
    assert all(lr_at_step(s, base, low, 10, 110) >= lr_at_step(s + 1, base, low, 10, 110) for s in range(9, 110))
    assert math.isclose(lr_at_step(35, base, low, 10, 110),
                        low + (base - low) * 0.5 * (1 + math.cos(math.pi * 0.25)))


@pytest.mark.parametrize("mask_type", ["random", "tube"])
def test_masks_are_keyed_on_seed_epoch_and_sample_whatever_the_batch(mask_type):
    from volmae import models
    from volmae.pretraining.engine import keyed_masking_noise

    core = models.create_model("mae_vit_tiny_patch16", img_size=32, patch_size=8, depth=1, decoder_depth=1)
    cpu = torch.device("cpu")
    batch = keyed_masking_noise(core, torch.tensor([4, 9, 2]), 3, 0, mask_type, cpu)
    assert batch.shape == (3, core.num_patches)
    torch.testing.assert_close(keyed_masking_noise(core, torch.tensor([9]), 3, 0, mask_type, cpu)[0], batch[1])
    assert not torch.equal(keyed_masking_noise(core, torch.tensor([9]), 4, 0, mask_type, cpu)[0], batch[1])
    assert not torch.equal(keyed_masking_noise(core, torch.tensor([9]), 3, 1, mask_type, cpu)[0], batch[1])
    assert len(set(batch[0].tolist())) > core.noise_count(mask_type) // 2  # not degenerate
    if mask_type == "tube":  # one draw per depth column
        grid = batch.view(3, *core.grid_size)
        assert torch.equal(grid[:, 0], grid[:, -1])


def test_held_out_loss_and_contrastive_term(tmp_path, phantom_dir):
    """--val_fraction keeps volumes out of training and logs their reconstruction loss under fixed masks (the same
    value for the same weights); --contrast_weight adds a term that training alone sees and encoder.pth drops."""
    out = tmp_path / "run"
    result = run_cli(["main_pretrain.py", "--data_path", str(phantom_dir), *TINY, "--batch_size", "2",
                      "--epochs", "2", "--val_fraction", "0.25", "--val_every", "1", "--contrast_weight", "0.5",
                      "--output_dir", str(out)])
    assert "6 volumes, 2 held out for val_loss" in result.stdout
    records = read_log(out / "log.txt")
    held = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in held] == [0, 3, 6] and all(math.isfinite(r["val_loss"]) for r in held)
    assert not any(k.startswith("contrast_head") for k in load_checkpoint(out / "encoder.pth")["model"])
    assert any(k.startswith("contrast_head") for k in load_checkpoint(out / "model.pth")["model"])


def test_resuming_on_a_cache_rebuilt_with_other_preprocessing_is_refused_naming_both(tmp_path, phantom_dir):
    """R4: a cache rebuilt at another grid was resumed on without a word, and encoder.pth then recorded a
    preprocessing that only part of its training saw."""
    cache = tmp_path / "cache"
    run_cli(["main_cache.py", "--input", str(phantom_dir), "--output", str(cache), "--size", "32"])
    common = ["main_pretrain.py", "--data_path", str(cache), *TINY, "--batch_size", "4", "--output_dir",
              str(tmp_path / "run")]
    run_cli([*common, "--epochs", "1"])
    shutil.rmtree(cache)
    run_cli(["main_cache.py", "--input", str(phantom_dir), "--output", str(cache), "--size", "32", "--ct_window",
             "lung"])
    result = run_cli([*common, "--epochs", "2"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert "preprocessed otherwise" in line and "ct_window [-1000.0, 1000.0] there, [-1350.0, 150.0] here" in line
