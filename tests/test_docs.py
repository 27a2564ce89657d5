"""README.md and docs/*.md: every repository path and Python object they name exists, every
link and anchor resolves, every ```python block runs, and the layout names every module."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# A token in backticks or in a code block is a repository path when it starts like one; the
# output folders the workflow writes at the top (datasets/, training-runs/, tuned/, scores/,
# graphics/, ...) and paths outside the repository (../shared/...) are not checked.
PATH_PREFIXES = ("anodata/", "anomaly/", "stylegan/", "bench/", "scripts/", "tests/", "docs/",
                 "models/", "data/")
ROOT_FILES = {"Makefile", "pyproject.toml", "requirements.txt", "requirements-test.txt",
              "environment.yml", ".ci/run", ".gitignore", "README.md"}
# Folders the documented commands create, absent from a fresh clone: `anostyle adapt --dest
# models/mine` (the README's example) and scripts/10_adapt.sh's default ADAPTED folder.
GENERATED = ("models/mine", "models/adapted")
# The characters of a path token (placeholders such as <class> and globs such as * included).
TOKEN = re.compile(r"(?<![\w./-])[\w.<>*{}\[\]-]+(?:/[\w.<>*{}\[\]-]*)*")
NO_RUN = "<!-- no-run"  # on the line before a ```python block: needs data not in the repository


def _text(doc: Path) -> str:
    return doc.read_text(encoding="utf-8")


def _fences(text: str) -> list[tuple[str, str, str]]:
    """(language, code, the line before the fence) of every fenced code block."""
    found = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((m.group(1), m.group(2), before))
    return found


def _named_paths(text: str) -> set[str]:
    """Repository paths named in backticks or in code blocks."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    spans = re.findall(r"`([^`\n]+)`", prose) + [code for _, code, _ in _fences(text)]
    named = set()
    for span in spans:
        for token in TOKEN.findall(span):
            token = token.rstrip(".,;:")
            if token in ROOT_FILES or (token.startswith(PATH_PREFIXES) and "/" in token):
                named.add(token)
    return named


def _exists(path: str) -> bool:
    if any(path.rstrip("/") == g or path.startswith(g + "/") for g in GENERATED):
        return True
    pattern = re.sub(r"<[^>]*>|\{[^}]*\}|\[[^\]]*\]", "*", path)
    if "*" in pattern:
        return any(REPO.glob(pattern.rstrip("/")))
    return (REPO / path).exists()


def test_path_tokens_are_found():
    """The extraction itself: paths in prose backticks and code blocks, nothing from URLs."""
    text = ("See `models/ham64-cpu/splits.csv`, `Makefile` and `anostyle x --a=bench/y.py`.\n"
            "```\nrun scripts/01_prepare_data.sh ../shared/data/ph2 https://h/docs/x\n```\n")
    assert _named_paths(text) == {"models/ham64-cpu/splits.csv", "Makefile", "bench/y.py",
                                  "scripts/01_prepare_data.sh"}
    assert _exists("scripts/<n>_prepare_data.sh") and not _exists("bench/border.py")
    assert _exists("models/mine/evaluation/") and not _exists("models/minefield")
    assert _python_names("`from x import anomaly.model.ano_model.AnoModel` and `stylegan.ops`") == \
        {"anomaly.model.ano_model.AnoModel", "stylegan.ops"}
    assert _resolves("anomaly.model.ano_model.AnoModel")
    assert not _resolves("anomaly.model.ano_model.NoSuchModel")
    assert not _resolves("anomaly.no_such_module")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_named_path_exists(doc):
    missing = sorted(p for p in _named_paths(_text(doc)) if not _exists(p))
    assert not missing, f"{doc.name} names paths that do not exist: {missing}"


def _python_names(text: str) -> set[str]:
    """Dotted names of our packages in prose backticks, e.g.
    anomaly.methods.detector.load_model_dir."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return {name for span in re.findall(r"`([^`\n]+)`", prose)
            for name in re.findall(r"(?<![\w.])((?:anodata|anomaly|stylegan)(?:\.\w+)+)", span)}


def _resolves(name: str) -> bool:
    """The longest importable module prefix of `name` holds the rest as attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_named_python_object_exists(doc):
    missing = sorted(n for n in _python_names(_text(doc)) if not _resolves(n))
    assert not missing, f"{doc.name} names Python objects that do not exist: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    prose = re.sub(r"^```.*?^```", "", _text(doc), flags=re.S | re.M)
    return {_slug(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_link_resolves(doc):
    prose = re.sub(r"^```.*?^```", "", _text(doc), flags=re.S | re.M)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(target)
    assert not broken, f"{doc.name} links to what does not exist: {broken}"


def _python_blocks() -> list:
    blocks = []
    for doc in DOCS:
        for k, (lang, code, before) in enumerate(_fences(_text(doc))):
            if lang == "python":
                name = f"{doc.relative_to(REPO).as_posix()}:{k}"
                marks = [pytest.mark.skip(reason=before)] if before.startswith(NO_RUN) else []
                blocks.append(pytest.param(code, id=name, marks=marks))
    return blocks


def test_the_readme_has_a_python_example():
    assert any(p.id.startswith("README.md") for p in _python_blocks())


@pytest.mark.slow
@pytest.mark.parametrize("code", _python_blocks())
def test_python_block_runs(code):
    """Each block as written, from the repository root, with this Python, in its own process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: the files on disk
        out = [p.relative_to(REPO).as_posix() for p in REPO.rglob("*")
               if p.is_file() and not {".venv", ".git", "__pycache__"} & set(p.parts)]
    return [f for f in out if (REPO / f).is_file()]


def test_the_layout_names_every_module():
    """Every module outside tests/ and every script of scripts/ is named in README.md or docs/."""
    text = "\n".join(_text(doc) for doc in DOCS)
    modules = [f for f in _tracked_files()
               if (f.endswith(".py") and not f.startswith("tests/"))
               or (f.startswith("scripts/") and f.endswith(".sh"))]
    assert "anomaly/cli.py" in modules and "bench/run_all.py" in modules
    unnamed = [f for f in modules if f"`{f}`" not in text]
    assert not unnamed, f"docs/layout.md should name these modules: {unnamed}"
