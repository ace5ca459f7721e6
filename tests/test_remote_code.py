"""A saved CLaRa loads with `trust_remote_code` in a process where this package cannot be imported."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from conftest import make_tiny_clara

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "modeling_clara"

DOCS = ["Paris is the capital of France.", "The Seine flows through Paris."]

REMOTE_LOAD = textwrap.dedent(
    """
    import sys
    sys.modules["modeling_clara"] = sys.modules["configuration_clara"] = None  # the package must not be used
    import torch
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    docs = {docs!r}
    embeds = model.compress(docs)
    torch.save({{"embeds": embeds, "answer": model.answer("Which river flows through Paris?", embeds)}}, sys.argv[2])
    """
)


def test_remote_code_load_in_clean_process(tiny_llama_dir, tmp_path):
    model = make_tiny_clara(tiny_llama_dir, seed=5)
    model.save_pretrained(tmp_path / "clara")
    result_file = tmp_path / "remote.pt"
    completed = subprocess.run(
        [sys.executable, "-c", REMOTE_LOAD.format(docs=DOCS), str(tmp_path / "clara"), str(result_file)],
        cwd=tmp_path,  # not the repository root, so the package is not importable from the working directory
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONNOUSERSITE": "1"},
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(result_file, weights_only=True)
    embeds = model.compress(DOCS)
    assert torch.equal(remote["embeds"], embeds)
    assert remote["answer"] == model.answer("Which river flows through Paris?", embeds)


def sibling_imports(path: Path) -> set[str]:
    """The sibling files a code file imports with a single-dot import (`from .x import y`)."""
    tree = ast.parse(path.read_text())
    return {f"{node.module}.py" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}


def test_saved_checkpoint_carries_the_model_file_its_mixins_and_every_file_they_import(tiny_llama_dir, tmp_path):
    make_tiny_clara(tiny_llama_dir).save_pretrained(tmp_path)
    direct = sibling_imports(PACKAGE_DIR / "modeling_clara.py")
    assert {"adapters_clara.py", "apple_methods_clara.py", "checkpoint_io_clara.py"} <= direct
    for name in direct:
        # transformers copies only what the model file imports itself when it loads a local folder
        assert sibling_imports(PACKAGE_DIR / name) <= direct, name
        assert "modeling_clara.py" not in sibling_imports(PACKAGE_DIR / name), f"{name} imports the model file"
        assert (tmp_path / name).read_text() == (PACKAGE_DIR / name).read_text()
