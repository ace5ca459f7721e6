"""`clara serve`'s OpenAI-compatible endpoints, checked with the official `openai` client against a real server
process on 127.0.0.1 (tiny random CLaRa): models, chat completions over the index and over given documents equal to
/v1/answer, usage counting the generator's prompt with its memory slots, streaming (documents first, text as it is
generated, joined equal to the whole answer), concurrency, sampling options, refusals in OpenAI's error shape, a
client that leaves; and `ChatClara` / `ClaraRetriever` over the server, LangChain's standard suites included."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import make_tiny_clara

openai = pytest.importorskip("openai", reason='the test extra: pip install "clara-hf[test]"')
pytest.importorskip("fastapi", reason='the serve extra: pip install "clara-hf[serve]"')
requests = pytest.importorskip("requests")

from test_serving import CORPUS, QUESTIONS, metric, running_server  # noqa: E402

from modeling_clara import ClaraForRAG, ClaraIndex  # noqa: E402

pytest.importorskip("langchain_tests", reason='the test extra: pip install "clara-hf[test]"')
from langchain_tests.integration_tests import ChatModelIntegrationTests, RetrieversIntegrationTests  # noqa: E402

from modeling_clara.integrations.backends import VisibleText  # noqa: E402
from modeling_clara.integrations.langchain import ChatClara, ClaraRetriever  # noqa: E402

MAX_NEW_TOKENS = 48
SERVED_MODEL_NAME = "clara-tiny"
# LangChain's suites' async tests run on anyio's pytest plugin (anyio comes with httpx); it leaves sync tests alone.
pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def saved_model_dir(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_clara_openai")
    make_tiny_clara(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clara_model(saved_model_dir) -> ClaraForRAG:  # `model` is the LangChain suites' fixture
    return ClaraForRAG.from_pretrained(str(saved_model_dir))


@pytest.fixture(scope="module")
def server(saved_model_dir, clara_model, tmp_path_factory):
    index_dir = tmp_path_factory.mktemp("tiny_index_openai")
    ClaraIndex.build(clara_model, CORPUS, output_dir=index_dir)
    with running_server("--model", str(saved_model_dir), "--served-model-name", SERVED_MODEL_NAME, "--index", str(index_dir), "--max-batch-size", "8",
                        "--max-wait-ms", "200", "--max-new-tokens", str(MAX_NEW_TOKENS)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def served_model(client) -> str:
    return client.models.list().data[0].id


def ask(question: str, system: str | None = None) -> list[dict]:
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": question}]


def test_models_lists_the_served_model(client, server, saved_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [requests.get(f"{server}/health", timeout=10).json()["model"]]
    assert models[0].id == SERVED_MODEL_NAME  # --served-model-name, not the --model path


def test_chat_completion_over_the_index_equals_v1_answer(client, served_model, server, clara_model):
    model = clara_model
    question = QUESTIONS[0]
    completion = client.chat.completions.create(model=served_model, messages=ask(question, "be brief"),
                                                temperature=0, max_tokens=16)
    expected = requests.post(f"{server}/v1/answer", json={"question": question, "max_new_tokens": 16}, timeout=60).json()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.documents == expected["documents"]  # the extension field: what was read
    assert completion.choices[0].finish_reason in ("stop", "length")
    prompt = model.processor.prompt_ids([model.processor.build_prompt(len(expected["documents"]), question=question)[0]])
    assert completion.usage.prompt_tokens == len(prompt[0])  # the generator's prompt, memory slots included
    assert completion.usage.prompt_tokens > len(expected["documents"]) * model.config.n_mem_tokens
    assert 0 < completion.usage.completion_tokens <= 16


def test_chat_completion_reads_the_given_documents(client, served_model, server):
    documents = ["Lake Baikal in Siberia is the deepest lake on Earth.",
                 "Lake Titicaca lies on the border of Peru and Bolivia.", "The Nile flows north into the Mediterranean."]
    question = "Which lake is deepest?"
    completion = client.chat.completions.create(model=served_model, messages=ask(question), max_tokens=16,
                                                extra_body={"documents": documents, "k": 2})
    expected = requests.post(f"{server}/v1/answer", json={"question": question, "documents": documents, "k": 2,
                                                          "max_new_tokens": 16}, timeout=60).json()
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.documents == expected["documents"] and len(completion.documents) == 2
    assert {d["text"] for d in completion.documents} <= set(documents)


def test_stream_sends_documents_first_then_text_as_generated_joining_to_the_answer(client, served_model, server):
    question = QUESTIONS[1]
    whole = client.chat.completions.create(model=served_model, messages=ask(question), temperature=0,
                                           max_tokens=MAX_NEW_TOKENS)
    streams_done = metric(server, "clara_batch_duration_seconds_count", operation="stream")
    stream = client.chat.completions.create(model=served_model, messages=ask(question), temperature=0,
                                            max_tokens=MAX_NEW_TOKENS, stream=True,
                                            stream_options={"include_usage": True})
    chunks, done_at_first_text = [], None
    for chunk in stream:
        chunks.append(chunk)
        if done_at_first_text is None and chunk.choices and chunk.choices[0].delta.content:
            done_at_first_text = metric(server, "clara_batch_duration_seconds_count", operation="stream")
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].documents == whole.documents  # the documents come first
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == whole.choices[0].message.content
    assert len(texts) > 1
    assert done_at_first_text == streams_done  # the first text arrived while its generation was still running
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_raw_stream_is_server_sent_events_ending_with_done(server, served_model):
    body = {"model": served_model, "messages": ask(QUESTIONS[2]), "max_tokens": 8, "stream": True}
    with requests.post(f"{server}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert "usage" not in json.loads(lines[-2].removeprefix("data: "))  # include_usage was not asked


def test_concurrent_clients_get_the_answers_they_get_one_at_a_time(client, served_model):
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(8)]

    def answer(question):
        completion = client.chat.completions.create(model=served_model, messages=ask(question), max_tokens=16)
        return completion.choices[0].message.content, completion.documents

    alone = [answer(q) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(answer, questions))
    assert together == alone


def test_a_seed_repeats_a_sampled_answer_and_stop_cuts_it(client, served_model):
    def sample(**options):
        return client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[3]), max_tokens=24,
                                              temperature=1.0, top_p=0.9, **options).choices[0]

    first, again = sample(seed=7), sample(seed=7)
    assert first.message.content == again.message.content
    # Stop strings run on the stream queue: the reference is that queue's greedy text, streamed without them.
    chunks = client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[3]), max_tokens=24, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    stop = text[len(text) // 2 :][:3]
    cut = client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[3]), max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == text[: text.find(stop)].rstrip(), (text, stop)
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("pieces", [["x with", "nal", " N", " N N"], ["x withnal ", "N", " N"], ["x withnal N N"]])
def test_text_cut_at_a_stop_string_is_the_text_its_pieces_showed(pieces):
    visible = VisibleText(["N N"])
    shown = "".join(visible.add(piece) for piece in pieces) + visible.add("", final=True)
    assert visible.text == shown == "x withnal"


@pytest.mark.parametrize(("options", "param"), [
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"logprobs": True}, "logprobs"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"temperature": 3}, "temperature"),
    ({"max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
    ({"extra_body": {"documnets": ["a misspelt field"]}}, "documnets"),
    ({"extra_body": {"documents": []}}, "documents"),
])
def test_a_bad_request_is_a_bad_request_error_naming_the_field(client, served_model, options, param):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[0]), **options)
    assert raised.value.status_code == 400
    assert raised.value.body["param"] == param  # OpenAI's shape: {"error": {"message", "type", "param", "code"}}
    assert set(raised.value.body) == {"message", "type", "param", "code"}


def test_messages_clara_cannot_read_are_refused(client, served_model):
    image = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    with pytest.raises(openai.BadRequestError, match="text only"):
        client.chat.completions.create(model=served_model, messages=[{"role": "user", "content": image}])
    with pytest.raises(openai.BadRequestError, match="no user message"):
        client.chat.completions.create(model=served_model, messages=[{"role": "system", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.chat.completions.create(model="gpt-4o", messages=ask(QUESTIONS[0]))


def test_an_oversize_request_is_the_clients_413(client, served_model):
    with pytest.raises(openai.APIStatusError) as raised:
        client.chat.completions.create(model=served_model, messages=ask("x" * (1 << 20)))
    assert raised.value.status_code == 413


def test_a_client_that_leaves_frees_its_generation(server, served_model, client):
    left = metric(server, "clara_requests_rejected_total", operation="stream", reason="disconnected")
    body = {"model": served_model, "messages": ask(QUESTIONS[4]), "max_tokens": MAX_NEW_TOKENS, "stream": True}
    with requests.post(f"{server}/v1/chat/completions", json=body, stream=True, timeout=60) as response:
        next(line for line in response.iter_lines() if line)  # the first event, then the connection closes
    deadline = threading.Event()
    for _ in range(100):
        if metric(server, "clara_requests_rejected_total", operation="stream", reason="disconnected") > left:
            break
        deadline.wait(0.1)
    assert metric(server, "clara_requests_rejected_total", operation="stream", reason="disconnected") == left + 1
    # The model thread is free again: the next streamed request is answered.
    stream = client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[5]), max_tokens=4, stream=True)
    assert [c for c in stream][-1].choices[0].finish_reason in ("stop", "length")


def test_langchain_over_the_server_answers_as_the_endpoint(server, served_model, client):

    documents = ClaraRetriever(base_url=server, k=3).invoke(QUESTIONS[0])
    hits = requests.post(f"{server}/v1/search", json={"question": QUESTIONS[0], "k": 3}, timeout=60).json()["documents"]
    assert [(d.metadata["id"], d.page_content) for d in documents] == [(h["id"], h["text"]) for h in hits]
    chat = ChatClara(base_url=server, model=served_model, max_tokens=16)
    message = chat.invoke(QUESTIONS[0])
    whole = client.chat.completions.create(model=served_model, messages=ask(QUESTIONS[0]), max_tokens=16)
    assert message.content == whole.choices[0].message.content
    assert message.response_metadata["documents"] == whole.documents
    chunks = list(chat.stream(QUESTIONS[0]))
    assert "".join(c.content for c in chunks) == message.content
    assert chunks[-1].usage_metadata["input_tokens"] == whole.usage.prompt_tokens


# ----------------------------------------------------------------------------------------------------------------
# LangChain's standard suites over the server (over an index: tests/test_integrations_langchain.py)


class _OnServer:
    """The suites read their constructor arguments from properties: the module's server is set on the class first."""

    url: str | None = None
    model_name: str | None = None

    @pytest.fixture(autouse=True)
    def _set_server(self, server, served_model):
        type(self).url, type(self).model_name = server, served_model


class TestClaraRetrieverOverServer(_OnServer, RetrieversIntegrationTests):
    @property
    def retriever_constructor(self) -> type:
        return ClaraRetriever

    @property
    def retriever_constructor_params(self) -> dict:
        return {"base_url": self.url}

    @property
    def retriever_query_example(self) -> str:
        return QUESTIONS[0]


class TestChatClaraOverServer(_OnServer, ChatModelIntegrationTests):
    """Declared off as over an index: the capability properties stay off, and a per-call model override."""

    @property
    def chat_model_class(self) -> type:
        return ChatClara

    @property
    def chat_model_params(self) -> dict:
        return {"base_url": self.url, "model": self.model_name, "max_tokens": 16}

    @property
    def supports_model_override(self) -> bool:
        return False
