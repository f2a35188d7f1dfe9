"""`make demo` shows the whole mission: its pipeline, on a smaller budget, leaves every output where the
summary says, and its classifier learns the task (leaves the class prior)."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from volmae.volumes.phantoms import make_phantom, write_labelled_corpus


def test_demo_writes_every_output_and_its_classifier_leaves_the_prior(demo_run):
    out = demo_run
    for name in ["phantoms/labels.csv", "cache/cache.json", "pretrain/encoder.pth", "pretrain/log.txt",
                 "finetune/best.pth", "finetune/results.json", "cases.csv", "predictions.csv", "summary.json"]:
        assert (out / name).is_file(), f"the demo did not write {name}"
    assert any((out / "pretrain" / "tensorboard").iterdir()) and any((out / "finetune" / "tensorboard").iterdir())

    summary = json.loads((out / "summary.json").read_text())
    assert not summary["test_at_prior"] and not summary["collapsed"], summary
    assert summary["test_auc"] >= 0.75, summary
    assert len(summary["held_back_predicted_classes"]) == 2, f"every held-back phantom got the same class: {summary}"

    predictions = pd.read_csv(out / "predictions.csv")
    assert (predictions["status"] == "ok").all() and len(predictions) == summary["held_back_n"]
    missing = [path for path in predictions["explanation"] if not Path(path).is_file()]
    assert not missing, f"explanation overlays missing: {missing}"

    printed = (out / "demo_stdout.txt").read_text()
    assert "test split: AUC" in printed and "volmae-finetune --setup volumes" in printed
    assert str(out / "finetune" / "best.pth") in printed


def test_labelled_phantoms_alternate_and_each_mass_replaces_lung(tmp_path):
    labels = pd.read_csv(write_labelled_corpus(tmp_path, count=4, size_range=(40, 48), progress=False))
    assert list(labels["lesion"]) == [0, 1, 0, 1] and labels["patient_id"].is_unique
    assert all((tmp_path / path).is_file() for path in labels["path"])
    for index in (1, 3):
        with_mass = sitk.GetArrayFromImage(make_phantom(np.random.default_rng([0, index]), (40, 48), lesion=True))
        without = sitk.GetArrayFromImage(make_phantom(np.random.default_rng([0, index]), (40, 48)))
        changed = np.abs(with_mass.astype(float) - without) > 400  # beyond the noise of either
        assert changed.sum() > 20, "no mass painted"
        assert (without[changed] < -600).all(), "the mass covers more than lung"
        assert (np.abs(with_mass[changed] - 40) < 150).all(), "the mass is not soft tissue"
