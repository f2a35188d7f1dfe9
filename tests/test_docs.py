"""The README and docs/ point at things that exist: every relative link resolves (anchors included), every
command quoted in README.md runs a program this checkout provides, and every repository file the pages
name is there."""
import re
import shlex
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast  # in-process: `make test-fast`

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
REPO_FILE = re.compile(r"^(?:benchmarks|launch|tests|datasets|models|util|finetuning|pretraining|studies|docs)/"
                       r"[\w./-]+\.(?:py|sh|json|png|sbatch|md)$"
                       r"|^(?:main|engine)_\w+\.py$")
EXAMPLES = {"models/tiny_cnn3d.py"}  # the file docs/contributing.md has a contributor write
TOOLS = {"pip", "tensorboard", "sbatch", "git", "torchrun", "deepspeed"}  # installed with VolMAE or the system's


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if re.match(r"#+ ", line)}


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh)\n(.*?)```", text, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, split at && and ;."""
    joined = block.replace("\\\n", " ")
    found = []
    for line in joined.splitlines():
        line = line.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        for part in re.split(r"&&|;|\|\|", line):
            words = shlex.split(part)
            while words and re.match(r"^[A-Z_]+=", words[0]):
                words = words[1:]
            if words:
                found.append(words)
    return found


def console_scripts() -> set[str]:
    return set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def make_targets() -> set[str]:
    return set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))


def module_file(module: str) -> Path:
    parts = module.split(".")
    if parts[0] == "volmae":
        parts = parts[1:]
    return REPO.joinpath(*parts).with_suffix(".py")


def program_problem(words: list[str]) -> str | None:
    """Why a quoted command does not name something this checkout provides, or None."""
    program = words[0]
    if program in (".", "source"):
        return None if words[1] == ".venv/bin/activate" else f"sources {words[1]}"
    if program.startswith(".venv/bin/"):
        program = program.removeprefix(".venv/bin/")
    if program == "make":
        missing = [t for t in words[1:] if not t.startswith("-") and t not in make_targets()]
        return f"make targets {missing} are not in the Makefile" if missing else None
    if program in ("python", "python3"):
        if words[1] == "-m":
            return None if module_file(words[2]).exists() else f"module {words[2]} has no file"
        return None if (REPO / words[1]).exists() else f"{words[1]} does not exist"
    if program.startswith("volmae-"):
        return None if program in console_scripts() else f"{program} is not a console script in pyproject.toml"
    if program in TOOLS:
        return None
    if "/" in program or program.endswith((".py", ".sh")):
        return None if (REPO / program).exists() else f"{program} does not exist"
    return f"{program}: not a file, console script or known tool"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.exists():
            broken.append(f"{target}: no such file")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{page.name}: {broken}"


def test_readme_commands_name_existing_programs():
    quoted = [words for block in code_blocks((REPO / "README.md").read_text()) for words in commands(block)]
    assert len(quoted) >= 7, quoted  # the two quick-start commands and the five for your own data, at least
    problems = [f"{' '.join(words)[:80]}: {problem}" for words in quoted if (problem := program_problem(words))]
    assert not problems, problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_repository_files_exist(page):
    text = page.read_text()
    named = {token for token in re.findall(r"[\w./-]+", text) if REPO_FILE.match(token)}
    missing = sorted(name for name in named if not (REPO / name).exists() and name not in EXAMPLES)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_fits_on_a_screen_or_two():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines; move detail into docs/"


@pytest.mark.fast
def test_the_own_data_commands_are_the_same_everywhere_they_are_given(capsys, tmp_path):
    """The README's own-data commands, docs/finetuning.md's and the demo's closing advice are one list
    (studies.own_data): a newcomer following any of them gets the recipe's defaults."""
    from volmae.studies.demo import print_summary
    from volmae.studies.own_data import own_data_lines

    expected = own_data_lines()
    for page in (REPO / "README.md", REPO / "docs" / "finetuning.md"):
        lines = page.read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("volmae-cache --input /data/scans"))
        assert lines[start:start + len(expected)] == expected, page.name
    print_summary(tmp_path, {"wall_seconds": 60, "test_auc": 1.0, "test_acc": 1.0, "test_n": 8,
                             "test_majority_share": 0.5, "test_at_prior": False, "held_back_n": 4,
                             "held_back_auc": 1.0, "held_back_acc": 1.0})
    printed = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(printed) if "volmae-cache --input /data/scans" in line)
    assert [line.strip() for line in printed[start:start + len(expected)]] == [line.strip() for line in expected]
