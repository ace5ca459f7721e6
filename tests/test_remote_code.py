"""A saved CLaRa loads with `trust_remote_code` in a process where this package cannot be imported."""

import subprocess
import sys
import textwrap

import torch

from conftest import make_tiny_clara

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
