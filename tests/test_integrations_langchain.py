"""LangChain's own standard suites (`langchain-tests`) on `ClaraRetriever` and `ChatClara` over a tiny random CLaRa's
index, plus what the suites do not check: the documents read, given documents, stop strings, the streamed text
equal to the invoked one, and refusals."""

import pytest
from conftest import make_tiny_clara

pytest.importorskip("langchain_core", reason='the langchain extra: pip install "clara-hf[langchain]"')
pytest.importorskip("langchain_tests", reason='the test extra: pip install "clara-hf[test]"')

from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from modeling_clara import ClaraIndex  # noqa: E402
from modeling_clara.integrations.langchain import ChatClara, ClaraRetriever  # noqa: E402

# The suites' async tests run on anyio's pytest plugin (anyio comes with httpx); it leaves sync tests alone.
pytestmark = pytest.mark.anyio

CORPUS = [
    "The Seine is a river that flows through Paris before reaching the English Channel at Le Havre.",
    "Mount Fuji, an active volcano on Honshu, is the highest mountain in Japan at 3,776 metres.",
    "The Danube flows through ten countries, more than any other river in the world.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences.",
    "Ada Lovelace wrote what is considered the first algorithm intended for a machine.",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # LangChain's async paths are asyncio's


@pytest.fixture(scope="module")
def tiny_index(tiny_llama_dir) -> ClaraIndex:
    return ClaraIndex.build(make_tiny_clara(tiny_llama_dir), CORPUS)


class _OnTinyIndex:
    """The suites read their constructor arguments from properties: the module's index is set on the class first."""

    index: ClaraIndex | None = None

    @pytest.fixture(autouse=True)
    def _set_index(self, tiny_index):
        type(self).index = tiny_index


# ----------------------------------------------------------------------------------------------------------------
# The standard suites


class TestClaraRetrieverStandard(_OnTinyIndex, RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type[ClaraRetriever]:
        return ClaraRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"index": self.index}

    @property
    def retriever_query_example(self) -> str:
        return "Which river flows through Paris?"


class _ChatClaraSuite(_OnTinyIndex):
    """What CLaRa does not have is declared off the suites' way: the capability properties (tool calling,
    structured output, JSON mode, image / audio / PDF / video input default to off and stay off; `bind_tools` and
    `with_structured_output` are not overridden) and a per-call model override (one server, one model)."""

    @property
    def chat_model_class(self) -> type[ChatClara]:
        return ChatClara

    @property
    def chat_model_params(self) -> dict:
        return {"index": self.index}

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatClaraUnit(_ChatClaraSuite, ChatModelUnitTests):
    pass


class TestChatClaraIntegration(_ChatClaraSuite, ChatModelIntegrationTests):
    pass


# ----------------------------------------------------------------------------------------------------------------
# What CLaRa adds


def test_retriever_documents_carry_id_and_score_of_the_index(tiny_index):
    documents = ClaraRetriever(index=tiny_index, k=3).invoke("Which river flows through Paris?")
    found = tiny_index.search("Which river flows through Paris?", k=3)
    assert [d.metadata["id"] for d in documents] == found.ids
    assert [d.metadata["score"] for d in documents] == pytest.approx(found.scores)
    assert [d.page_content for d in documents] == found.texts


def test_chat_answers_as_the_model_and_names_the_documents_it_read(tiny_index):
    question = "Which river flows through Paris?"
    message = ChatClara(index=tiny_index, max_tokens=8).invoke([SystemMessage("be brief"), HumanMessage(question)])
    expected = tiny_index.model.answer(question, index=tiny_index, return_dict=True, max_new_tokens=8)
    assert message.content == expected["answer"]
    read = message.response_metadata["documents"]
    assert [d["id"] for d in read] == expected["doc_indices"]
    assert [d["text"] for d in read] == tiny_index.texts(expected["doc_indices"])
    usage = message.usage_metadata
    assert usage["output_tokens"] <= 8
    n_mem = tiny_index.model.config.n_mem_tokens
    assert usage["input_tokens"] > len(read) * n_mem  # the prompt counts the memory slots


def test_streamed_text_joins_to_the_invoked_answer(tiny_index):
    chat = ChatClara(index=tiny_index, max_tokens=12)
    chunks = list(chat.stream("Who won two Nobel Prizes?"))
    assert len(chunks) >= 2 and chunks[-1].chunk_position == "last"
    assert "".join(c.content for c in chunks) == chat.invoke("Who won two Nobel Prizes?").content
    assert chunks[-1].response_metadata["documents"]


def test_chat_reads_given_documents_instead_of_the_index(tiny_index):
    documents = ["Lake Baikal is the deepest lake on Earth.", "Lake Titicaca lies on the border of Peru and Bolivia."]
    message = ChatClara(index=tiny_index, max_tokens=8, k=2).invoke("Which lake is deepest?", documents=documents)
    expected = tiny_index.model.answer("Which lake is deepest?", tiny_index.model.compress(documents), k=2,
                                       max_new_tokens=8)
    assert message.content == expected
    assert sorted(d["text"] for d in message.response_metadata["documents"]) == sorted(documents)


def test_stop_string_cuts_the_answer(tiny_index):
    chat = ChatClara(index=tiny_index, max_tokens=12)
    full = chat.invoke("Where is Mount Fuji?").content
    assert len(full) > 2
    stop = full[len(full) // 2 :][:2]
    cut = chat.invoke("Where is Mount Fuji?", stop=[stop])
    assert cut.content == full[: full.find(stop)].rstrip()
    assert cut.response_metadata["finish_reason"] == "stop"


def test_images_and_missing_questions_are_refused(tiny_index):
    chat = ChatClara(index=tiny_index)
    image = {"type": "image", "url": "https://example.com/cat.png"}
    with pytest.raises(ValueError, match="image"):
        chat.invoke([HumanMessage(content=[{"type": "text", "text": "what is this?"}, image])])
    with pytest.raises(ValueError, match="human message"):
        chat.invoke([SystemMessage("only a system turn")])
    with pytest.raises(ValueError, match="either `index`"):
        ChatClara()
