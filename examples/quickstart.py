"""Main job: load the shipped CLaRa, index a small bundled corpus, retrieve in latent space and answer.

    python examples/quickstart.py                         # the shipped CLaRa (trained on the embedded backbone)
    python examples/quickstart.py --question "..."        # your own questions
    python examples/quickstart.py --model <saved CLaRa>   # any CLaRa with a query reasoner (stage 3 / E2E)

Everything runs offline on a CPU. The index over the bundled corpus (Wikipedia passages held out from the shipped
model's training, see model_cards/clara-smollm2-135m.md) is built once and cached in ~/.cache/clara/; it is
rebuilt when the model's compressor changes.
"""

import argparse
import hashlib
import os

from transformers.utils import logging

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE

logger = logging.get_logger(__name__)

# Held-out questions about passages of the bundled corpus (none was trained on): the five of 195 that the shipped
# model answers exactly from the passage it retrieves first, while reading another passage's memory it answers wrongly
# (`python benchmarks/bundled_corpus_answers.py`). They show what the model does when it works, not how often: over all
# 195 its answers reach F1 >= 0.5 for 35 (README, "The shipped model"). Ask your own with --question.
QUESTIONS = [
    "What is the name of the program associated with the discovery of minor planet 178146?",
    "How many times did Tom Reid win the Munster Senior Cup with Garryowen?",
    "What language is the film Amma in?",
    "Where does Robert Martin Patterson currently reside?",
    "Which country has a comprehensive national smoke-free law covering all public indoor areas and some outdoor areas?",
]


def cached_index(model: ClaraForRAG, corpus: str, cache_dir: str) -> ClaraIndex:
    """The index of `corpus` for this model: loaded from `cache_dir`, or built and cached there."""
    with open(corpus, "rb") as f:
        key = hashlib.sha256(f.read() + str(model.name_or_path).encode()).hexdigest()[:16]
    folder = os.path.join(os.path.expanduser(cache_dir), f"index-{key}")
    try:
        return ClaraIndex.load(folder, model=model)
    except (FileNotFoundError, ValueError) as error:
        logger.warning(f"building the index of {corpus} ({error})")
    return ClaraIndex.build(model, corpus, output_dir=folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--corpus", default=SHIPPED_CORPUS_FILE, help="JSONL with `id` and `text` per line")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: the demo questions")
    parser.add_argument("-k", type=int, default=None, help="passages read per question (default: generation_top_k)")
    parser.add_argument("--cache-dir", default="~/.cache/clara", help="where the built index is kept")
    args = parser.parse_args()

    model = ClaraForRAG.from_pretrained(args.model)
    index = cached_index(model, args.corpus, args.cache_dir)
    print(f"{args.model}: {len(index)} passages, each compressed into {model.n_mem_tokens} memory tokens")
    for question in args.question or QUESTIONS:
        out = model.answer(question, index=index, k=args.k, return_dict=True, max_new_tokens=32)
        print(f"\nQ: {question}")
        for rank, (doc_id, score, text) in enumerate(zip(out["doc_indices"], out["scores"], index.texts(out["doc_indices"])), 1):
            print(f"  [{rank}] {doc_id} (cosine {score:.3f}): {text[:150]}{'...' if len(text) > 150 else ''}")
        print(f"A: {out['answer']}")


if __name__ == "__main__":
    main()
