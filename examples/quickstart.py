"""Main job: load the shipped CLaRa, index a small bundled corpus, retrieve in latent space and answer.

    python examples/quickstart.py                         # the shipped CLaRa (trained on the embedded backbone)
    python examples/quickstart.py --question "..."        # your own questions
    python examples/quickstart.py --model <saved CLaRa>   # any CLaRa with a query reasoner (stage 3 / E2E)

Everything runs offline on a CPU. The index over the bundled corpus (Wikipedia passages held out from the shipped
model's training, see model_cards/clara-smollm2-135m.md) is built once and kept in ~/.cache/clara/shipped-index (the
folder `clara serve --corpus shipped --index ~/.cache/clara/shipped-index` uses too); it is rebuilt when the model's
compressor or the corpus changes.
"""

import argparse
from pathlib import Path

from modeling_clara.cli import show_package_logs
from modeling_clara.corpus import SHIPPED_CORPUS
from modeling_clara.index import open_or_build_index
from modeling_clara.loading import load_model

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped", help="a CLaRa with a query reasoner: `shipped`, a folder or Hub id")
    parser.add_argument("--corpus", default=SHIPPED_CORPUS,
                        help="JSONL with `id` and `text` per line, or `shipped` (the bundled corpus)")
    parser.add_argument("--question", action="append", help="ask this (repeatable); default: the demo questions")
    parser.add_argument("-k", "--top-k", type=int, default=None,
                        help="passages read per question (default: the model's generation_top_k)")
    parser.add_argument("--cache-dir", default="~/.cache/clara", help="where the built index is kept")
    args = parser.parse_args()
    show_package_logs()  # what the first run builds and where it keeps it, as the `clara` commands report it

    model = load_model(args.model)
    index_dir = Path(args.cache_dir).expanduser() / f"{Path(args.corpus).stem}-index"
    index = open_or_build_index(model, args.corpus, index_dir)
    print(f"{args.model}: {len(index)} passages, each compressed into {model.n_mem_tokens} memory tokens")
    for question in args.question or QUESTIONS:
        out = model.answer(question, index=index, k=args.top_k, return_dict=True, max_new_tokens=32)
        print(f"\nQ: {question}")
        for rank, (doc_id, score, text) in enumerate(zip(out["doc_indices"], out["scores"], index.texts(out["doc_indices"])), 1):
            print(f"  [{rank}] {doc_id} (cosine {score:.3f}): {text[:150]}{'...' if len(text) > 150 else ''}")
        print(f"A: {out['answer']}")


if __name__ == "__main__":
    main()
