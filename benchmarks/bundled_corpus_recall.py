"""How well a CLaRa's query reasoner finds passages in the bundled demo corpus (what `make demo` searches).

The bundled corpus is the shipped model's 100 held-out SCP passages; Apple's SCP sample holds QA pairs for each, none
trained on. Every question (the first `--questions-per-passage` of each passage) searches the whole index; the table
gives Recall@1 / @5 (the gold passage first / among the first five; chance 1% / 5%) and the gold passage's mean rank,
models and full-text rankers (`modeling_clara.text_retrieval`, ranking the whole corpus for each question) side by
side.

    python benchmarks/bundled_corpus_recall.py --model shipped runs/ibn/stage3r --text-rankers bm25
"""

import argparse
import json
from pathlib import Path

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.text_retrieval import TEXT_RETRIEVERS, load_text_retriever

DEFAULT_QA = Path(__file__).resolve().parents[2] / "shared" / "data" / "clara_pretrain_sample.jsonl"


def corpus_qa(qa_file: Path, corpus: list[str], per_passage: int) -> list[tuple[int, str, str]]:
    """(index of the gold passage in `corpus`, question, answer) for the corpus passages' QA pairs."""
    position = {text: i for i, text in enumerate(corpus)}
    qa = []
    for line in open(qa_file, encoding="utf-8"):
        row = json.loads(line)
        if row["docs"][0] in position:
            pairs = list(zip(row["question"], row["answers"]))[:per_passage]
            qa += [(position[row["docs"][0]], question, answer) for question, answer in pairs]
    return qa


def gold_ranks(model: ClaraForRAG, corpus_file: str, questions: list[tuple[int, str, str]]) -> list[int]:
    """0-based rank of each question's gold passage among all passages of the index."""
    index = ClaraIndex.build(model, corpus_file)
    results = index.search([q for _, q, _ in questions], k=len(index))
    return [result.positions.index(gold) for (gold, _, _), result in zip(questions, results)]


def text_gold_ranks(ranker: str, corpus: list[str], questions: list[tuple[int, str, str]]) -> list[int]:
    rankings = load_text_retriever(ranker).rank_batch([q for _, q, _ in questions], [corpus] * len(questions))
    return [ranking.index(gold) for (gold, _, _), ranking in zip(questions, rankings)]


def table_row(name: str, ranks: list[int]) -> str:
    n = len(ranks)
    return (f"| {name} | {100 * sum(r == 0 for r in ranks) / n:.1f} | {100 * sum(r < 5 for r in ranks) / n:.1f} | "
            f"{1 + sum(ranks) / n:.2f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["shipped"])
    parser.add_argument("--qa", type=Path, default=DEFAULT_QA, help="Apple's SCP sample (QA pairs per passage)")
    parser.add_argument("--questions-per-passage", type=int, default=2)
    parser.add_argument("--text-rankers", nargs="*", default=[], choices=TEXT_RETRIEVERS)
    args = parser.parse_args(argv)
    corpus = [json.loads(line)["text"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    questions = corpus_qa(args.qa, corpus, args.questions_per_passage)
    if not questions:
        raise ValueError(f"{args.qa} holds no question about a passage of {SHIPPED_CORPUS_FILE}")
    print(f"{len(questions)} held-out questions over {len(corpus)} bundled passages")
    print("| model | Recall@1 | Recall@5 | gold passage's mean rank (1 = first) |")
    print("|---|---|---|---|")
    for name in args.model:
        print(table_row(name, gold_ranks(ClaraForRAG.from_pretrained(name), SHIPPED_CORPUS_FILE, questions)))
    for ranker in args.text_rankers:
        print(table_row(f"text: {ranker}", text_gold_ranks(ranker, corpus, questions)))


if __name__ == "__main__":
    main()
