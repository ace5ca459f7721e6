"""Does the generator read its memory? Teacher-forced cross-entropy of a target reading one passage or another.

A generator that reads the memory tokens has a clearly lower loss on a passage's target (its answer, or the passage
itself) when it reads that passage's memory than when it reads another passage's; one that answers from its prior
has the same loss either way. The gap `CE(other) - CE(gold)` is the measure `benchmarks/probe_memory_use.py`, the
learnability ladder (`research/ladder.py`) and the shipped model's tests report.
"""

import statistics
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .data import ClaraPretrainCollator, make_collator
from .modeling_clara import ClaraForRAG, cosine_scores

PROBE_TARGETS = ("answer", "passage")


@dataclass
class ProbeCase:
    """One probe: `target` scored reading `gold` (the passage that informs it) and reading `other`.

    `question` is the prompt's question for `answer` targets; `passage` targets use stage 1's paraphrase prompt.
    """

    question: str
    target: str
    gold: str
    other: str


def make_probe_collator(model: ClaraForRAG, target: str):
    """The collator that scores `target` (`"answer"`: stage 2's prompt; `"passage"`: stage 1's paraphrase prompt with
    one fixed instruction, so every case is scored alike)."""
    if target not in PROBE_TARGETS:
        raise ValueError(f"target={target!r} is not one of {PROBE_TARGETS}")
    if target == "answer":
        return make_collator("instruct", model.processor, top_k=1)
    return make_collator("pretrain", model.processor, top_k=1, paraphrase_instruction=0)


def probe_row(collator, question: str, target: str, passage: str) -> dict:
    """The dataset row that `collator` (from [`make_probe_collator`]) turns into `target` read from `passage`."""
    if isinstance(collator, ClaraPretrainCollator):
        return {"task": "paraphrase", "questions": [], "answers": [target], "docs": [passage]}
    return {"question": question, "docs": [passage], "answer": target}


@torch.no_grad()
def target_loss(model: ClaraForRAG, collator, question: str, target: str, passage: str) -> float:
    """Mean cross-entropy (nats per target token) of `target` with `passage`'s memory in the prompt."""
    batch = {name: value.to(model.device) for name, value in collator([probe_row(collator, question, target, passage)]).items()}
    return model(**batch).ce_loss.item()


@torch.no_grad()
def memory_cosine(model: ClaraForRAG, passages: list[str], other_passages: list[str]) -> float:
    """Mean cosine of each passage's flattened memory with its other passage's, as retrieval scores them. Near the
    untrained compressor's value or above, the compressor writes (almost) the same memory for every passage."""
    memory, other_memory = model.compress(passages), model.compress(other_passages)
    return cosine_scores(memory.flatten(1), other_memory.unsqueeze(1)).mean().item()


def probe_memory_use(model: ClaraForRAG, cases: list[ProbeCase], target: str) -> dict[str, float]:
    """Score every case reading its gold and its other passage.

    Returns:
        `dict` with `ce_gold`, `ce_other` (means, nats/token), `gap` (mean of other - gold), `gold_lower` (share of
        cases with the lower loss on gold) and `memory_cosine`.
    """
    if not cases:
        raise ValueError("probe_memory_use needs at least one case")
    collator = make_probe_collator(model, target)
    gold, other = [], []
    for case in tqdm(cases, desc="Probing memory use", leave=False):
        gold.append(target_loss(model, collator, case.question, case.target, case.gold))
        other.append(target_loss(model, collator, case.question, case.target, case.other))
    return {
        "ce_gold": statistics.mean(gold),
        "ce_other": statistics.mean(other),
        "gap": statistics.mean(o - g for g, o in zip(gold, other)),
        "gold_lower": sum(g < o for g, o in zip(gold, other)) / len(gold),
        "memory_cosine": memory_cosine(model, [c.gold for c in cases], [c.other for c in cases]),
    }


__all__ = [
    "PROBE_TARGETS", "ProbeCase", "make_probe_collator", "memory_cosine", "probe_memory_use", "probe_row", "target_loss",
]
