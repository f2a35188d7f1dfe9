"""Every import inside the package resolves from the files alone, as an IDE or a structure viewer reads them
(issue 27): relative imports, never the installed name `volmae.`, which no folder of the tree carries. The mains
and benchmarks too: run as files, they name the package their relative imports start from (PEP 366)."""
import ast
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, library_files

pytestmark = pytest.mark.fast  # in-process: `make test-fast`

def imports(source: str) -> list[tuple[int, int, str, list[str]]]:
    """(line, level, module, names) of each `from ... import` and `import` of a file's source."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            found.append((node.lineno, node.level, node.module or "", [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, 0, alias.name, []) for alias in node.names]
    return found


def resolves(path: Path, level: int, module: str, names: list[str], root: Path = REPO) -> bool:
    """Whether a relative import names files of the tree, found from `path`'s place in it: a module file, or a
    folder whose imported names are its modules or come from its __init__.py."""
    base = path.parent
    for _ in range(level - 1):
        base = base.parent
    if root not in (base, *base.parents):
        return False
    target = base.joinpath(*module.split(".")) if module else base
    if target.with_suffix(".py").is_file():
        return True
    return target.is_dir() and all((target / f"{n}.py").is_file() or (target / "__init__.py").is_file() for n in names)


def package_files() -> list[Path]:
    """The library, the mains and the benchmarks: every Python file the package installs."""
    return library_files() + sorted(REPO.glob("main_*.py")) + sorted((REPO / "benchmarks").glob("*.py"))


def test_every_import_inside_the_package_resolves_from_the_tree():
    files = package_files()
    assert len(files) > 90 and REPO / "main_finetune.py" in files
    absolute, unresolved = [], []
    for path in files:
        for line, level, module, names in imports(path.read_text()):
            where = f"{path.relative_to(REPO)}:{line}"
            if level == 0 and (module == "volmae" or module.startswith("volmae.")):
                absolute.append(where)
            elif level > 0 and not resolves(path, level, module, names):
                unresolved.append(f"{where} {'.' * level}{module}")
    assert not absolute, f"absolute volmae imports inside the package (use relative ones): {absolute}"
    assert not unresolved, f"relative imports that name no file of the tree: {unresolved}"


def test_every_main_run_as_a_file_resolves_its_imports_in_the_package():
    for path in sorted(REPO.glob("main_*.py")) + sorted((REPO / "benchmarks").glob("bench_*.py")):
        package = ".".join(("volmae", *path.relative_to(REPO).parent.parts))
        assert f'    __package__ = "{package}"' in path.read_text(), path.name


@pytest.mark.parametrize("source, ok", [("from ..util.errors import DataError", True),
                                         ("from .cache import VolumeCache", True),
                                         ("from ..util.missing import Thing", False),
                                         ("from ...beyond import x", False)])
def test_the_resolver_tells_a_real_file_from_a_missing_one(source, ok):
    path = REPO / "volumes" / "sources.py"
    (_, level, module, names), = imports(source)
    assert resolves(path, level, module, names) is ok



def test_parsers_are_built_only_at_the_top_of_the_house():
    """Flags are the commands' business: the mains, the phases' and volumes' flags modules, the studies'
    commands and util/cli.py (the value parsers) build parsers; volumes, datasets, models and inference take
    typed values and never import argparse."""
    builders = {str(path.relative_to(REPO)) for path in package_files()
                if "ArgumentParser(" in path.read_text() or "add_argument(" in path.read_text()}
    allowed = {name for name in builders if name.startswith(("main_", "studies/", "benchmarks/"))
               or name.endswith("/flags.py") or name == "util/cli.py"}
    assert builders == allowed, f"parsers built below the commands: {sorted(builders - allowed)}"
    below = [path for folder in ("volumes", "datasets", "models", "inference") for path in (REPO / folder).glob("*.py")]
    importing = [str(p.relative_to(REPO)) for p in below if re.search(r"^(import argparse|from argparse)", p.read_text(), re.M)]
    assert not importing, f"argparse imported below the commands: {importing}"

