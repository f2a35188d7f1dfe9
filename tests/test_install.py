"""`pip install -e .` gives commands that work from any folder, beside a foreign top-level `datasets` package
(as Hugging Face's is in many ML environments): VolMAE's folders install as `volmae.*`, never as top-level names."""
import os
import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pandas as pd

from tests.conftest import REPO, copy_of_source

BIN = Path(sys.executable).parent
COMMANDS = {"volmae-cache": "volmae.main_cache:cli", "volmae-pretrain": "volmae.main_pretrain:cli",
            "volmae-finetune": "volmae.main_finetune:cli", "volmae-predict": "volmae.main_predict:cli",
            "volmae-export": "volmae.main_export:cli", "volmae-study": "volmae.main_study:cli"}


def foreign_site(root: Path) -> Path:
    """Top-level `datasets`, `models` and `util` packages that are not VolMAE's."""
    for name in ("datasets", "models", "util"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f'"""Not VolMAE\'s {name}."""\nFOREIGN = True\n')
    return root


def run(command: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command[0]} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_console_scripts_are_the_mains_entry_points():
    installed = {ep.name: ep.value for ep in entry_points(group="console_scripts") if ep.name.startswith("volmae-")}
    assert installed == COMMANDS
    for name in COMMANDS:
        assert (BIN / name).is_file(), f"{name} is not installed beside {sys.executable}"


def test_commands_from_another_folder_beside_a_foreign_datasets_package(tmp_path, finetuned, phantom_dir):
    site = foreign_site(tmp_path / "site")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}

    both = run([sys.executable, "-c", "import datasets, models, util, volmae.volumes.cache, volmae.models, volmae.util.cli; "
                "assert datasets.FOREIGN and models.FOREIGN and util.FOREIGN; print(volmae.volumes.cache.__file__)"],
               elsewhere, env)
    assert Path(both.stdout.strip()) == REPO / "volumes" / "cache.py"

    help_text = run([BIN / "volmae-predict", "--help"], elsewhere, env).stdout
    assert "--input_csv" in help_text and "(default: " in help_text

    phantoms = sorted(phantom_dir.glob("*.nii.gz"))[:2]
    pd.DataFrame({"path": [str(path) for path in phantoms]}).to_csv(elsewhere / "cases.csv", index=False)
    run([BIN / "volmae-predict", "--checkpoint", finetuned[0], "--input_csv", "cases.csv",
         "--output_csv", "predictions.csv"], elsewhere, env)
    predictions = pd.read_csv(elsewhere / "predictions.csv")
    assert list(predictions["status"]) == ["ok", "ok"]

    run([BIN / "volmae-cache", "--input", phantom_dir, "--output", "cache", "--size", "16", "--workers", "1"],
        elsewhere, env)
    assert (elsewhere / "cache" / "cache.json").is_file()



def test_the_wheel_ships_every_main_and_the_deepspeed_configurations_the_help_names(tmp_path):
    source = copy_of_source(tmp_path / "source")  # a build writes build/ beside pyproject.toml
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    with zipfile.ZipFile(next((tmp_path / "wheel").glob("*.whl"))) as wheel:
        names = set(wheel.namelist())
    for config in (REPO / "launch" / "deepspeed").glob("*.json"):
        assert f"volmae/launch/deepspeed/{config.name}" in names
    for main in REPO.glob("main_*.py"):
        assert f"volmae/{main.name}" in names
    assert {"volmae/__init__.py", "volmae/util/errors.py", "volmae/volumes/reading.py"} <= names


def test_parsing_a_command_s_flags_imports_neither_medmnist_nor_sklearn():
    """Each imports in a second or more (medmnist's __init__ brings sklearn and PIL), which every command would pay
    at its start, --help and one-line refusals included; they are imported where a metric or MedMNIST file is
    read. The default MedMNIST root, spelled out to spare that import, stays medmnist's own."""
    probe = ("import sys; from volmae import main_export, main_predict; "
             "from volmae.finetuning import flags as f; from volmae.pretraining import flags as p; "
             "[m.get_args_parser() for m in (f, p, main_predict, main_export)]; "
             "print(sorted({n.split('.')[0] for n in sys.modules} & {'medmnist', 'sklearn'}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr
    from medmnist.info import DEFAULT_ROOT as medmnist_root

    from volmae.datasets.medmnist_data import DEFAULT_ROOT
    assert DEFAULT_ROOT == medmnist_root
