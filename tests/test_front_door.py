"""The front door: a short README, a model card the Hub can read, a documentation site that builds strictly."""

import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_tiny_clara
from modeling_clara.backbone import without_log_notice
from modeling_clara.checkpoints import SHIPPED_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MODEL_CARD = ROOT / "model_cards" / "clara-smollm2-135m.md"

# Words that tell a story of the project instead of describing it; they belong to the research and results pages.
HISTORY_WORDS = ("used to", "previous", "no longer", "issue", "../shared", "before this")


def test_readme_is_a_short_front_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    for word in HISTORY_WORDS:
        assert word not in text.lower(), f"README.md says {word!r}"
    assert re.search(r"\bnow\b", text) is None, "README.md says 'now'"
    for heading in ("## Two commands", "## Installation", "## Quick start", "## Citation", "## Licence"):
        assert heading in text


def test_readme_links_resolve_inside_the_repository():
    text = README.read_text(encoding="utf-8")
    targets = [t for t in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text) if "://" not in t]
    assert targets, "README.md links to no page"
    for target in targets:
        assert (ROOT / target).exists(), f"README.md links to {target}, which does not exist"


def test_model_card_is_the_shipped_folders_readme():
    shipped_card = Path(SHIPPED_MODEL_DIR) / "README.md"
    assert shipped_card.read_text(encoding="utf-8") == MODEL_CARD.read_text(encoding="utf-8")


def test_model_card_has_hub_metadata_usage_and_citation():
    text = MODEL_CARD.read_text(encoding="utf-8")
    header = yaml.safe_load(text.split("---\n")[1])
    for key in ("license", "base_model", "datasets", "language", "tags", "library_name", "pipeline_tag"):
        assert key in header, f"model card metadata lacks {key}"
    for heading in ("## How to use", "## Training data and procedure", "## Evaluation", "## Limitations", "## Citation"):
        assert heading in text
    assert "arXiv" in text and "2511.18659" in text


def test_documentation_site_builds_strictly(tmp_path):
    """A broken link, anchor or API reference fails the build (`strict: true` in mkdocs.yml)."""
    mkdocs = shutil.which("mkdocs") or pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
        text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").exists()


# Quiet output: transformers' notices about choices CLaRa makes on purpose do not reach the user; nothing else is hidden.


class RecordedLogs(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_logs():
    """The messages transformers logs while a test runs (its loggers do not propagate to pytest's caplog)."""
    handler = RecordedLogs()
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(handler)
    yield handler.messages
    transformers_logger.removeHandler(handler)


def test_a_dropped_notice_is_that_message_of_that_logger_inside_the_block_only(transformers_logs):
    logger = logging.getLogger("transformers.tokenization_utils_base")
    with without_log_notice("transformers.tokenization_utils_base", "You are using the default legacy"):
        logger.warning("You are using the default legacy behaviour of the tokenizer")
        logger.warning("Asking to truncate to max_length but no maximum length is provided")
        logging.getLogger("transformers.modeling_utils").warning("You are using the default legacy elsewhere")
    logger.warning("You are using the default legacy behaviour again")
    assert transformers_logs == [
        "Asking to truncate to max_length but no maximum length is provided",
        "You are using the default legacy elsewhere",
        "You are using the default legacy behaviour again",
    ]


def test_the_processor_pads_without_the_fast_tokenizer_advice(tiny_llama_dir, transformers_logs):
    """The processor lays out token ids itself, then pads: transformers 4's advice to call the tokenizer once
    instead is not printed (each fresh tokenizer would print it once)."""
    model = make_tiny_clara(tiny_llama_dir)
    model.processor.encode_documents(["The Seine flows through Paris.", "Rome is in Italy."])
    question, documents = "Which river flows through Paris?", ["The Seine flows through Paris."]
    model.generate_from_text([question], [documents], max_new_tokens=2)
    assert not [message for message in transformers_logs if "__call__" in message], transformers_logs
