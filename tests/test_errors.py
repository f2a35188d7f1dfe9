"""Library code raises typed errors and never ends the process; only the mains' entry code turns an error
into one line and an exit status (issue 27)."""
import ast
from pathlib import Path

import pytest

from tests.conftest import REPO, library_files
from volmae.datasets.pretrain_data import build_pretrain_dataset
from volmae.util.cli import grid, run_main
from volmae.util.errors import DataError, UsageError, VolMAEError
from volmae.volumes.cache import CacheError
from volmae.volumes.preprocess import PreprocessConfig

pytestmark = pytest.mark.fast  # in-process: `make test-fast`

def process_exits(path: Path, root: Path = REPO) -> list[str]:
    """`raise SystemExit`, `sys.exit(...)` and `exit(...)` in a file, as 'file:line'."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        raised = node.exc if isinstance(node, ast.Raise) and node.exc is not None else None
        called = node.func if isinstance(node, ast.Call) else None
        name = ast.unparse(raised.func if isinstance(raised, ast.Call) else raised) if raised is not None else \
            ast.unparse(called) if called is not None else ""
        if name in ("SystemExit", "sys.exit", "exit", "quit", "os._exit"):
            found.add((node.lineno, f"{path.relative_to(root)}:{node.lineno}"))
    return [hit for _, hit in sorted(found)]


def test_library_code_never_ends_the_process():
    files = library_files()
    assert len(files) > 50
    exits = [hit for path in files for hit in process_exits(path)]
    assert not exits, f"library code ends the process; raise a volmae.util.errors error instead: {exits}"


def test_a_main_ends_the_process_only_in_its_entry_code():
    """Inside a main too, everything but the `cli()` (or `__main__`) entry raises typed errors: the body can be
    called from a notebook or a study and the error caught."""
    mains = sorted(REPO.glob("main_*.py"))
    assert len(mains) >= 6
    for path in mains:
        tree = ast.parse(path.read_text(), str(path))
        entry = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "cli")
        entry_lines = set(range(entry.lineno, entry.end_lineno + 1))
        exits = [hit for hit in process_exits(path) if int(hit.rsplit(":", 1)[1]) not in entry_lines]
        assert not exits, f"a main's body ends the process; raise a volmae.util.errors error instead: {exits}"


def test_the_finder_sees_each_way_of_ending_the_process(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import sys\nraise SystemExit('a')\nsys.exit(1)\nraise SystemExit\nprint('exit')\n")
    assert process_exits(sample, tmp_path) == ["sample.py:2", "sample.py:3", "sample.py:4"]


def test_a_user_error_ends_a_main_in_one_line_with_status_1(capsys):
    def failing(flag: str) -> None:
        raise UsageError(f"{flag} must be positive")

    assert run_main(failing, "--epochs") == 1
    assert capsys.readouterr().err == "error: --epochs must be positive\n"
    assert run_main(lambda: None) == 0 and run_main(lambda: 130) == 130
    with pytest.raises(ZeroDivisionError):  # a bug is not the user's to fix: its traceback stays
        run_main(lambda: 1 / 0)


def test_library_errors_are_typed(tmp_path):
    with pytest.raises(UsageError, match="expected 1 or 3 comma-separated sizes"):
        grid((8, 8))
    (tmp_path / "cache.json").write_text("{}")  # a cache folder without its manifest: an unfinished build
    with pytest.raises(DataError) as raised:
        build_pretrain_dataset(str(tmp_path), (8, 8, 8), PreprocessConfig(), False, 0, True)
    assert str(tmp_path) in str(raised.value)
    assert issubclass(CacheError, VolMAEError) and issubclass(CacheError, ValueError)  # old `except`s still hold
