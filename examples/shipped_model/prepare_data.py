"""Build the training data of the shipped CLaRa from Apple's SCP sample (../shared/data/clara_pretrain_sample.jsonl).

The sample has 1000 documents, each with ~8 generated QA pairs. Documents are split once (seeded) into a training
pool and a held-out pool; every file below uses only its own pool, and the evaluation files of ../shared/data
(hotpotqa/musique/2wiki dev) are never read.

Writes into --out-dir:
  stage1_pretrain.jsonl / stage1_heldout.jsonl   Apple's stage-1 rows (data_type qa), train / held-out documents;
                                                 with --reconstruction each training document is also a
                                                 paraphrase row whose target is the document itself
  stage1_short.jsonl                             each training document's first 40 words, as doc and target
                                                 (reconstruction at a short doc_max_length)
  stage2_instruct.jsonl                          {question, docs (k: gold + BM25 distractors), answer}
  stage3_e2e.jsonl                               {question, docs (n candidates), gold_answer, pos_index}
  heldout_qa.jsonl                               e2e-format rows over held-out documents (for checks)
  corpus.jsonl                                   {id, text} of the held-out documents (the demo corpus)

    python examples/shipped_model/prepare_data.py --out-dir runs/shipped/data
"""

import argparse
import json
import random
import re
from pathlib import Path

from rank_bm25 import BM25Okapi

DEFAULT_SOURCE = Path(__file__).resolve().parents[3] / "shared" / "data" / "clara_pretrain_sample.jsonl"


def tokenize(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def split_documents(rows: list[dict], n_heldout: int, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    heldout = set(order[:n_heldout])
    return [r for i, r in enumerate(rows) if i not in heldout], [r for i, r in enumerate(rows) if i in heldout]


def distractors(bm25: BM25Okapi, question: str, gold: int, n: int) -> list[int]:
    """The n documents BM25 ranks highest for the question, other than the gold one: hard negatives."""
    scores = bm25.get_scores(tokenize(question))
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])
    return [i for i in ranked if i != gold][:n]


def candidate_rows(rows: list[dict], n_docs: int, seed: int, answer_key: str) -> list[dict]:
    """One row per QA pair: the gold document mixed (random position) with n_docs - 1 BM25 distractors."""
    documents = [r["docs"][0] for r in rows]
    bm25 = BM25Okapi([tokenize(d) for d in documents])
    rng = random.Random(seed)
    out = []
    for gold, row in enumerate(rows):
        for question, answer in zip(row["question"], row["answers"]):
            picked = [gold] + distractors(bm25, question, gold, n_docs - 1)
            rng.shuffle(picked)
            out.append({
                "question": question,
                "docs": [documents[i] for i in picked],
                answer_key: answer,
                "pos_index": [picked.index(gold)],
            })
    rng.shuffle(out)
    return out


def with_document_restatement_rows(rows: list[dict], seed: int) -> list[dict]:
    """Each document's QA row and a row asking to restate the whole document (Apple's paraphrase task with the
    document itself as target: only the memory tokens can inform it), shuffled together."""
    mixed = []
    for row in rows:
        mixed += [row, {"data_type": "paraphrase", "answers": row["docs"], "docs": row["docs"]}]
    random.Random(seed).shuffle(mixed)
    return mixed


def short_reconstruction_rows(rows: list[dict], n_words: int) -> list[dict]:
    """Each document cut to its first `n_words` words, as a paraphrase row whose target is that same text: a
    reconstruction the compressor sees whole at a short `doc_max_length` (the first rung of a length curriculum)."""
    out = []
    for row in rows:
        text = " ".join(row["docs"][0].split()[:n_words])
        out.append({"data_type": "paraphrase", "answers": [text], "docs": [text]})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--n-heldout", type=int, default=100)
    parser.add_argument("--instruct-docs", type=int, default=3, help="documents per stage-2 question")
    parser.add_argument("--e2e-candidates", type=int, default=8, help="candidates per stage-3 question")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reconstruction", action="store_true",
                        help="stage 1: add a restate-the-document row for every training document")
    parser.add_argument("--short-reconstruction-words", type=int, default=40,
                        help="words per document in stage1_short.jsonl (short reconstruction rows)")
    args = parser.parse_args()

    rows = [json.loads(line) for line in open(args.source, encoding="utf-8")]
    train, heldout = split_documents(rows, args.n_heldout, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "stage1_pretrain.jsonl", with_document_restatement_rows(train, args.seed) if args.reconstruction else train)
    write_jsonl(args.out_dir / "stage1_heldout.jsonl", heldout)
    write_jsonl(args.out_dir / "stage1_short.jsonl", short_reconstruction_rows(train, args.short_reconstruction_words))
    write_jsonl(args.out_dir / "stage2_instruct.jsonl",
                [{k: r[k] for k in ("question", "docs", "answer")} for r in candidate_rows(train, args.instruct_docs, args.seed, "answer")])
    write_jsonl(args.out_dir / "stage3_e2e.jsonl", candidate_rows(train, args.e2e_candidates, args.seed + 1, "gold_answer"))
    write_jsonl(args.out_dir / "heldout_qa.jsonl", candidate_rows(heldout, args.e2e_candidates, args.seed + 2, "gold_answer"))
    write_jsonl(args.out_dir / "corpus.jsonl", [{"id": f"doc-{i}", "text": r["docs"][0]} for i, r in enumerate(heldout)])


if __name__ == "__main__":
    main()
