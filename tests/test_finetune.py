"""main_finetune.py on real MedMNIST files: outputs, metrics against the medmnist Evaluator, loading."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
from medmnist import Evaluator

from tests.conftest import run_cli, shared_path
from volmae import models
from volmae.finetuning.engine import Patience, is_head_parameter
from volmae.inference.checkpoints import ClassifierCheckpoint, load_checkpoint
from volmae.inference.load_pretrained import CheckpointMismatchError, adapt_pos_embed, load_encoder
from volmae.models.pos_embed import sincos_pos_embed


def finetune(tmp_path, name, *extra, check=True):
    root = shared_path("medmnist")
    out = tmp_path / name
    result = run_cli(["main_finetune.py", "--data_root", str(root), "--output_dir", str(out), "--epochs", "1",
                      "--batch_size", "64", "--bootstrap", "50", *extra], check=check)
    return out, result


def evaluator_csv(out, split):
    return next(out.glob(f"*_{split}_*@seed0.csv"))


@pytest.mark.parametrize("flag,size,model", [("adrenalmnist3d", 28, "vit3d_tiny_patch7"),
                                             ("adrenalmnist3d", 64, "vit3d_tiny_patch16"),
                                             ("breastmnist", 28, "vit_tiny_patch7")])
def test_a_tiny_run_writes_every_output_and_matches_the_evaluator(tmp_path, flag, size, model):
    out, _ = finetune(tmp_path, f"{flag}{size}", "--data_flag", flag, "--size", str(size), "--model", model,
                      "--train_samples", "64")
    for name in ("best.pth", "results.json", "confusion_matrix.png", "roc_curve.png", "log.txt"):
        assert (out / name).exists(), name
    results = json.loads((out / "results.json").read_text())
    test = results["test"]
    assert {"auc", "acc", "auc_ci95", "per_class"} <= test.keys()
    scores = pd.read_csv(evaluator_csv(out, "test"), header=None, index_col=0).sort_index().values
    official = Evaluator(flag, "test", size=size, root=str(shared_path("medmnist"))).evaluate(scores)
    assert test["auc"] == pytest.approx(official.AUC, abs=1e-12)
    assert test["acc"] == pytest.approx(official.ACC, abs=1e-12)
    best = load_checkpoint(out / "best.pth")
    assert best["class_names"] and best["data"]["flag"] == flag and best["input_size"] == [size] * (3 if "3d" in flag else 2)
    assert best["model_name"] == model and best["kind"] == "volmae-classifier"


def test_best_checkpoint_is_the_best_validation_epoch_and_test_uses_it(tmp_path):
    out, _ = finetune(tmp_path, "sel", "--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch14",
                      "--epochs", "3", "--lr", "1e-3", "--train_samples", "128")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    best_epoch = max(log, key=lambda r: (r["val_auc"], -r["val_loss"]))["epoch"]  # the lower val loss breaks ties
    results = json.loads((out / "results.json").read_text())
    assert results["best_epoch"] == best_epoch == load_checkpoint(out / "best.pth")["epoch"]
    assert results["val"]["auc"] == pytest.approx(max(r["val_auc"] for r in log))


def test_patience_stops_once_the_validation_loss_stops_improving(tmp_path):
    rule = Patience(2)
    assert [rule.exhausted(loss) for loss in (0.7, 0.6, 0.65, 0.5, 0.55, 0.5)] == [False] * 5 + [True]  # ties: stale
    assert not any(Patience(None).exhausted(loss) for loss in (0.5, 0.6, 0.7, 0.8))
    out, result = finetune(tmp_path, "stop", "--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch14",
                           "--epochs", "12", "--lr", "0", "--warmup_epochs", "0", "--patience", "2",
                           "--train_samples", "32")
    losses = [json.loads(line)["val_loss"] for line in (out / "log.txt").read_text().splitlines()]
    replay = Patience(2)
    expected = next((epoch + 1 for epoch, loss in enumerate(losses) if replay.exhausted(loss)), 12)
    assert len(losses) == expected == json.loads((out / "results.json").read_text())["epochs_run"]
    assert ("early stop" in result.stdout) == (expected < 12)


def test_medmnist_recipe_uses_adam_and_the_official_schedule(tmp_path):
    out, result = finetune(tmp_path, "recipe", "--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch14",
                           "--recipe", "medmnist", "--epochs", "4", "--train_samples", "64")
    assert "recipe medmnist" in result.stdout and "lr 1.00e-03" in result.stdout
    lrs = [json.loads(line)["lr"] for line in (out / "log.txt").read_text().splitlines()]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4, 1e-5])  # x0.1 at 50% and 75% of the epochs
    args = load_checkpoint(out / "best.pth")["args"]
    assert args["optimizer"] == "adam" and args["augment"] == "none" and args["smoothing"] == 0.0


@pytest.mark.parametrize("name,shape", [("resnet18_3d", (2, 1, 16, 16, 16)), ("resnet50_3d", (2, 1, 16, 20, 12)),
                                        ("resnet18_2d", (2, 3, 28, 28))])
def test_resnet_baselines_train_a_step(name, shape):
    model = models.create_model(name, in_chans=shape[1], num_classes=3)
    loss = model(torch.rand(shape)).logsumexp(-1).mean()
    loss.backward()
    assert model(torch.rand(shape)).shape == (2, 3) and all(p.grad is not None for p in model.parameters())


def test_seeds_are_aggregated(tmp_path):
    out, result = finetune(tmp_path, "seeds", "--data_flag", "breastmnist", "--model", "vit_tiny_patch14",
                           "--seeds", "0,1")
    summary = json.loads((out / "results.json").read_text())
    assert summary["seeds"] == [0, 1] and len(summary["test"]["auc"]["values"]) == 2
    assert summary["test"]["auc"]["mean"] == pytest.approx(np.mean(summary["test"]["auc"]["values"]))
    assert (out / "seed_1" / "best.pth").exists()


def test_pretrained_mae_loads_across_grids_and_fine_tunes(tmp_path):
    """An MAE pretrained at 56x56x28 (patch 7) initialises a 28^3 classifier: pos-embed regenerated."""
    pre = tmp_path / "mae"
    run_cli(["main_pretrain.py", "--data_path", str(shared_path("volumes")), "--model", "mae_vit_tiny_patch16",
             "--input_size", "56,56,28", "--patch_size", "7", "--decoder_depth", "1", "--batch_size", "2",
             "--max_steps", "1", "--num_workers", "0", "--output_dir", str(pre)])
    for checkpoint in ("checkpoint-last.pth", "encoder.pth"):
        model = models.create_model("vit3d_tiny_patch7", img_size=28, num_classes=2)
        report = load_encoder(model, pre / checkpoint)
        assert report["new"] == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
        assert report["pos_embed_grids"] == [[8, 8, 4], [4, 4, 4]]
        encoder = load_checkpoint(pre / checkpoint)["model"]
        assert torch.equal(model.blocks[3].attn.qkv.weight, encoder["blocks.3.attn.qkv.weight"])
        assert torch.allclose(model.pos_embed[0], sincos_pos_embed(192, (4, 4, 4), cls_token=True))
    out, result = finetune(tmp_path, "ft", "--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch7",
                           "--finetune", str(pre / "encoder.pth"), "--epochs", "1", "--train_samples", "64")
    assert "loaded" in result.stdout and "head.weight" in result.stdout
    assert (out / "best.pth").exists()


def test_fine_tuning_keeps_the_mae_loss_from_model_pth_and_lp_ft_holds_the_encoder_in_its_probe_epochs(tmp_path):
    """--mae_loss_weight reads the MAE's decoder from model.pth (encoder.pth, which has none, is refused by name);
    --probe_epochs trains the head alone first."""
    pre = tmp_path / "mae"
    run_cli(["main_pretrain.py", "--data_path", str(shared_path("volumes")), "--model", "mae_vit_tiny_patch16",
             "--input_size", "28,28,28", "--patch_size", "7", "--decoder_depth", "1", "--batch_size", "2",
             "--max_steps", "1", "--num_workers", "0", "--output_dir", str(pre)])
    common = ["--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch7", "--epochs", "1", "--train_samples", "64",
              "--mae_loss_weight", "1"]
    out, result = finetune(tmp_path, "joint", *common, "--finetune", str(pre / "model.pth"))
    assert "keeps the MAE's reconstruction loss (weight 1, mask ratio 0.75)" in result.stdout
    assert (out / "best.pth").exists()
    _, refused = finetune(tmp_path, "no_decoder", *common, "--finetune", str(pre / "encoder.pth"), check=False)
    assert refused.returncode != 0 and "has none" in refused.stderr and "model.pth" in refused.stderr

    # LP-FT: in its probe epochs only the head moves; the encoder is the pretraining's, to the bit.
    encoder = load_checkpoint(pre / "encoder.pth")["model"]
    plain = ["--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch7", "--train_samples", "64", "--finetune",
             str(pre / "encoder.pth")]
    for probe_epochs, encoder_moves in ((1, False), (0, True)):
        out, _ = finetune(tmp_path, f"probe_{probe_epochs}", *plain, "--probe_epochs", str(probe_epochs))
        tuned = ClassifierCheckpoint.load(out / "best.pth").weights
        shared = [k for k in encoder if k in tuned and not is_head_parameter(k)]
        assert len(shared) > 10 and any(k.startswith("blocks.0.") for k in shared)
        moved = [k for k in shared if not torch.equal(tuned[k], encoder[k])]
        assert bool(moved) == encoder_moves, moved[:3]


def test_a_checkpoint_that_does_not_fit_fails_naming_the_keys(tmp_path):
    wrong = models.create_model("vit3d_small_patch4", img_size=28, num_classes=2)
    torch.save({"model": wrong.state_dict()}, tmp_path / "small.pth")
    _, result = finetune(tmp_path, "bad", "--data_flag", "adrenalmnist3d", "--model", "vit3d_tiny_patch4",
                         "--finetune", str(tmp_path / "small.pth"), check=False)
    assert result.returncode != 0
    assert "blocks.0.attn.qkv.weight" in result.stderr and "(1152, 384)" in result.stderr
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointMismatchError, match="not a readable PyTorch checkpoint"):
        load_encoder(models.create_model("vit3d_tiny_patch4", num_classes=2), tmp_path / "junk.pth")


def test_module_prefixed_and_reference_layout_checkpoints_load(tmp_path):
    mae = models.create_model("mae_vit_tiny_patch16", img_size=28, patch_size=4, decoder_embed_dim=512,
                              decoder_depth=8, decoder_num_heads=16)
    weights = {f"module.{k}": v for k, v in mae.state_dict().items()}  # a DDP checkpoint, reference decoder
    torch.save({"model": weights, "epoch": 3}, tmp_path / "ddp.pth")
    model = models.create_model("vit3d_tiny_patch4", num_classes=3, global_pool="token")
    report = load_encoder(model, tmp_path / "ddp.pth")
    assert report["new"] == ["head.bias", "head.weight"]
    assert torch.equal(model.norm.weight, mae.norm.weight)
    classifier = models.create_model("vit3d_tiny_patch4", num_classes=2, global_pool="concat")
    reference_finetuned = {k: v for k, v in classifier.state_dict().items() if not k.startswith("norm.")}
    torch.save({"model": reference_finetuned}, tmp_path / "tangerine_ft.pth")
    same = models.create_model("vit3d_tiny_patch4", num_classes=2, global_pool="concat")
    assert load_encoder(same, tmp_path / "tangerine_ft.pth")["new"] == []
    assert torch.equal(same.head.weight, classifier.head.weight) and same.fc_norm.weight.shape == (384,)


def test_learned_pos_embed_is_interpolated_per_axis():
    table = torch.randn(1, 1 + 4 * 6 * 2, 8)
    resized = adapt_pos_embed(table, (4, 6, 2), (8, 6, 2))
    assert resized.shape == (1, 1 + 96, 8) and torch.equal(resized[:, 0], table[:, 0])
    np.testing.assert_allclose(resized[0, 1:].reshape(8, 6, 2, 8).mean(0), table[0, 1:].reshape(4, 6, 2, 8).mean(0),
                               atol=1e-5)


def test_missing_medmnist_file_names_it(tmp_path):
    _, result = finetune(tmp_path, "missing", "--data_flag", "organmnist3d", "--size", "64", check=False)
    assert result.returncode != 0 and "organmnist3d_64.npz not found" in result.stderr and "--download" in result.stderr


def test_two_rank_evaluation_equals_single_process(tmp_path):
    """Same weights, evaluated by 1 and by 2 gloo ranks: identical scores, each sample once."""
    root = shared_path("medmnist")
    common = ["main_finetune.py", "--data_flag", "breastmnist", "--data_root", str(root), "--model",
              "vit_tiny_patch14", "--epochs", "1", "--lr", "0", "--min_lr", "0", "--batch_size", "16",
              "--bootstrap", "0", "--no-augment", "--head_norm", "none"]  # batch norm's running stats train even at lr 0
    run_cli([*common, "--output_dir", str(tmp_path / "one")])
    run_cli(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29527", *common,
             "--output_dir", str(tmp_path / "two")])
    for split in ("val", "test"):
        one = pd.read_csv(evaluator_csv(tmp_path / "one", split), header=None, index_col=0)
        two = pd.read_csv(evaluator_csv(tmp_path / "two", split), header=None, index_col=0)
        assert len(one) == len(two) and one.index.is_unique and two.index.is_unique
        np.testing.assert_allclose(one.values, two.values, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_an_undefined_validation_auc_is_said_to_be_the_split_s_fault_not_a_collapse(tmp_path, capsys):
    """L7, L8: validation holding one class gave AUC NaN in every epoch, and the run said the model COLLAPSED and
    should train longer."""
    from volmae.datasets.array_dataset import ArrayDataset
    from volmae.finetuning.engine import Finetuner
    from volmae.finetuning.finetune_config import TrainingConfig
    from volmae.util.dist import DistInfo
    from volmae.util.run_log import RunLog

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(24, 1, 8, 8, 8), dtype=np.uint8)
    labels = np.array([[i % 2] for i in range(24)])
    splits = {"train": ArrayDataset(images[:16], labels[:16]), "val": ArrayDataset(images[16:20], np.zeros((4, 1), int)),
              "test": ArrayDataset(images[20:], labels[20:])}
    model = models.create_model("vit3d_tiny_patch4", img_size=(8, 8, 8), num_classes=2)
    config = TrainingConfig(seed=0, epochs=2, batch_size=8, lr=1e-3, min_lr=0.0, warmup_epochs=0, weight_decay=0.05,
                            layer_decay=1.0, optimizer="adamw", schedule="cosine", smoothing=0.0, clip_grad=None,
                            class_weights="none", patience=None, precision="fp32", deepspeed=None, num_workers=0,
                            mae_loss_weight=0.0)
    trainer = Finetuner(config, model, splits, "binary-class", 2, DistInfo(0, 1, 0, torch.device("cpu")))
    checkpoint = ClassifierCheckpoint("vit3d_tiny_patch4", model.config, ["0", "1"], "binary-class", [8, 8, 8])
    selection = trainer.fit(RunLog(tmp_path, tmp_path / "tb", enabled=True), tmp_path / "best.pth", checkpoint)
    said = capsys.readouterr()
    assert selection["val_score_undefined"] and not selection["collapsed"]
    assert "undefined in every epoch" in said.out + said.err and "never left the class prior" not in said.out + said.err
