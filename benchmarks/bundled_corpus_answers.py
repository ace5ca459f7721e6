"""How often a CLaRa answers held-out questions from the passage it retrieves in the bundled demo corpus.

The demo's pipeline (`examples/quickstart.py`: search the bundled index, read the top k, answer) on the held-out QA
pairs of Apple's SCP sample (the first `--questions-per-passage` of each bundled passage, none trained on), beside two
controls that take retrieval out: reading the gold passage alone, and reading another passage alone (the next one of
the corpus). A question counts as answered from its passage when the gold passage ranks first, the pipeline's answer
scores token F1 >= `--f1` and reading the other passage's memory instead does not: the answer is in the memory, and
the generator reads it. Those questions are listed; the demo's questions come from that list.

    python benchmarks/bundled_corpus_answers.py --model shipped --questions-per-passage 2
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from modeling_clara import ClaraForRAG, ClaraIndex
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE
from modeling_clara.metrics.clara_qa.clara_qa import score_example

from bundled_corpus_recall import DEFAULT_QA, corpus_qa  # the same questions as the recall table

BATCH = 16


def f1(prediction: str, answer: str) -> float:
    return score_example(prediction, [answer])["f1"]


@torch.no_grad()
def answer_rows(model: ClaraForRAG, qa: list[tuple[int, str, str]], k: int | None, max_new_tokens: int) -> list[dict]:
    """Per question: the retrieved passage ids and the answers (and F1) of the pipeline and of both controls."""
    index = ClaraIndex.build(model, SHIPPED_CORPUS_FILE)
    memory = index.embeddings(list(range(len(index))))
    ids = index.documents["id"]
    rows = []
    for start in tqdm(range(0, len(qa), BATCH), desc="Answering"):
        batch = qa[start : start + BATCH]
        questions = [question for _, question, _ in batch]
        retrieved = model.answer(questions, index=index, k=k, return_dict=True, max_new_tokens=max_new_tokens)
        gold = model.answer(questions, [memory[i : i + 1] for i, _, _ in batch], max_new_tokens=max_new_tokens)
        other = model.answer(questions, [memory[(i + 1) % len(memory)][None] for i, _, _ in batch],
                             max_new_tokens=max_new_tokens)
        for (i, question, answer), pipeline, from_gold, from_other in zip(batch, retrieved, gold, other):
            rows.append({
                "question": question, "answer": answer, "gold_id": ids[i],
                "retrieved": list(pipeline["doc_indices"]), "pipeline": pipeline["answer"],
                "gold_only": from_gold, "other_only": from_other,
                "f1_pipeline": f1(pipeline["answer"], answer), "f1_gold_only": f1(from_gold, answer),
                "f1_other_only": f1(from_other, answer),
            })
    return rows


def answered_from_passage(row: dict, threshold: float) -> bool:
    return (row["retrieved"][0] == row["gold_id"] and row["f1_pipeline"] >= threshold
            and row["f1_other_only"] < threshold)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--qa", type=Path, default=DEFAULT_QA, help="Apple's SCP sample (QA pairs per passage)")
    parser.add_argument("--questions-per-passage", type=int, default=2)
    parser.add_argument("-k", type=int, default=None, help="passages read per question (default: generation_top_k)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="as the demo")
    parser.add_argument("--f1", type=float, default=0.5, help="F1 at which an answer counts as correct")
    parser.add_argument("--output", type=Path, help="also write every question's row here (JSONL)")
    args = parser.parse_args(argv)
    corpus = [json.loads(line)["text"] for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    qa = corpus_qa(args.qa, corpus, args.questions_per_passage)
    if not qa:
        raise ValueError(f"{args.qa} holds no question about a passage of {SHIPPED_CORPUS_FILE}")
    rows = answer_rows(ClaraForRAG.from_pretrained(args.model), qa, args.k, args.max_new_tokens)
    if args.output:
        args.output.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

    n = len(rows)
    mean = {key: sum(row[key] for row in rows) / n for key in ("f1_pipeline", "f1_gold_only", "f1_other_only")}
    correct = {key: sum(row[key] >= args.f1 for row in rows) for key in mean}
    print(f"{args.model}: {n} held-out questions over {len(corpus)} bundled passages")
    print(f"| reads | mean F1 | F1 >= {args.f1} |")
    print("|---|---|---|")
    for key, name in (("f1_pipeline", "retrieved top k (the demo)"), ("f1_gold_only", "gold passage alone"),
                      ("f1_other_only", "another passage alone")):
        print(f"| {name} | {mean[key]:.3f} | {correct[key]} of {n} |")
    chosen = [row for row in rows if answered_from_passage(row, args.f1)]
    print(f"\nanswered from the retrieved gold passage (ranked first, F1 >= {args.f1}; another passage's memory: "
          f"F1 < {args.f1}): {len(chosen)} of {n}")
    for row in chosen:
        print(f"- {row['question']} -> {row['pipeline']!r} (gold: {row['answer']!r}; another passage: "
              f"{row['other_only']!r})")


if __name__ == "__main__":
    main()
