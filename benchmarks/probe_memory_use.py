"""Does the generator read its memory tokens? Answer cross-entropy with the gold passage next to another passage.

For each question the generator is scored (teacher-forced cross-entropy of the first gold answer) twice: reading the
compressed gold passage, and reading a compressed non-gold candidate of the same question. A decoder that uses
the memory tokens has a clearly lower loss with the gold passage; one that answers from the question alone has
the same loss either way. `--target passage` scores reconstructing the gold passage instead (stage 1's paraphrase
prompt with the passage itself as the target), which only memory can inform. Models side by side in one run.

The last column is the mean cosine similarity of the two passages' flattened memory states (what retrieval
compares): near 1 (compare the untrained compressor's value) the compressor has collapsed, every passage compresses
to almost the same vectors, and no decoder can read them.

    python benchmarks/probe_memory_use.py --model embedded shipped runs/shipped/stage1 \
        --data ../shared/data/hotpotqa_dev.jsonl --n-questions 40
"""

import argparse
import statistics

import torch
from tqdm.auto import tqdm

from modeling_clara.configuration_clara import MEMORY_PROJECTIONS
from modeling_clara.data import ClaraPretrainCollator, make_collator
from modeling_clara.evaluation import load_eval_data, load_model_for_eval
from modeling_clara.modeling_clara import cosine_scores


def probe_pairs(data: str, n_questions: int) -> list[tuple[str, str, str, str]]:
    """(question, answer, gold passage, other passage) for questions that have both kinds of candidate."""
    pairs = []
    for example in load_eval_data(data):
        others = [d for i, d in enumerate(example.docs) if i not in example.pos_index]
        if example.pos_index and others:
            pairs.append((example.question, example.answers[0], example.docs[example.pos_index[0]], others[0]))
        if len(pairs) == n_questions:
            break
    return pairs


@torch.no_grad()
def target_loss(model, collator, question: str, target: str, passage: str) -> float:
    """Cross-entropy of `target` reading `passage`: an answer to `question` (instruct collator) or, with the
    pretrain collator, a reconstruction."""
    if isinstance(collator, ClaraPretrainCollator):
        row = {"task": "paraphrase", "questions": [], "answers": [target], "docs": [passage]}
    else:
        row = {"question": question, "docs": [passage], "answer": target}
    return model(**collator([row])).ce_loss.item()


@torch.no_grad()
def memory_cosine(model, passages: list[str], other_passages: list[str]) -> float:
    """Mean cosine of each passage's memory states with its other passage's, scored as retrieval scores them."""
    memory, other_memory = model.compress(passages), model.compress(other_passages)
    return cosine_scores(memory.flatten(1), other_memory.unsqueeze(1)).mean().item()


def probe(model, pairs, target: str) -> dict:
    if target == "answer":
        collator = make_collator("instruct", model.processor, top_k=1)
    else:
        collator = make_collator("pretrain", model.processor, top_k=1, paraphrase_instruction=0)
    gold, other = [], []
    for question, answer, gold_passage, other_passage in tqdm(pairs, desc="Probing", leave=False):
        expected = answer if target == "answer" else gold_passage
        gold.append(target_loss(model, collator, question, expected, gold_passage))
        other.append(target_loss(model, collator, question, expected, other_passage))
    return {
        "ce_gold": statistics.mean(gold),
        "ce_other": statistics.mean(other),
        "gap": statistics.mean(o - g for g, o in zip(gold, other)),
        "gold_lower": sum(g < o for g, o in zip(gold, other)) / len(gold),
        "memory_cosine": memory_cosine(model, [g for _, _, g, _ in pairs], [o for _, _, _, o in pairs]),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["shipped"], help="'embedded' (untrained), 'shipped' or paths")
    parser.add_argument("--data", required=True, help="evaluation JSONL (question, docs, pos_index, answers)")
    parser.add_argument("--n-questions", type=int, default=40)
    parser.add_argument("--memory-projection", choices=[p for p in MEMORY_PROJECTIONS if p is not None], default=None,
                        help="for 'embedded': build the untrained model with this memory projection")
    parser.add_argument("--target", choices=("answer", "passage"), default="answer",
                        help="score the gold answer, or the reconstruction of the gold passage")
    args = parser.parse_args(argv)
    pairs = probe_pairs(args.data, args.n_questions)
    results = {
        name: probe(load_model_for_eval(name, memory_projection=args.memory_projection).eval(), pairs, args.target)
        for name in args.model
    }
    print(f"{len(pairs)} questions of {args.data}; {args.target} cross-entropy (nats/token), teacher-forced")
    print("| model | CE reading gold | CE reading other | gap (other - gold) | share with gold lower | memory cosine |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['ce_gold']:.3f} | {result['ce_other']:.3f} | {result['gap']:+.3f} | "
              f"{result['gold_lower']:.0%} | {result['memory_cosine']:.3f} |")

if __name__ == "__main__":
    main()
