"""Run by tests/test_stack_compat.py under the *other* stack's Python (`$CLARA_OTHER_PYTHON`): saves, loads and
converts there, and writes what it saw to a torch file for the test to compare.

    python stack_worker.py save BACKBONE_DIR CHECKPOINT_DIR RESULT   # fresh tiny CLaRa, saved, with its outputs
    python stack_worker.py load CHECKPOINT_DIR RESULT MODE           # MODE: package (AutoModel, no remote code)
                                                                     #       or remote (trust_remote_code, no package)
    python stack_worker.py embedded RESULT                           # digest of the converted embedded backbone
"""

import sys

if __name__ == "__main__" and sys.argv[1] == "load" and sys.argv[-1] == "remote":
    sys.modules["modeling_clara"] = sys.modules["configuration_clara"] = None  # the package must not be used

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

# Shared with test_stack_compat.py, which imports them from here.
DOCS = ["Paris is the capital of France.", "The Seine flows through Paris.", "Kilimanjaro is in Tanzania."]
QUESTION = "Which river flows through Paris?"
TOKENIZER_STRINGS = [
    "Hello world, Paris",
    "  two  spaces\tand a tab\n\nnew line",
    "a , b 's don't . (x) [y]!?",
    "Ünïcödé — «quotes» 東京 ½",
    "<MEM0><SEP> mem<ENC>x<AE>",
]


def outputs(model) -> dict:
    embeds = model.compress(DOCS)
    answer = model.answer(QUESTION, embeds, k=2, return_dict=True)
    return {"embeds": embeds, "answer": answer["answer"], "doc_indices": answer["doc_indices"]}


def tokenizer_view(path: str) -> dict:
    """What `AutoTokenizer` (the way a user loads it) makes of the saved tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in TOKENIZER_STRINGS]
    return {"ids": ids, "decoded": [tokenizer.decode(seq) for seq in ids], "pad_token_id": tokenizer.pad_token_id}


def save(backbone_dir: str, checkpoint_dir: str, result: str) -> None:
    from modeling_clara import ClaraForRAG

    torch.manual_seed(0)
    model = ClaraForRAG.from_backbone(backbone_dir, doc_max_length=32, compr_rate=8, generation_top_k=2, lora_r=4,
                                      max_new_tokens=6, training_stage="stage2")
    with torch.no_grad():
        for name, parameter in model.decoder.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.2)  # fresh LoRA B is zero, which would make every adapter a no-op
    model.save_pretrained(checkpoint_dir)
    torch.save({**outputs(model), "transformers": transformers.__version__}, result)


def load(checkpoint_dir: str, result: str, mode: str) -> None:
    if mode == "package":
        import modeling_clara  # noqa: F401  (registers the classes with AutoModel)

        model = AutoModel.from_pretrained(checkpoint_dir)
    else:
        model = AutoModel.from_pretrained(checkpoint_dir, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
    torch.save({**outputs(model), "tokenizer": tokenizer_view(checkpoint_dir),
                "transformers": transformers.__version__}, result)


def embedded(result: str) -> None:
    from safetensors.torch import load_file

    from modeling_clara.backbone import resolve_embedded_backbone

    path = resolve_embedded_backbone()
    weights = load_file(os.path.join(path, "model.safetensors"))
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(torch.uint8).numpy().tobytes())
    with open(os.path.join(path, "tokenizer.json"), encoding="utf-8") as f:
        tokenizer_json = json.dumps(json.load(f), sort_keys=True)  # same content, whatever the writer's layout
    torch.save({"weights": digest.hexdigest(), "tokenizer_json": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
                "tokenizer": tokenizer_view(path), "transformers": transformers.__version__}, result)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"save": save, "load": load, "embedded": embedded}[command](*args)
