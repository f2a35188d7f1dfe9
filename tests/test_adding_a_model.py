"""docs/contributing.md, "Adding a model": its example file, dropped into models/ with no other file touched, fine-tunes,
predicts and explains through the mains. The file is dropped into a copy of the package, never the source tree."""
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO, copy_of_source, run_cli, shared_path


def readme_example() -> str:
    """The python block under the "Adding a model" heading of docs/contributing.md."""
    guide = (REPO / "docs" / "contributing.md").read_text()
    section = guide.split("## Adding a model", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture
def package_with_example(tmp_path) -> dict:
    """A copy of the package, importable as `volmae`, with the guide's file in its models/; run_cli's arguments
    for running its mains."""
    code = readme_example()
    assert len(code.strip().splitlines()) <= 25, "the guide promises a short example"
    copy = copy_of_source(tmp_path / "site" / "volmae")
    (copy / "models" / "readme_example_tiny_cnn3d.py").write_text(code)
    return {"cwd": copy, "env": {"PYTHONPATH": str(copy.parent)}}


def test_the_guide_example_model_fine_tunes_predicts_and_explains(tmp_path, package_with_example):
    root = shared_path("medmnist")
    out = tmp_path / "ft"
    run_cli(["main_finetune.py", "--data_flag", "adrenalmnist3d", "--data_root", str(root), "--model", "tiny_cnn3d",
             "--epochs", "1", "--train_samples", "64", "--bootstrap", "0", "--explain", "2", "--output_dir", str(out)],
            **package_with_example)
    assert (out / "best.pth").exists() and (out / "results.json").exists()
    assert sorted(p.name for p in (out / "explain").glob("*_overlay.png")) == ["test000_overlay.png", "test001_overlay.png"]

    images = np.load(root / "adrenalmnist3d.npz")["test_images"][:2]
    for i, image in enumerate(images):
        np.save(tmp_path / f"case{i}.npy", image)
    pd.DataFrame({"id": ["a", "b"], "path": ["case0.npy", "case1.npy"]}).to_csv(tmp_path / "cases.csv", index=False)
    run_cli(["main_predict.py", "--checkpoint", str(out / "best.pth"), "--input_csv", str(tmp_path / "cases.csv"),
             "--output_csv", str(tmp_path / "pred.csv"), "--explain", str(tmp_path / "maps"),
             "--embeddings", str(tmp_path / "emb.npy")], **package_with_example)
    predictions = pd.read_csv(tmp_path / "pred.csv")
    assert list(predictions["status"]) == ["ok", "ok"]
    assert all(Path(p).exists() for p in predictions["explanation"])
    assert np.load(tmp_path / "emb.npy").shape == (2, 16)
    assert "tiny_cnn3d" not in "".join(p.read_text() for p in (REPO / "models").glob("*.py")), "the source tree was written"
