"""Export the stage-3 run as the shipped model: the package's format with weights stored in fp16, plus the corpus.

LoRA weights and the added-token rows are stored in fp16 (half the bytes; loading casts them back to the backbone's
dtype); the bundled corpus is the held-out documents of prepare_data.py, none of which the model trained on.

    python examples/shipped_model/export.py --run runs/shipped/stage3r --data runs/shipped/data
"""

import argparse
import json
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from modeling_clara import ClaraForRAG
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE, SHIPPED_MODEL_DIR, WEIGHTS_FILE

MODEL_CARD = Path(__file__).resolve().parents[2] / "model_cards" / "clara-smollm2-135m.md"


def store_in_fp16(weights_file: Path) -> None:
    with safe_open(str(weights_file), framework="pt") as f:
        metadata = f.metadata()
        tensors = {key: f.get_tensor(key).half() for key in f.keys()}
    save_file(tensors, str(weights_file), metadata=metadata)


def drop_code_copies(folder: Path) -> None:
    """The package is the shipped model's code: copies of modeling_clara.py in the folder would drift from it.
    `AutoModel` still loads the folder, through the classes `modeling_clara` registers; a folder for the Hub is
    `ClaraForRAG.from_pretrained("shipped").save_pretrained(...)`, which writes the code again."""
    for code_file in folder.glob("*.py"):
        code_file.unlink()
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.pop("auto_map", None)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/shipped/stage3r"))
    parser.add_argument("--data", type=Path, default=Path("runs/shipped/data"))
    parser.add_argument("--output-dir", type=Path, default=Path(SHIPPED_MODEL_DIR))
    args = parser.parse_args()

    model = ClaraForRAG.from_pretrained(str(args.run))
    if args.output_dir.exists():
        shutil.rmtree(args.output_dir)
    model.save_pretrained(args.output_dir)
    store_in_fp16(args.output_dir / WEIGHTS_FILE)
    drop_code_copies(args.output_dir)
    shutil.copyfile(MODEL_CARD, args.output_dir / "README.md")  # the Hub shows a folder's README as its card
    corpus = [json.loads(line) for line in open(args.data / "corpus.jsonl", encoding="utf-8")]
    with open(SHIPPED_CORPUS_FILE, "w", encoding="utf-8") as out:
        for row in corpus:
            out.write(json.dumps({"id": row["id"], "text": row["text"]}, ensure_ascii=False) + "\n")
    size = sum(p.stat().st_size for p in args.output_dir.rglob("*") if p.is_file())
    print(f"{args.output_dir}: {size / 2**20:.1f} MiB; {SHIPPED_CORPUS_FILE}: {len(corpus)} documents")


if __name__ == "__main__":
    main()
