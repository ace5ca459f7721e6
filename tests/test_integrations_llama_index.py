"""LlamaIndex: `ClaraRetriever` returns the index's hits as `NodeWithScore`s and `ClaraQueryEngine` answers as the
model does, with the documents it read as source nodes; on a tiny random CLaRa, and end to end on the shipped model
over its bundled corpus."""

import json

import pytest
from conftest import DATA_DIR, make_tiny_clara

pytest.importorskip("llama_index.core", reason='the llama-index extra: pip install "clara-hf[llama-index]"')

from llama_index.core.schema import NodeWithScore  # noqa: E402

from modeling_clara import ClaraForRAG, ClaraIndex  # noqa: E402
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE  # noqa: E402
from modeling_clara.index import open_or_build_index  # noqa: E402
from modeling_clara.integrations.llama_index import ClaraQueryEngine, ClaraRetriever  # noqa: E402

CORPUS = [
    "The Seine is a river that flows through Paris before reaching the English Channel at Le Havre.",
    "Mount Fuji, an active volcano on Honshu, is the highest mountain in Japan at 3,776 metres.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences.",
    "Ada Lovelace wrote what is considered the first algorithm intended for a machine.",
]


@pytest.fixture(scope="module")
def tiny_index(tiny_llama_dir) -> ClaraIndex:
    return ClaraIndex.build(make_tiny_clara(tiny_llama_dir), CORPUS)


def test_retriever_returns_the_index_hits_as_nodes_with_scores(tiny_index):
    nodes = ClaraRetriever(index=tiny_index, k=3).retrieve("Which river flows through Paris?")
    found = tiny_index.search("Which river flows through Paris?", k=3)
    assert all(isinstance(n, NodeWithScore) for n in nodes)
    assert [n.node.node_id for n in nodes] == found.ids
    assert [n.score for n in nodes] == pytest.approx(found.scores)
    assert [n.node.get_content() for n in nodes] == found.texts


def test_query_engine_answers_as_the_model_with_the_documents_read(tiny_index):
    engine = ClaraQueryEngine(index=tiny_index, max_new_tokens=8)
    response = engine.query("Who won two Nobel Prizes?")
    expected = tiny_index.model.answer("Who won two Nobel Prizes?", index=tiny_index, return_dict=True, max_new_tokens=8)
    assert response.response == expected["answer"]
    assert [n.node.node_id for n in response.source_nodes] == expected["doc_indices"]
    assert [n.score for n in response.source_nodes] == pytest.approx(expected["scores"])
    assert 0 < response.metadata["usage"]["completion_tokens"] <= 8


def test_either_an_index_or_a_server():
    with pytest.raises(ValueError, match="either `index`"):
        ClaraQueryEngine()


@pytest.mark.integration
@pytest.mark.slow
def test_query_engine_on_the_shipped_model_reads_the_gold_passage(demo_run):
    """End to end: the shipped model, its bundled corpus indexed (the index the demo built), a question about a
    bundled passage (from Apple's SCP sample, never trained on): the passage is among the source nodes and the answer
    is the model's."""
    model = ClaraForRAG.from_pretrained("shipped")
    index = open_or_build_index(model, "shipped", index_dir=demo_run.index_dir)
    corpus = [json.loads(line) for line in open(SHIPPED_CORPUS_FILE, encoding="utf-8")]
    questions = {}
    for line in open(DATA_DIR / "clara_pretrain_sample.jsonl", encoding="utf-8"):
        row = json.loads(line)
        questions[row["docs"][0]] = row["question"][0]
    gold, question = next((doc["id"], questions[doc["text"]]) for doc in corpus if doc["text"] in questions)
    response = ClaraQueryEngine(index=index, max_new_tokens=24).query(question)
    assert gold in [n.node.node_id for n in response.source_nodes]
    assert response.response == model.answer(question, index=index, max_new_tokens=24)
    assert response.response.strip()
