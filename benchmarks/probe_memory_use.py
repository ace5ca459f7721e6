"""Does the generator read its memory tokens? Answer cross-entropy with the gold passage next to another passage.

For each question the generator is scored (teacher-forced cross-entropy of the first gold answer) twice: reading the
compressed gold passage, and reading a compressed non-gold candidate of the same question
(`modeling_clara.probing`). A decoder that uses the memory tokens has a clearly lower loss with the gold passage;
one that answers from the question alone has the same loss either way. `--target passage` scores reconstructing the
gold passage instead (stage 1's paraphrase prompt with the passage itself as the target), which only memory can
inform. Models side by side in one run.

The last column is the mean cosine similarity of the two passages' flattened memory states (what retrieval
compares): near 1 (compare the untrained compressor's value) the compressor has collapsed, every passage compresses
to almost the same vectors, and no decoder can read them.

    python benchmarks/probe_memory_use.py --model embedded shipped runs/shipped/stage1 \
        --data ../shared/data/hotpotqa_dev.jsonl --n-questions 40
"""

import argparse

from modeling_clara.evaluation import load_eval_data
from modeling_clara.loading import load_model
from modeling_clara.probing import PROBE_TARGETS, ProbeCase, probe_memory_use


def probe_cases(data: str, n_questions: int, target: str) -> list[ProbeCase]:
    """One case per question that has both a gold and a non-gold candidate (the first of each)."""
    cases = []
    for example in load_eval_data(data):
        others = [d for i, d in enumerate(example.docs) if i not in example.pos_index]
        if example.pos_index and others:
            gold = example.docs[example.pos_index[0]]
            expected = example.answers[0] if target == "answer" else gold
            cases.append(ProbeCase(example.question, expected, gold, others[0]))
        if len(cases) == n_questions:
            break
    return cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["shipped"], help="'embedded' (untrained), 'shipped' or paths")
    parser.add_argument("--data", required=True, help="evaluation JSONL (question, docs, pos_index, answers)")
    parser.add_argument("--n-questions", type=int, default=40)
    parser.add_argument("--target", choices=PROBE_TARGETS, default="answer",
                        help="score the gold answer, or the reconstruction of the gold passage")
    args = parser.parse_args(argv)
    cases = probe_cases(args.data, args.n_questions, args.target)
    results = {
        name: probe_memory_use(load_model(name, seed=0), cases, args.target)
        for name in args.model
    }
    print(f"{len(cases)} questions of {args.data}; {args.target} cross-entropy (nats/token), teacher-forced")
    print("| model | CE reading gold | CE reading other | gap (other - gold) | share with gold lower | memory cosine |")
    print("|---|---|---|---|---|---|")
    for name, result in results.items():
        print(f"| {name} | {result['ce_gold']:.3f} | {result['ce_other']:.3f} | {result['gap']:+.3f} | "
              f"{result['gold_lower']:.0%} | {result['memory_cosine']:.3f} |")


if __name__ == "__main__":
    main()
