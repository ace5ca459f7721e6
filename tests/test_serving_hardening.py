"""`clara serve` under hostile load: each attack replayed against a real server process on 127.0.0.1, bounded in
count and time. Bounded work per request and per model call, clients that leave, slow clients, honest readiness,
trusted hosts, an API key, cheap checks first, every error in the documented shape. Tiny random models, and the
shipped model where an attack needs real model time (`slow`)."""

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi", reason='the serve extra: pip install "clara-hf[serve]"')
requests = pytest.importorskip("requests")

from conftest import make_tiny_clara  # noqa: E402
from test_serving import (  # noqa: E402
    CORPUS,
    QUESTIONS,
    index_dir,  # noqa: F401  (fixtures used by name)
    metric,
    model,  # noqa: F401
    running_server,
    saved_model_dir,  # noqa: F401
)

from modeling_clara.checkpoints import SHIPPED_CORPUS_FILE  # noqa: E402
from modeling_clara.serving.batching import DynamicBatcher, RequestTimeoutError  # noqa: E402

API_KEY = "test-key-8f3a"
SOCKET_TIMEOUT_S = 15  # how long a raw-socket read may wait: a bound, far above every timeout the servers use


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("serve_log") / "server.log"


@pytest.fixture(scope="module")
def server(saved_model_dir, index_dir, server_log):  # noqa: F811
    # Batches wait 1.5 s for company, so a request is still queued a moment after it is sent.
    with running_server("--model", str(saved_model_dir), "--index", str(index_dir), "--max-wait-ms", "1500",
                        "--header-timeout", "1", "--body-timeout", "1", "--max-batch-documents", "4",
                        log=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def guarded_server(saved_model_dir):  # noqa: F811
    # An API key from the environment; no index; a queue of two requests that wait 3 s for a batch of 8.
    with running_server("--model", str(saved_model_dir), "--max-queue", "2", "--max-wait-ms", "3000",
                        "--max-batch-size", "8", "--max-batch-documents", "16", env={"CLARA_API_KEY": API_KEY}) as url:
        yield url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def raw_request(path: str, body: bytes, host: str = "127.0.0.1") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and the seconds that took."""
    started, received = time.monotonic(), b""
    sock.settimeout(SOCKET_TIMEOUT_S)
    while chunk := sock.recv(65536):  # raises socket.timeout when the server keeps the connection open
        received += chunk
    return received, time.monotonic() - started


def json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# ----------------------------------------------------------------------------------------------------------------
# Attack 2: clients that leave


def test_requests_of_clients_that_left_cost_no_model_time(server, server_log):
    body = json.dumps({"question": QUESTIONS[0], "max_new_tokens": 4}).encode()  # from the index: batches wait 1.5 s
    batched_before = metric(server, "clara_batch_size_sum", operation="answer")
    closed_before = metric(server, "clara_requests_total", endpoint="/v1/answer", status="499")
    sockets = [socket.create_connection(("127.0.0.1", port_of(server))) for _ in range(10)]
    for sock in sockets:
        sock.sendall(raw_request("/v1/answer", body))
    time.sleep(0.3)  # queued, waiting for their batch
    for sock in sockets:
        sock.close()
    time.sleep(2.5)  # past the batch window: the worker would have run them by now
    assert metric(server, "clara_batch_size_sum", operation="answer") == batched_before
    assert metric(server, "clara_requests_total", endpoint="/v1/answer", status="499") == closed_before + 10
    assert metric(server, "clara_requests_rejected_total", operation="answer", reason="disconnected") >= 10
    answered = requests.post(f"{server}/v1/answer", json=json.loads(body), timeout=60)
    assert answered.status_code == 200, answered.text
    assert "Traceback" not in server_log.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Attacks 1 and 2 during generation: a batch nobody waits for stops generating

LONG_ANSWER = 60_000  # tokens: minutes of generation for a batch of the tiny model (600 short batches), unless it stops
SHORT_ANSWER = 100  # tokens: a batch that runs to its end, timing a token
CONNECTION_LIMIT = 16  # well above the 4 clients plus a metrics request of the generation tests (closing lags under load)


@pytest.fixture(scope="module")
def endless_model_dir(tiny_llama_dir, tmp_path_factory):
    """A tiny CLaRa whose answers run to max_new_tokens: the end-of-sequence row of its (tied) output embeddings is
    zero, so that token's logit, 0, stays below the largest of the 999 other random logits."""
    model = make_tiny_clara(tiny_llama_dir)
    with torch.no_grad():
        model.decoder.get_output_embeddings().weight[model.decoder.generation_config.eos_token_id] = 0
    path = tmp_path_factory.mktemp("endless_clara")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def generating_server(endless_model_dir):
    with running_server("--model", str(endless_model_dir), "--request-timeout", "3", "--max-wait-ms", "300",
                        "--max-new-tokens", str(LONG_ANSWER), "--limit-concurrency", str(CONNECTION_LIMIT)) as url:
        yield url


def batch_seconds(url: str, operation: str, calls: int, bound_s: float = 300) -> float:
    """Model seconds of `operation`'s calls once `calls` of them have ended (waiting up to `bound_s`)."""
    deadline = time.monotonic() + bound_s
    while metric(url, "clara_batch_size_count", operation=operation) < calls and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric(url, "clara_batch_size_count", operation=operation) == calls
    return metric(url, "clara_batch_duration_seconds_sum", operation=operation)


def answer_batch(url: str, n_tokens: int, timeout: float) -> list:
    body = {"question": QUESTIONS[0], "documents": CORPUS[:2], "max_new_tokens": n_tokens}
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda _: requests.post(f"{url}/v1/answer", json=body, timeout=timeout), range(4)))


def chat_batch(url: str, n_tokens: int, timeout: float) -> list:
    body = {"model": "x", "messages": [{"role": "user", "content": QUESTIONS[0]}], "documents": CORPUS[:2],
            "max_tokens": n_tokens, "temperature": 0}

    def ask(_):
        try:
            return requests.post(f"{url}/v1/chat/completions", json={**body, "model": served_name(url)},
                                 timeout=timeout)
        except requests.ReadTimeout as error:  # the client gives up and closes its connection
            return error

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(ask, range(4)))


def served_name(url: str) -> str:
    return requests.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]


def test_an_answer_batch_whose_requests_all_timed_out_stops_generating(generating_server):
    url = generating_server
    assert {r.status_code for r in answer_batch(url, SHORT_ANSWER, timeout=120)} == {200}
    short_seconds = batch_seconds(url, "answer", calls=1)
    timed_out = answer_batch(url, LONG_ANSWER, timeout=120)  # --request-timeout 3
    assert {r.status_code for r in timed_out} == {504}, [r.text for r in timed_out]
    long_seconds = batch_seconds(url, "answer", calls=2) - short_seconds
    # Running to its end would take at least LONG_ANSWER / SHORT_ANSWER times the short batch's model time.
    assert long_seconds < 0.2 * short_seconds * LONG_ANSWER / SHORT_ANSWER, (long_seconds, short_seconds)
    assert metric(url, "clara_batches_stopped_total", operation="answer") == 1
    assert "stops at its next step" in timed_out[0].json()["error"]["message"]
    answered = requests.post(f"{url}/v1/answer", json={"question": QUESTIONS[1], "documents": CORPUS[:1],
                                                       "max_new_tokens": 2}, timeout=60)
    assert answered.status_code == 200, answered.text


def test_a_chat_batch_whose_clients_all_left_stops_generating(generating_server):
    url = generating_server
    assert {r.status_code for r in chat_batch(url, SHORT_ANSWER, timeout=120)} == {200}
    short_seconds = batch_seconds(url, "chat", calls=1)
    gone = chat_batch(url, LONG_ANSWER, timeout=1.5)  # each client leaves after 1.5 s, before --request-timeout
    assert all(isinstance(outcome, requests.ReadTimeout) for outcome in gone), gone
    long_seconds = batch_seconds(url, "chat", calls=2) - short_seconds
    assert metric(url, "clara_batches_stopped_total", operation="chat") == 1
    assert long_seconds < 0.2 * short_seconds * LONG_ANSWER / SHORT_ANSWER, (long_seconds, short_seconds)
    assert metric(url, "clara_requests_total", endpoint="/v1/chat/completions", status="499") == 4


def test_the_connection_limit_and_unreadable_headers_answer_in_the_error_shape(generating_server):
    url, port = generating_server, port_of(generating_server)
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTION_LIMIT)]
    try:
        time.sleep(0.3)  # accepted by the server
        busy = requests.get(f"{url}/health", timeout=10)
    finally:
        for sock in idle:
            sock.close()
    assert busy.status_code == 503 and busy.json()["error"]["type"] == "server_busy", busy.text
    assert "--limit-concurrency" in busy.json()["error"]["message"] and busy.headers["Retry-After"] == "1"
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # h11 measures headers still incomplete: past --max-header-bytes (16 KiB) without their end.
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20_000)
        response, _ = read_until_closed(sock)
    assert response.startswith(b"HTTP/1.1 400 "), response[:200]
    error = json_body(response)["error"]
    assert error["type"] == "invalid_request" and "--max-header-bytes" in error["message"]
    assert requests.get(f"{url}/health", timeout=10).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Attack 3: slow clients


@pytest.mark.parametrize("sent", [
    b"",  # connected, nothing sent
    b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",  # partial headers
    b"POST /v1/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    b'{"questio',  # a partial body
], ids=["nothing", "partial-headers", "partial-body"])
def test_slow_clients_get_408_and_are_cut_off(server, server_log, sent):
    with socket.create_connection(("127.0.0.1", port_of(server))) as sock:
        sock.sendall(sent)
        response, seconds = read_until_closed(sock)
    assert seconds < 5  # --header-timeout / --body-timeout 1 s
    assert response.startswith(b"HTTP/1.1 408 "), response
    assert json_body(response)["error"]["type"] in ("header_timeout", "body_timeout")
    assert requests.get(f"{server}/health", timeout=10).status_code == 200
    assert "Traceback" not in server_log.read_text()


# ----------------------------------------------------------------------------------------------------------------
# Attack 5: any Host trusted, redirects naming it


def test_a_foreign_host_is_refused_and_nothing_redirects(server):
    forged = requests.post(f"{server}/v1/search", json={"question": QUESTIONS[0], "k": 2},
                           headers={"Host": "evil.example"}, timeout=60)
    assert forged.status_code == 400 and forged.json()["error"]["field"] == "host", forged.text
    slash = requests.post(f"{server}/v1/search/", json={"question": QUESTIONS[0], "k": 2},
                          headers={"Host": "evil.example"}, allow_redirects=False, timeout=60)
    assert slash.status_code == 400 and "location" not in slash.headers
    slash = requests.post(f"{server}/v1/search/", json={"question": QUESTIONS[0], "k": 2}, allow_redirects=False,
                          timeout=60)
    assert slash.status_code == 404 and "location" not in slash.headers and "error" in slash.json()
    own = requests.post(f"{server}/v1/search", json={"question": QUESTIONS[0], "k": 2},
                        headers={"Host": f"localhost:{port_of(server)}"}, timeout=60)
    assert own.status_code == 200, own.text


def test_a_missing_or_wrong_api_key_is_401_except_for_liveness(guarded_server):
    body = {"question": QUESTIONS[0], "documents": CORPUS[:1], "max_new_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        refused = requests.post(f"{guarded_server}/v1/answer", json=body, headers=headers, timeout=60)
        assert refused.status_code == 401 and refused.json()["error"]["type"] == "invalid_api_key", refused.text
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/ready", "/metrics"):
        assert requests.get(f"{guarded_server}{path}", timeout=10).status_code == 401
    assert requests.get(f"{guarded_server}/health", timeout=10).status_code == 200
    key = {"Authorization": f"Bearer {API_KEY}"}
    answered = requests.post(f"{guarded_server}/v1/answer", json=body, headers=key, timeout=60)
    assert answered.status_code == 200, answered.text
    assert requests.get(f"{guarded_server}/ready", headers=key, timeout=10).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Attack 4: health that hides saturation


def test_ready_is_503_while_a_queue_is_full_and_health_counts_it(guarded_server):
    key = {"Authorization": f"Bearer {API_KEY}"}
    body = {"question": QUESTIONS[0], "documents": CORPUS[:2], "max_new_tokens": 2}
    with ThreadPoolExecutor(2) as pool:
        queued = [pool.submit(requests.post, f"{guarded_server}/v1/answer", json=body, headers=key, timeout=60)
                  for _ in range(2)]
        time.sleep(1)  # both wait 3 s for a batch of 8: the queue of 2 is full
        not_ready = requests.get(f"{guarded_server}/ready", headers=key, timeout=10)
        health = requests.get(f"{guarded_server}/health", timeout=10)
        assert [f.result().status_code for f in queued] == [200, 200]
    # An answer's documents queue for compression first.
    assert not_ready.status_code == 503 and "compress queue is full" in not_ready.json()["error"]["message"]
    assert health.status_code == 200 and health.json()["queue_depth"]["compress"] == 2
    assert requests.get(f"{guarded_server}/ready", headers=key, timeout=10).status_code == 200


# ----------------------------------------------------------------------------------------------------------------
# Attacks 1 and 6: bounded work, cheap checks first


def test_work_over_a_limit_is_refused_at_admission_naming_its_option(server):
    batches_before = metric(server, "clara_batch_size_count", operation="compress")
    over = [("/v1/compress", {"documents": ["x"] * 9}, "documents", "--max-documents"),
            ("/v1/compress", {"documents": ["x"] * 64}, "documents", "--max-documents"),
            ("/v1/answer", {"question": "q", "documents": ["x"] * 9}, "documents", "--max-documents"),
            ("/v1/answer", {"question": "q", "documents": ["x"], "max_new_tokens": 129}, "max_new_tokens",
             "--max-new-tokens")]
    for path, body, field, option in over:
        refused = requests.post(f"{server}{path}", json=body, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, refused.text
        assert option in refused.json()["error"]["message"]
    assert metric(server, "clara_batch_size_count", operation="compress") == batches_before


def test_a_prompt_too_long_is_refused_before_any_model_work(server):
    calls_before = [metric(server, "clara_batch_size_count", operation=op) for op in ("compress", "answer")]
    refused = requests.post(f"{server}/v1/answer", json={"question": "why " * 1100, "documents": CORPUS}, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "question", refused.text
    assert "tokens" in refused.json()["error"]["message"]
    assert [metric(server, "clara_batch_size_count", operation=op) for op in ("compress", "answer")] == calls_before


def test_compression_runs_in_chunks_of_max_batch_documents(server):
    # 8 documents in chunks of --max-batch-documents 4: two compress calls, for compress and for answer.
    calls_before = metric(server, "clara_batch_size_count", operation="compress")
    response = requests.post(f"{server}/v1/compress", json={"documents": CORPUS}, timeout=60)
    assert response.status_code == 200 and response.json()["shape"][0] == len(CORPUS)
    assert metric(server, "clara_batch_size_count", operation="compress") == calls_before + 2
    answered = requests.post(f"{server}/v1/answer", json={"question": QUESTIONS[0], "documents": CORPUS, "k": 2,
                                                          "max_new_tokens": 4}, timeout=60)
    assert answered.status_code == 200 and len(answered.json()["documents"]) == 2, answered.text
    assert metric(server, "clara_batch_size_count", operation="compress") == calls_before + 4


# ----------------------------------------------------------------------------------------------------------------
# Attack 7: the many-keys body, parse errors, invisible questions


def test_unknown_keys_are_refused_without_echoing_them(server):
    long_keys = {"question": "q", **{f"{i}{'k' * 5000}": 1 for i in range(150)}}  # ~750 kB of unknown keys
    many_keys = {"question": "q", **{f"key{i}": 1 for i in range(60_000)}}
    for body in (long_keys, many_keys):
        refused = requests.post(f"{server}/v1/search", json=body, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["type"] == "extra_forbidden", refused.text[:200]
        assert len(refused.content) < 400


PARSE_ERRORS = [
    ("POST", "/v1/search", b'{"question": "\xff\xfe"}', 400),  # invalid UTF-8
    ("POST", "/v1/search", b"[" * 10_000 + b"]" * 10_000, 400),  # nested too deep for the parser
    ("POST", "/v1/search", b'{"question": "q", "k": ' + b"9" * 5000 + b"}", 400),  # a number past int parsing
    ("GET", "/v1/search", b"", 405),
    ("POST", "/v1/nothing", b"{}", 404),
    ("GET", "/", b"", 404),
]


@pytest.mark.parametrize(("method", "path", "raw", "status"), PARSE_ERRORS,
                         ids=["invalid-utf8", "deep-json", "huge-integer", "wrong-method", "no-route", "root"])
def test_parse_errors_and_unknown_routes_answer_in_the_error_shape(server, method, path, raw, status):
    response = requests.request(method, f"{server}{path}", data=raw, headers={"Content-Type": "application/json"},
                                timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"field", "message", "type"} and error["message"]


@pytest.mark.parametrize("question", ["\u200b\u200c\u2060", "\ufeff \u200d\t", "\x00\x01"],
                         ids=["zero-width", "format-and-space", "controls"])
def test_a_question_without_a_visible_character_is_refused(server, question):
    refused = requests.post(f"{server}/v1/search", json={"question": question}, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "question", refused.text


# ----------------------------------------------------------------------------------------------------------------
# In process: how the batcher bounds and times work


def test_batches_are_formed_by_cost_within_the_budget():
    seen = []

    def record(items):
        seen.append(list(items))
        return items

    async def scenario():
        batcher = DynamicBatcher("test", record, ThreadPoolExecutor(1), max_batch_size=8, max_wait_s=0.2,
                                 max_queue=100, max_batch_cost=4)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(cost, cost=cost) for cost in (3, 3, 1, 2, 5)))
        await batcher.stop()
        return results

    assert asyncio.run(scenario()) == [3, 3, 1, 2, 5]
    assert [sum(batch) for batch in seen] == [4, 3, 2, 5]  # 3+1, 3, 2, and 5 alone (over the budget by itself)


def test_a_request_abandoned_before_its_batch_starts_is_skipped_and_counted_as_waiting():
    ran, release = [], threading.Event()

    def block(items):  # holds the shared model thread
        release.wait(timeout=30)
        return items

    def record(items):
        ran.append(list(items))
        return items

    async def scenario():
        executor = ThreadPoolExecutor(1)
        blocker = DynamicBatcher("block", block, executor, max_batch_size=1, max_wait_s=0, max_queue=10)
        batcher = DynamicBatcher("test", record, executor, max_batch_size=1, max_wait_s=0, max_queue=10)
        blocker.start(), batcher.start()
        held = asyncio.create_task(blocker.submit("hold"))
        await asyncio.sleep(0.1)
        waiting = asyncio.create_task(batcher.submit("gone"))
        await asyncio.sleep(0.1)  # taken off the queue into a batch, which waits for the model thread
        depth = batcher.queue_depth
        waiting.cancel()  # its client left
        await asyncio.sleep(0.05)
        release.set()
        await held
        await asyncio.sleep(0.1)
        result = await batcher.submit("stays")
        await blocker.stop(), await batcher.stop()
        return depth, result

    assert asyncio.run(scenario()) == (1, "stays")
    assert ran == [["stays"]]


def test_a_stoppable_call_stops_once_none_of_its_requests_is_waited_for():
    steps, stopped = [], []

    def generate(items, should_stop):  # a decoding loop: 100 steps of 10 ms unless asked to stop
        for step in range(1, 101):
            time.sleep(0.01)
            if should_stop():
                break
        steps.append(step)
        return items

    async def scenario(timeouts):
        batcher = DynamicBatcher("test", generate, ThreadPoolExecutor(1), max_batch_size=2, max_wait_s=0.05,
                                 max_queue=10, stoppable=True, on_stopped=stopped.append)
        batcher.start()
        outcomes = await asyncio.gather(*(batcher.submit(i, timeout=t) for i, t in enumerate(timeouts)),
                                        return_exceptions=True)
        await asyncio.sleep(0.3)  # the call ends
        await batcher.stop()
        return outcomes

    every_one_gone = asyncio.run(scenario([0.2, 0.2]))
    assert all(isinstance(o, RequestTimeoutError) and o.started for o in every_one_gone), every_one_gone
    assert "stops at its next step" in str(every_one_gone[0])
    assert steps[-1] < 60 and stopped == ["test"]
    one_waits = asyncio.run(scenario([0.2, None]))  # the other request is still waited for: the call runs to its end
    assert isinstance(one_waits[0], RequestTimeoutError) and one_waits[1] == 1
    assert steps[-1] == 100 and stopped == ["test"]


def test_batch_duration_times_the_model_call_without_the_wait_for_the_thread():
    durations = {}

    def slow(items):
        time.sleep(0.5)
        return items

    async def scenario():
        executor = ThreadPoolExecutor(1)
        note = lambda operation, size, seconds: durations.setdefault(operation, seconds)  # noqa: E731
        first = DynamicBatcher("slow", slow, executor, max_batch_size=1, max_wait_s=0, max_queue=10, on_batch=note)
        second = DynamicBatcher("fast", list, executor, max_batch_size=1, max_wait_s=0, max_queue=10, on_batch=note)
        first.start(), second.start()
        held = asyncio.create_task(first.submit(1))
        await asyncio.sleep(0.1)
        await second.submit(2)  # waits ~0.4 s for the model thread, runs in microseconds
        await held
        await first.stop(), await second.stop()

    asyncio.run(scenario())
    assert durations["slow"] >= 0.5 and durations["fast"] < 0.1


# ----------------------------------------------------------------------------------------------------------------
# Attack 1 with real model time: the shipped model


@pytest.mark.slow
@pytest.mark.integration
def test_a_timed_out_compress_stops_at_a_chunk_and_a_search_gets_through(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(open(SHIPPED_CORPUS_FILE, encoding="utf-8").readlines()[:4]))
    document = ("The quick brown fox jumps over the lazy dog near the river bank. " * 20)[:1200]  # > 256 tokens
    # Chunks of one document; 16 of them take longer than the timeout, one chunk and a search much less.
    with running_server("--model", "shipped", "--corpus", str(corpus), "--index", str(tmp_path / "index"),
                        "--request-timeout", "10", "--max-batch-documents", "1", "--max-documents", "16") as url:
        requests.post(f"{url}/v1/compress", json={"documents": [document]}, timeout=120)  # warm up
        chunk_seconds = metric(url, "clara_batch_duration_seconds_sum", operation="compress")
        chunks_before = metric(url, "clara_batch_size_count", operation="compress")
        with ThreadPoolExecutor(1) as pool:
            compress = pool.submit(requests.post, f"{url}/v1/compress", json={"documents": [document] * 16},
                                   timeout=120)
            time.sleep(0.5)
            search = requests.post(f"{url}/v1/search", json={"question": QUESTIONS[0], "k": 2}, timeout=120)
            searched_first = not compress.done()
            timed_out = compress.result()
        time.sleep(2 * chunk_seconds)  # the chunk running at the timeout ends
        chunks_run = metric(url, "clara_batch_size_count", operation="compress") - chunks_before
        time.sleep(2 * chunk_seconds)  # long enough for two more chunks, if any were to run
        chunks_later = metric(url, "clara_batch_size_count", operation="compress") - chunks_before
    assert timed_out.status_code == 504 and "no further chunk runs" in timed_out.json()["error"]["message"]
    # The search waited for the chunk running when it came, not for the compress request's 16 documents.
    assert search.status_code == 200 and searched_first, search.text
    assert chunks_later == chunks_run < 16
