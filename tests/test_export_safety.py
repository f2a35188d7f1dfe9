"""Exports that delete nothing they did not write and know themselves (issue 35, probe 4's E findings), on a
classifier fine-tuned on real LIDC crops and an MAE encoder: every --overwrite leaves foreign files byte for byte,
a refused or killed export leaves the old one, and an edited or swapped file is refused in one line."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from tests.conftest import REPO, lidc_classifier, one_line_refusal, run_entry, tiny_encoder
from volmae.inference.checkpoints import load_checkpoint
from volmae.inference.load_model import NotAVolMAECheckpoint, load_for_inference
from volmae.util.checkpoint import CheckpointError
from volmae.util.folder_swap import recover
from volmae.util.run_lock import output_folder_lock


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished fine-tuning run on 24 real LIDC crops (its whole folder: best.pth, results, scores, cache, logs)
    and a cases CSV of its test crops."""
    return lidc_classifier(tmp_path_factory.mktemp("export_safety"))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, phantom_dir):
    return tiny_encoder(tmp_path_factory.mktemp("export_safety_encoder"), phantom_dir)


def export(capsys, checkpoint, output_dir, *extra: str, check: bool = True, cwd=None):
    """volmae-export in this process (util.cli.run_main, as the command runs it)."""
    result = run_entry(capsys, "main_export", ["--checkpoint", checkpoint, "--output_dir", output_dir, *extra], cwd)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def predict(capsys, checkpoint, cases, output, *extra: str, check: bool = True):
    result = run_entry(capsys, "main_predict", ["--checkpoint", checkpoint, "--input_csv", cases, "--output_csv", output,
                                                 *extra])
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def tree_hashes(folder) -> dict[str, str]:
    """Every file under `folder` (hidden ones too) and its sha256: what must survive a refused export."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_overwrite_onto_its_run_folder_or_a_parent_is_refused_and_every_byte_stays(run, capsys):
    """E1: an export into the run folder it comes from (or above it) would have deleted best.pth, results, scores,
    logs and the volume cache."""
    before = tree_hashes(run)
    for target in (run / "ft", run):
        one_line_refusal(export(capsys, run / "ft" / "best.pth", target, "--overwrite", check=False), "export into a folder")
    assert tree_hashes(run) == before


def test_overwrite_onto_a_folder_of_foreign_files_is_refused_and_every_byte_stays(run, tmp_path, capsys):
    """E2: a folder with a config.json of its own (a repository, `--output_dir .`) is not an export."""
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "someone else\'s project"}')
    (project / "src" / "main.py").write_text("print('mine')\n")
    before = tree_hashes(project)
    for target, cwd in ((project, REPO), (".", project)):
        line = one_line_refusal(export(capsys, run / "ft" / "best.pth", target, "--overwrite", check=False, cwd=cwd),
                                "holds files no export", "config.json")
        assert "src" in line
    assert tree_hashes(project) == before


def test_a_refused_export_leaves_the_previous_export_as_it_was(run, tmp_path, capsys):
    """E3: the old export was deleted before the new one was checked; now the new one is built beside it."""
    target = tmp_path / "export"
    export(capsys, run / "ft" / "best.pth", target)
    before = tree_hashes(target)
    one_line_refusal(export(capsys, run / "ft" / "best.pth", target, "--overwrite", "--format", "monai", check=False),
                     "takes a pretrained encoder")
    unreadable = tmp_path / "unreadable.csv"
    pd.DataFrame({"path": ["/no/such/volume.nii.gz"]}).to_csv(unreadable, index=False)
    one_line_refusal(export(capsys, run / "ft" / "best.pth", target, "--overwrite", "--format", "onnx", "--check_csv",
                            str(unreadable), check=False), "none of the check cases")
    assert tree_hashes(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "unreadable.csv"]  # no half export beside it


def test_kill_9_during_an_overwrite_leaves_the_old_export_and_the_next_one_finishes(run, tmp_path, capsys):
    """E26: the new export is built in a hidden sibling; killed there, the old one is untouched and the next
    export removes what the dead one left."""
    target = tmp_path / "export"
    export(capsys, run / "ft" / "best.pth", target)
    before = tree_hashes(target)
    process = subprocess.Popen([sys.executable, str(REPO / "main_export.py"), "--checkpoint", str(run / "ft" / "best.pth"),
                                "--output_dir", str(target), "--overwrite", "--format", "onnx"], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(".export.building-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "the export finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert tree_hashes(target) == before
    result = export(capsys, run / "ft" / "best.pth", target, "--overwrite", "--format", "onnx")
    assert "removed .export.building-" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (target / "model.onnx").is_file() and not (target / "model.safetensors").exists()


def test_an_export_set_aside_by_a_killed_swap_is_put_back(tmp_path):
    """The moment between the swap's two renames: the old folder under its hidden name is restored."""
    target = tmp_path / "export"
    hidden = tmp_path / ".export.replaced-999999999"
    hidden.mkdir()
    (hidden / "config.json").write_text("{}")
    notes = recover(target)
    assert (target / "config.json").read_text() == "{}" and not hidden.exists() and "restored" in notes[0]


def test_an_overwrite_through_a_symlinked_folder_replaces_the_export_it_points_to(run, tmp_path, capsys):
    """E23."""
    export(capsys, run / "ft" / "best.pth", tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    export(capsys, run / "ft" / "best.pth", tmp_path / "link", "--overwrite", "--format", "onnx")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "model.onnx").is_file()


def test_edited_or_swapped_files_are_refused_in_one_line_naming_the_file(run, encoder, tmp_path, capsys):
    """E15, E16, E8-E13, E17: config.json's hash of the model definition is in the weights' own metadata, and the
    hash of every file is in config.json."""
    export(capsys, run / "ft" / "best.pth", tmp_path / "st")
    export(capsys, run / "ft" / "best.pth", tmp_path / "onnx", "--format", "onnx")
    export(capsys, encoder, tmp_path / "encoder_onnx", "--format", "onnx")
    export(capsys, encoder, tmp_path / "encoder_st")
    edits = {
        "preprocessing": lambda c: c["checkpoint"]["preprocess"].update(ct_window=[-500, 500]),
        "embed_dim": lambda c: c["checkpoint"]["model_config"].update(embed_dim=64),
        "huge_grid": lambda c: c["checkpoint"]["model_config"].update(img_size=[4000, 4000, 4000]),
        "string_grid": lambda c: c["checkpoint"]["model_config"].update(img_size="big"),
        "missing_key": lambda c: c["checkpoint"].pop("model_config"),
        "classes": lambda c: c["checkpoint"].update(class_names=["benign", "malignant"]),
    }
    for name, edit in edits.items():
        folder = tmp_path / f"edited_{name}"
        folder.mkdir()
        for file in (tmp_path / "st").iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        config = json.loads((folder / "config.json").read_text())
        edit(config)
        (folder / "config.json").write_text(json.dumps(config))
        line = one_line_refusal(predict(capsys, folder, run / "cases.csv", tmp_path / f"{name}.csv", check=False),
                                "config.json")
        assert "edited" in line or "missing" in line, line
    swaps = {"st": ("model.safetensors", tmp_path / "encoder_st"), "onnx": ("model.onnx", tmp_path / "encoder_onnx")}
    for kind, (file, donor) in swaps.items():
        (tmp_path / kind / file).write_bytes((donor / file).read_bytes())
        line = one_line_refusal(predict(capsys, tmp_path / kind, run / "cases.csv", tmp_path / f"swap_{kind}.csv", check=False),
                                file)
        assert "hash" in line
    assert not list(tmp_path.glob("*.csv"))  # nothing was predicted from any of them


def test_a_symlinked_checkpoint_exports_with_its_run_s_scores_and_cases(run, tmp_path, capsys):
    """E22: results.json and test_scores.csv are looked up beside the link's target."""
    (tmp_path / "best.pth").symlink_to(run / "ft" / "best.pth")
    result = export(capsys, tmp_path / "best.pth", tmp_path / "onnx", "--format", "onnx")
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    assert "test" in config["card"]["scores"] and config["onnx"]["checked_on"].endswith("test_scores.csv")
    assert "phantoms" not in result.stdout


def test_a_live_or_unfinished_run_is_refused_unless_allowed(run, tmp_path, capsys):
    """E24: a locked folder's checkpoint is an epoch of a run still going; a best.pth without results.json one of
    a run that stopped."""
    with output_folder_lock(run / "ft"):
        line = one_line_refusal(export(capsys, run / "ft" / "best.pth", tmp_path / "live", check=False), "in use by pid")
        assert "--allow_unfinished" in line
        export(capsys, run / "ft" / "best.pth", tmp_path / "live", "--allow_unfinished")
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "best.pth").write_bytes((run / "ft" / "best.pth").read_bytes())
    (stopped / "log.txt").write_text('{"epoch": 0}\n')
    one_line_refusal(export(capsys, stopped / "best.pth", tmp_path / "out", check=False), "no results.json")


def test_every_checkpoint_a_pretraining_writes_exports_and_a_mistyped_check_csv_is_refused(encoder, tmp_path, capsys):
    """E4: checkpoint-last.pth carries the optimizer's state, which is not JSON; E27: a --check_csv that does not
    exist fell back to phantoms; E7: model.safetensors was written 0600 beside 0644 files."""
    for name in ("checkpoint-last.pth", "model.pth", "encoder.pth"):
        export(capsys, encoder.parent / name, tmp_path / name)
        exported = load_checkpoint(tmp_path / name)["model"]
        original = load_checkpoint(encoder)["model"]
        assert exported.keys() == original.keys() and all((exported[k] == original[k]).all() for k in original)
    modes = {oct(path.stat().st_mode & 0o777) for path in (tmp_path / "encoder.pth").iterdir()}
    assert len(modes) == 1, modes
    one_line_refusal(export(capsys, encoder, tmp_path / "typo", "--format", "onnx", "--check_csv", str(tmp_path / "nope.csv"),
                            check=False), "--check_csv", "no such file")
    assert not (tmp_path / "typo").exists()


def test_the_messages_name_what_the_file_is(run, tmp_path, capsys):
    """E29, E31, E32: an ONNX folder loaded as weights, VolMAE's own config.json given as the checkpoint, and a
    config.json without its checkpoint key."""
    export(capsys, run / "ft" / "best.pth", tmp_path / "onnx", "--format", "onnx")
    export(capsys, run / "ft" / "best.pth", tmp_path / "st")
    with pytest.raises(CheckpointError, match="an ONNX export"):
        load_checkpoint(tmp_path / "onnx")
    assert load_for_inference(tmp_path / "st" / "config.json").is_classifier
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(CheckpointError, match="a JSON file") as err:
        load_checkpoint(tmp_path / "other.json")
    assert "weights_only" not in str(err.value) and "crafted" not in str(err.value)
    pd.DataFrame({"file": ["a.nii.gz"]}).to_csv(tmp_path / "cases.csv", index=False)
    line = one_line_refusal(export(capsys, run / "ft" / "best.pth", tmp_path / "checked", "--format", "onnx",
                                   "--check_csv", tmp_path / "cases.csv", check=False), "no 'path' column")
    assert "--path_col" not in line  # volmae-export has no such flag (P7)
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    del config["checkpoint"]
    (tmp_path / "st" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NotAVolMAECheckpoint, match="key 'checkpoint' is missing"):
        load_for_inference(tmp_path / "st")


def test_onnx_prediction_refuses_embeddings_and_explanations_in_one_line(run, tmp_path, capsys):
    """E19, E20: an ONNX classifier gives logits only."""
    export(capsys, run / "ft" / "best.pth", tmp_path / "onnx", "--format", "onnx")
    for extra, words in ((["--embeddings", str(tmp_path / "e.npy")], "gives logits only"),
                         (["--explain", str(tmp_path / "maps")], "--explain needs gradients")):
        one_line_refusal(predict(capsys, tmp_path / "onnx", run / "cases.csv", tmp_path / "p.csv", *extra, check=False), words)
    predict(capsys, tmp_path / "onnx", run / "cases.csv", tmp_path / "p.csv")  # the folder alone is enough
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(pd.read_csv(run / "cases.csv"))
    assert os.access(tmp_path / "p.csv", os.R_OK)
