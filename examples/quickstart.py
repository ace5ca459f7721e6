"""Main job: compress passages with CLaRa on the embedded backbone, retrieve for questions, answer from memory tokens.

    python examples/quickstart.py [--model embedded|<saved CLaRa folder>]

`embedded` builds a fresh CLaRa on SmolLM2-135M-Instruct (untrained adapters: retrieval and answers are not
meaningful until the model is trained with `clara train`); a saved folder loads a trained one.
"""

import argparse

import torch

from modeling_clara import ClaraForRAG

PASSAGES = [
    "The Seine is a 777-kilometre-long river in northern France. It flows through Paris into the English Channel.",
    "Mount Kilimanjaro in Tanzania is the highest mountain in Africa, rising 5,895 metres above sea level.",
    "The Great Barrier Reef, off the coast of Queensland, Australia, is the world's largest coral reef system.",
    "Marie Curie was the first woman to win a Nobel Prize and the only person to win Nobel Prizes in two sciences.",
    "The Amazon rainforest covers much of the Amazon basin of South America, mostly in Brazil.",
]
QUESTIONS = ["Which river flows through Paris?", "What is the highest mountain in Africa?"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--k", type=int, default=2, help="passages read per question")
    args = parser.parse_args()

    torch.manual_seed(0)
    if args.model == "embedded":
        model = ClaraForRAG.from_backbone("embedded", compr_rate=16, doc_max_length=256, training_stage="stage2")
    else:
        model = ClaraForRAG.from_pretrained(args.model)

    doc_embeds = model.compress(PASSAGES)
    print(f"compressed {len(PASSAGES)} passages into {tuple(doc_embeds.shape)} memory-token embeddings")
    results = model.answer(QUESTIONS, [doc_embeds] * len(QUESTIONS), k=args.k, return_dict=True, max_new_tokens=32)
    for question, result in zip(QUESTIONS, results):
        print(f"\nQ: {question}")
        for rank, (index, score) in enumerate(zip(result["doc_indices"], result["scores"] or [None] * args.k)):
            shown = f"{score:.3f}" if score is not None else "-"
            print(f"  [{rank + 1}] score {shown}: {PASSAGES[index]}")
        print(f"A: {result['answer']}")


if __name__ == "__main__":
    main()
