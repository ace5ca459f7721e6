"""`clara serve`: dynamic batching, the serving engine, and a real server (uvicorn subprocess on a free 127.0.0.1
port) answering real HTTP requests: endpoints, batching equal to single requests, bad requests, full queues and
timeouts. Tiny random CLaRa models, plus one integration test on the shipped model and bundled corpus."""

import asyncio
import base64
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_clara

pytest.importorskip("fastapi", reason='the serve extra: pip install "clara-hf[serve]"')
requests = pytest.importorskip("requests")

from safetensors.torch import load as load_safetensors  # noqa: E402

from modeling_clara import ClaraForRAG, ClaraIndex  # noqa: E402
from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE  # noqa: E402
from modeling_clara.serving.batching import DynamicBatcher, QueueFullError  # noqa: E402
from modeling_clara.serving.engine import AnswerRequest, ClaraServingEngine, RequestError  # noqa: E402

REPO_DIR = Path(__file__).resolve().parents[1]
CORPUS = [
    "The Seine is a river that flows through Paris before reaching the English Channel at Le Havre.",
    "Mount Fuji, an active volcano on Honshu, is the highest mountain in Japan at 3,776 metres.",
    "The Danube flows through ten countries, more than any other river in the world.",
    "Marie Curie was the first person to win Nobel Prizes in two different sciences.",
    "The Great Barrier Reef off Queensland is the largest coral reef system on Earth.",
    "Ada Lovelace wrote what is considered the first algorithm intended for a machine.",
    "The Amazon rainforest covers much of the Amazon basin in South America.",
    "Johannes Gutenberg introduced movable-type printing to Europe around 1440.",
]
QUESTIONS = ["Which river flows through Paris?", "How high is Mount Fuji?", "Who wrote the first algorithm?",
             "Where is the largest coral reef?", "When did printing reach Europe?", "What covers the Amazon basin?"]


# ----------------------------------------------------------------------------------------------------------------
# In process: the claim batching rests on, the engine, the batcher


@pytest.fixture(scope="module")
def saved_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_clara_serve")
    make_tiny_clara(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(saved_model_dir) -> ClaraForRAG:
    return ClaraForRAG.from_pretrained(str(saved_model_dir))


@pytest.fixture(scope="module")
def index_dir(model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_index")
    ClaraIndex.build(model, CORPUS, output_dir=path)
    return path


@pytest.fixture(scope="module")
def engine(model, index_dir) -> ClaraServingEngine:
    return ClaraServingEngine(model, ClaraIndex.load(index_dir, model=model))


def test_engine_is_a_plain_class(engine):
    # A decorator left on the class once turned it into a function that only builds instances.
    assert isinstance(ClaraServingEngine, type) and isinstance(engine, ClaraServingEngine)


def mixed_requests() -> list[AnswerRequest]:
    """Given documents fewer, equal and more than k (retrieval), and index requests of two k's."""
    return [
        AnswerRequest(QUESTIONS[0], CORPUS[:1], k=2, max_new_tokens=6),
        AnswerRequest(QUESTIONS[1], CORPUS[1:3], k=2, max_new_tokens=6),
        AnswerRequest(QUESTIONS[2], CORPUS[:7], k=2, max_new_tokens=6),
        AnswerRequest(QUESTIONS[3], CORPUS[2:7], k=3, max_new_tokens=6),
        AnswerRequest(QUESTIONS[4], None, k=2, max_new_tokens=6),
        AnswerRequest(QUESTIONS[5], None, k=1, max_new_tokens=6),
    ]


def test_model_answer_of_a_batch_equals_its_questions_one_at_a_time(model):
    # The claim dynamic batching rests on: `answer` decides retrieval per question (here 1, 2 and 6 candidates, k=2).
    memories = [model.compress(CORPUS[:n]) for n in (1, 2, 6)]
    batched = model.answer(QUESTIONS[:3], memories, k=2, return_dict=True)
    alone = [model.answer(q, m, k=2, return_dict=True) for q, m in zip(QUESTIONS[:3], memories)]
    assert [b["answer"] for b in batched] == [a["answer"] for a in alone]
    assert [b["doc_indices"] for b in batched] == [a["doc_indices"] for a in alone]
    assert alone[2]["scores"] is not None and alone[0]["scores"] is None  # retrieval happened only where n > k


def test_engine_batch_equals_single_requests_and_model_answer(engine, model):
    requests_ = mixed_requests()
    batched = engine.answer_batch(requests_)
    alone = [engine.answer_batch([r])[0] for r in requests_]
    assert [b.answer for b in batched] == [a.answer for a in alone]
    assert [[h.id for h in b.documents] for b in batched] == [[h.id for h in a.documents] for a in alone]
    for request, result in zip(requests_, batched):  # and both equal the library call a user would make
        if request.documents is None:
            expected = model.answer(request.question, index=engine.index, k=request.k, return_dict=True, max_new_tokens=6)
            assert [h.id for h in result.documents] == expected["doc_indices"]
        else:
            expected = model.answer(request.question, model.compress(request.documents), k=request.k, return_dict=True,
                                    max_new_tokens=6)
            assert [h.id for h in result.documents] == [str(i) for i in expected["doc_indices"]]
        assert result.answer == expected["answer"]


def test_engine_isolates_a_request_the_generator_would_refuse(engine):
    too_long = AnswerRequest("why " * 1100, CORPUS[:1], k=2, max_new_tokens=6)
    good = AnswerRequest(QUESTIONS[0], CORPUS[:1], k=2, max_new_tokens=6)
    results = engine.answer_batch([too_long, good])
    assert isinstance(results[0], RequestError) and results[0].field == "question"
    assert results[1].answer == engine.answer_batch([good])[0].answer


def run_async(coroutine):
    return asyncio.run(coroutine)


def make_batcher(executor, seen: list, **options) -> DynamicBatcher:
    def double(items):  # records each batch it is called with
        seen.append(list(items))
        if "bad" in items:
            raise ValueError("bad item")
        return [2 * item for item in items]

    return DynamicBatcher("test", double, executor, **{"max_batch_size": 4, "max_wait_s": 0.05, "max_queue": 100, **options})


def test_batcher_groups_by_key_up_to_the_max_batch_size():
    seen = []

    async def scenario():
        batcher = make_batcher(ThreadPoolExecutor(1), seen)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(i, key=i % 2) for i in range(10)))
        await batcher.stop()
        return results

    assert run_async(scenario()) == [2 * i for i in range(10)]
    assert sorted(len(b) for b in seen) == [1, 1, 4, 4]  # 5 even and 5 odd items, batches of at most 4
    assert all(len({item % 2 for item in batch}) == 1 for batch in seen)


def test_batcher_waits_after_a_batch_for_its_clients_to_come_back():
    # A request that queued while a batch ran must not start alone the moment that batch ends: the clients it
    # answered send their next requests just after, within max_wait, and all run as one batch.
    seen, release = [], threading.Event()

    def slow_double(items):
        seen.append(list(items))
        release.wait(timeout=30)
        return [2 * item for item in items]

    async def scenario():
        batcher = DynamicBatcher("test", slow_double, ThreadPoolExecutor(1), max_batch_size=4, max_wait_s=0.5, max_queue=100)
        batcher.start()
        first = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
        while not seen:  # the first batch is running
            await asyncio.sleep(0.01)
        straggler = asyncio.create_task(batcher.submit(3))
        await asyncio.sleep(0.6)  # the straggler's own max_wait is over while the first batch still runs
        release.set()
        answered = await asyncio.gather(*first)
        results = await asyncio.gather(straggler, *(batcher.submit(i) for i in range(4, 7)))  # the clients return
        await batcher.stop()
        return answered + results

    assert run_async(scenario()) == [2 * i for i in range(7)]
    assert seen == [[0, 1, 2], [3, 4, 5, 6]]


def test_batcher_isolates_a_failing_item_and_refuses_past_max_queue():
    seen = []

    async def scenario():
        batcher = make_batcher(ThreadPoolExecutor(1), seen, max_queue=3, max_wait_s=0.2)
        batcher.start()
        tasks = [asyncio.create_task(batcher.submit(item)) for item in (1, "bad", 3)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError) as refused:
            await batcher.submit(4)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        await batcher.stop()
        return refused.value, results

    refused, results = run_async(scenario())
    assert refused.retry_after >= 1
    assert results[0] == 2 and results[2] == 6 and isinstance(results[1], ValueError)
    assert seen[0] == [1, "bad", 3] and seen[1:] == [[1], ["bad"], [3]]  # the batch failed, then one by one


def test_batcher_drops_a_timed_out_request_before_running_it():
    seen = []

    async def scenario():
        batcher = make_batcher(ThreadPoolExecutor(1), seen, max_wait_s=0.3)
        batcher.start()
        with pytest.raises(TimeoutError):
            await batcher.submit(1, timeout=0.05)
        depth = batcher.queue_depth
        await asyncio.sleep(0.4)  # past max_wait: the worker finds nothing to run
        result = await batcher.submit(2, timeout=5)
        await batcher.stop()
        return depth, result

    assert run_async(scenario()) == (0, 4)
    assert seen == [[2]]


# ----------------------------------------------------------------------------------------------------------------
# A real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*arguments: str, startup_timeout: float = 300, log: Path | None = None, env: dict | None = None):
    """`clara serve ...` as a subprocess on a free 127.0.0.1 port; yields the base URL, stops the server after.

    `log`: a file for the server's output (read it after); `env`: variables added to its environment."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_DIR), **(env or {})}
    output = subprocess.PIPE if log is None else open(log, "w")
    process = subprocess.Popen([sys.executable, "-m", "modeling_clara.cli", "serve", "--port", str(port), *arguments],
                               env=env, stdout=output, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                printed = process.stdout.read() if log is None else Path(log).read_text()
                raise AssertionError(f"the server exited with {process.returncode}:\n{printed}")
            try:
                if requests.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the server did not start in time")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=120)  # a vLLM engine shuts its child processes down first
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if log is not None:
            output.close()


@pytest.fixture(scope="module")
def server(saved_model_dir, index_dir):
    with running_server("--model", str(saved_model_dir), "--index", str(index_dir), "--max-batch-size", "8",
                        "--max-wait-ms", "200") as url:
        yield url


def metric(url: str, name: str, **labels) -> float:
    """A sample's value from /metrics (0 when absent)."""
    selector = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.compile(rf"^{re.escape(name)}(?:\{{{re.escape(selector)}\}})? (\S+)$", re.M) if labels else \
        re.compile(rf"^{re.escape(name)} (\S+)$", re.M)
    found = pattern.search(requests.get(f"{url}/metrics", timeout=10).text)
    return float(found.group(1)) if found else 0.0


def test_health(server, saved_model_dir):
    response = requests.get(f"{server}/health", timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok" and body["model"] == str(saved_model_dir) and body["backend"] == "transformers"
    assert body["index_documents"] == len(CORPUS)


def test_search_equals_the_index(server, engine):
    response = requests.post(f"{server}/v1/search", json={"question": QUESTIONS[0], "k": 3}, timeout=60)
    assert response.status_code == 200
    expected = engine.index.search(QUESTIONS[0], k=3)
    documents = response.json()["documents"]
    assert [d["id"] for d in documents] == expected.ids
    assert [d["text"] for d in documents] == expected.texts
    torch.testing.assert_close(torch.tensor([d["score"] for d in documents]), torch.tensor(expected.scores))


def test_answer_with_documents_and_from_the_index(server, model, engine):
    given = requests.post(f"{server}/v1/answer", json={"question": QUESTIONS[2], "documents": CORPUS[:5], "k": 2,
                                                       "max_new_tokens": 6}, timeout=60).json()
    expected = model.answer(QUESTIONS[2], model.compress(CORPUS[:5]), k=2, return_dict=True, max_new_tokens=6)
    assert given["answer"] == expected["answer"]
    assert [d["id"] for d in given["documents"]] == [str(i) for i in expected["doc_indices"]]
    assert [d["text"] for d in given["documents"]] == [CORPUS[i] for i in expected["doc_indices"]]

    retrieved = requests.post(f"{server}/v1/answer", json={"question": QUESTIONS[0]}, timeout=60).json()
    expected = model.answer(QUESTIONS[0], index=engine.index, return_dict=True)  # default k and max_new_tokens
    assert retrieved["answer"] == expected["answer"]
    assert [d["id"] for d in retrieved["documents"]] == expected["doc_indices"]


def test_compress_returns_safetensors_memory(server, model):
    body = requests.post(f"{server}/v1/compress", json={"documents": CORPUS[:3]}, timeout=60).json()
    memory = load_safetensors(base64.b64decode(body["memory"]))["memory"]
    assert body["shape"] == [3, model.n_mem_tokens, model.hidden_size] == list(memory.shape)
    torch.testing.assert_close(memory, model.compress(CORPUS[:3]), atol=1e-5, rtol=1e-4)


def test_concurrent_requests_are_batched_and_answer_as_sequential_ones(server):
    bodies = [{"question": q, "documents": CORPUS[i : i + 1 + i % 4], "k": 2, "max_new_tokens": 6}
              for i, q in enumerate(QUESTIONS)] + [{"question": q, "k": 2, "max_new_tokens": 6} for q in QUESTIONS[:2]]
    count_before = metric(server, "clara_batch_size_count", operation="answer")
    sum_before = metric(server, "clara_batch_size_sum", operation="answer")
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda b: requests.post(f"{server}/v1/answer", json=b, timeout=120), bodies))
    batches = metric(server, "clara_batch_size_count", operation="answer") - count_before
    batched_requests = metric(server, "clara_batch_size_sum", operation="answer") - sum_before
    assert batched_requests == len(bodies) and batches < len(bodies)  # at least one batch held several requests
    sequential = [requests.post(f"{server}/v1/answer", json=b, timeout=120) for b in bodies]
    assert [r.status_code for r in concurrent + sequential] == [200] * (2 * len(bodies))
    for batched, alone in zip(concurrent, sequential):  # compressing in a batch moves scores by float rounding only
        batched, alone = batched.json(), alone.json()
        assert batched["answer"] == alone["answer"]
        assert [(d["id"], d["text"]) for d in batched["documents"]] == [(d["id"], d["text"]) for d in alone["documents"]]
        torch.testing.assert_close(torch.tensor([d["score"] or 0.0 for d in batched["documents"]]),
                                   torch.tensor([d["score"] or 0.0 for d in alone["documents"]]))


BAD_REQUESTS = [
    ("/v1/search", {"k": 3}, "question"),
    ("/v1/search", {"question": "", "k": 3}, "question"),
    ("/v1/search", {"question": "   ", "k": 3}, "question"),
    ("/v1/search", {"question": 42, "k": 3}, "question"),
    ("/v1/search", {"question": ["a list"], "k": 3}, "question"),
    ("/v1/search", {"question": "q", "k": 0}, "k"),
    ("/v1/search", {"question": "q", "k": -1}, "k"),
    ("/v1/search", {"question": "q", "k": 2.5}, "k"),
    ("/v1/search", {"question": "q", "k": "3"}, "k"),
    ("/v1/search", {"question": "q", "k": True}, "k"),
    ("/v1/search", {"question": "q", "k": 101}, "k"),
    ("/v1/search", {"question": "q", "top_k": 3}, "top_k"),
    ("/v1/answer", {"question": "q", "documents": []}, "documents"),
    ("/v1/answer", {"question": "q", "documents": ["fine", ""]}, "documents.1"),
    ("/v1/answer", {"question": "q", "documents": "not a list"}, "documents"),
    ("/v1/answer", {"question": "q", "documents": ["d"], "k": 0}, "k"),
    ("/v1/answer", {"question": "q", "documents": ["d"], "max_new_tokens": 513}, "max_new_tokens"),
    ("/v1/answer", {"question": "q", "documents": ["d"], "max_new_tokens": 0}, "max_new_tokens"),
    ("/v1/answer", {"question": "why " * 1100, "documents": ["d"]}, "question"),
    ("/v1/answer", {"question": "q" * 20_001, "documents": ["d"]}, "question"),
    ("/v1/answer", {"question": "q", "documents": ["d"] * 65}, "documents"),  # prompt past the generator's limit
    ("/v1/compress", {"documents": []}, "documents"),
    ("/v1/compress", {"documents": [" "]}, "documents.0"),
    ("/v1/compress", {}, "documents"),
    ("/v1/compress", ["a", "list"], "body"),
]


@pytest.mark.parametrize(("path", "body", "field"), BAD_REQUESTS)
def test_client_mistakes_are_4xx_naming_the_field(server, path, body, field):
    response = requests.post(f"{server}{path}", json=body, timeout=60)
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["error"]["field"] == field, response.text


@pytest.mark.parametrize("raw", [b"{not json", b'{"question": "q", "k": 3', b""])
def test_invalid_json_is_400(server, raw):
    response = requests.post(f"{server}/v1/search", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "body"


def test_oversize_body_is_413_and_the_server_stays_healthy(server):
    huge = json.dumps({"documents": ["x" * 1000] * 1100})  # > the default 1 MiB
    assert requests.post(f"{server}/v1/compress", data=huge, headers={"Content-Type": "application/json"},
                         timeout=60).status_code == 413

    def chunks():  # no content-length: counted as it arrives
        for _ in range(1100):
            yield b"x" * 1000

    assert requests.post(f"{server}/v1/compress", data=chunks(), timeout=60).status_code == 413
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
    assert metric(server, "clara_requests_total", endpoint="/v1/compress", status="500") == 0


def test_a_full_queue_is_503_with_retry_after_and_a_timeout_cancels(saved_model_dir):
    # Batches wait up to 3 s for 8 requests (of 2 documents each: 16 fit --max-batch-documents), so the first two
    # queued requests fill the queue for that long.
    with running_server("--model", str(saved_model_dir), "--max-batch-size", "8", "--max-wait-ms", "3000",
                        "--max-batch-documents", "16", "--max-queue", "2", "--request-timeout", "1") as url:
        body = {"question": QUESTIONS[0], "documents": CORPUS[:2], "max_new_tokens": 4}
        with ThreadPoolExecutor(5) as pool:
            responses = list(pool.map(lambda _: requests.post(f"{url}/v1/answer", json=body, timeout=60), range(5)))
        codes = sorted(r.status_code for r in responses)
        assert codes == [503, 503, 503, 504, 504]  # two queued, timed out after 1 s, three refused
        refused = [r for r in responses if r.status_code == 503]
        assert all(int(r.headers["Retry-After"]) >= 1 for r in refused)
        assert all(r.json()["error"]["type"] == "queue_full" for r in refused)
        time.sleep(3)  # past the batch deadline: the timed-out requests were dropped, not run
        assert metric(url, "clara_batch_size_count", operation="answer") == 0
        assert metric(url, "clara_queue_depth", operation="answer") == 0
        assert metric(url, "clara_requests_rejected_total", operation="answer", reason="queue_full") == 3
        assert metric(url, "clara_requests_rejected_total", operation="answer", reason="timeout") == 2
        health = requests.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok" and health["index_documents"] is None
        no_index = requests.post(f"{url}/v1/answer", json={"question": "q"}, timeout=60)
        assert no_index.status_code == 422 and no_index.json()["error"]["field"] == "documents"
        assert requests.post(f"{url}/v1/search", json={"question": "q"}, timeout=60).status_code == 400


@pytest.mark.slow
@pytest.mark.integration
def test_shipped_model_serves_its_bundled_corpus(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(open(SHIPPED_CORPUS_FILE, encoding="utf-8").readlines()[:6]))
    question = "Where was the live album 'In Concert' by America recorded?"
    with running_server("--model", "shipped", "--corpus", str(corpus), "--index", str(tmp_path / "index")) as url:
        served = requests.post(f"{url}/v1/answer", json={"question": question, "max_new_tokens": 24}, timeout=300)
    assert served.status_code == 200, served.text
    model = ClaraForRAG.from_pretrained("shipped")
    expected = model.answer(question, index=ClaraIndex.load(tmp_path / "index", model=model), return_dict=True,
                            max_new_tokens=24)
    assert served.json()["answer"] == expected["answer"] and expected["answer"]
    assert [d["id"] for d in served.json()["documents"]] == expected["doc_indices"]
