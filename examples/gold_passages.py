"""Write the gold passages of the first questions of an evaluation file as a corpus (`id`, `text` per line).

A quick corpus for trying `clara synthesize` or `clara index build` on real Wikipedia passages:

    python examples/gold_passages.py --data ../shared/data/hotpotqa_dev.jsonl --questions 4 --output passages.jsonl
"""

import argparse
import json

from modeling_clara.evaluation import load_eval_data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="an evaluation JSONL (question, docs, pos_index, ...)")
    parser.add_argument("--questions", type=int, default=4, help="how many questions' gold passages")
    parser.add_argument("--output", required=True, help="the corpus JSONL to write")
    args = parser.parse_args(argv)
    with open(args.output, "w", encoding="utf-8") as out:
        for example in load_eval_data(args.data, limit=args.questions):
            for position in example.pos_index:
                out.write(json.dumps({"id": f"{example.id}-{position}", "text": example.docs[position]}) + "\n")


if __name__ == "__main__":
    main()
