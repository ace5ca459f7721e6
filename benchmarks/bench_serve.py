"""Load benchmark of `clara serve`: throughput of concurrent clients against sequential requests, latency, batch sizes.

Starts the server itself on a free 127.0.0.1 port (loopback only), sends a bounded number of requests, prints the
numbers (the server's peak RSS among them) and stops the server:

    python benchmarks/bench_serve.py --backend transformers                       # shipped model, bundled corpus
    python benchmarks/bench_serve.py --backend vllm --python /work/venv-vllm/bin/python
    taskset -c 0 python benchmarks/bench_serve.py --server-cpus 1 --server-threads 1   # server and clients apart
    python benchmarks/bench_serve.py --no-fast-decoding          # the server decoding with `generate` throughout

Each request is `POST /v1/answer` with a question and no documents (retrieved from the index, then generated), the
questions cycling through variants so no two consecutive requests are equal. The sequential phase sends one request
at a time from one client; the concurrent phase `--requests` requests from `--clients` threads. The report names the
pinning and the machine's load average before and after, since other work on the machine changes the numbers, and
the server's peak RSS after the warm-up (requests one at a time) and at the end (batches of concurrent requests).
"""

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from transformers.utils import logging

logger = logging.get_logger(__name__)

REPO_DIR = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # never another address: the benchmark loads only a server it started on this machine
TOPICS = ["the live album 'In Concert'", "the Oketo Forest Railway", "the river in this passage", "the first person named",
          "the year it happened", "the country it is in", "the band's members", "the railway's length"]
TEMPLATES = ["What is known about {}?", "Where is {}?", "When was {} first mentioned?", "Who is associated with {}?"]
# `clara serve` with the fast decoding loop declining every call, so every answer decodes with `generate`.
SERVE_WITHOUT_FAST_DECODING = """
import sys
from modeling_clara.cli import main
from modeling_clara.decoding_clara import ClaraFastGenerator
ClaraFastGenerator.generate = lambda self, *args, **kwargs: None
raise SystemExit(main(sys.argv[1:]))
"""


def questions(n: int) -> list[str]:
    variants = [t.format(topic) for t in TEMPLATES for topic in TOPICS]
    return [f"{variants[i % len(variants)]} ({i})" if i >= len(variants) else variants[i] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(args, port: int, index_dir: str) -> subprocess.Popen:
    entry = ["-c", SERVE_WITHOUT_FAST_DECODING] if args.no_fast_decoding else ["-m", "modeling_clara.cli"]
    command = [args.python, *entry, "serve", "--model", args.model, "--corpus", args.corpus,
               "--index", index_dir, "--host", HOST, "--port", str(port), "--backend", args.backend,
               "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--max-queue", str(max(args.requests, 256)), "--request-timeout", str(args.request_timeout)]
    if args.server_cpus is not None:  # keep the clients' threads off the cores the model computes on
        command = ["taskset", "-c", args.server_cpus, *command]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO_DIR)}
    if args.server_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.server_threads)
    return subprocess.Popen(command, env=env)


def wait_until_healthy(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not become healthy within {timeout} s")


def send(session: requests.Session, url: str, question: str, max_new_tokens: int) -> tuple[float, int]:
    started = time.monotonic()
    try:
        status = session.post(f"{url}/v1/answer", json={"question": question, "max_new_tokens": max_new_tokens},
                              timeout=300).status_code
    except requests.RequestException:
        status = 0
    return time.monotonic() - started, status


def run_phase(url: str, batch: list[str], clients: int, max_new_tokens: int) -> dict:
    sessions = [requests.Session() for _ in range(clients)]
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: send(sessions[i % clients], url, batch[i], max_new_tokens), range(len(batch))))
    seconds = time.monotonic() - started
    latencies = sorted(latency for latency, _ in results)
    return {"requests": len(batch), "seconds": seconds, "throughput": len(batch) / seconds,
            "p50": statistics.median(latencies), "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
            "errors": dict(Counter(status for _, status in results if status != 200))}  # status -> count; 0: no response


def peak_rss(process: subprocess.Popen) -> int | None:
    """The server's peak resident memory so far (VmHWM, bytes); `None` where /proc does not say."""
    try:
        status = Path(f"/proc/{process.pid}/status").read_text()
    except OSError:
        return None
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def batch_sizes(url: str) -> dict:
    """Mean and histogram of the answer batches, from /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    buckets = {float(le): float(v) for le, v in
               re.findall(r'^clara_batch_size_bucket\{le="([^"+]+)",operation="answer"\} (\S+)$', text, re.M)}
    count = float(re.search(r'^clara_batch_size_count\{operation="answer"\} (\S+)$', text, re.M).group(1))
    total = float(re.search(r'^clara_batch_size_sum\{operation="answer"\} (\S+)$', text, re.M).group(1))
    return {"batches": count, "requests": total, "cumulative_buckets": buckets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="shipped")
    parser.add_argument("--corpus", default="shipped", help="JSONL corpus indexed at start (`shipped`: the bundled one)")
    parser.add_argument("--index", default=None, help="index folder (built there once); default: a temporary one")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs the server (e.g. a vLLM venv)")
    parser.add_argument("--requests", type=int, default=500, help="requests of the concurrent phase (at most 2000)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--sequential-requests", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--request-timeout", type=float, default=60.0, help="the server's --request-timeout")
    parser.add_argument("--server-cpus", default=None, help="pin the server to these cores (taskset -c), e.g. 1")
    parser.add_argument("--server-threads", type=int, default=None, help="OMP_NUM_THREADS of the server")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--no-fast-decoding", action="store_true",
                        help="transformers backend: decode with `generate` instead of the fast loop")
    args = parser.parse_args()
    if not 0 < args.requests <= 2000 or not 0 < args.sequential_requests <= 2000:
        raise SystemExit("--requests and --sequential-requests must be in 1..2000 (the benchmark is bounded)")
    if args.no_fast_decoding and args.backend != "transformers":
        raise SystemExit(f"--no-fast-decoding applies to the transformers backend, not {args.backend!r}")

    port = free_port()
    url = f"http://{HOST}:{port}"
    with tempfile.TemporaryDirectory(prefix="clara-bench-serve-") as scratch:
        process = start_server(args, port, args.index or str(Path(scratch) / "index"))
        try:
            wait_until_healthy(url, process, args.startup_timeout)
            run_phase(url, questions(4), 1, args.max_new_tokens)  # warm-up: first calls allocate and compile
            peak_after_warm_up = peak_rss(process)
            before = batch_sizes(url)
            load_before = os.getloadavg()  # other work on the machine slows both phases; reported with the numbers
            sequential = run_phase(url, questions(args.sequential_requests), 1, args.max_new_tokens)
            concurrent = run_phase(url, questions(args.requests), args.clients, args.max_new_tokens)
            after = batch_sizes(url)
            load_after = os.getloadavg()
            peaks = (peak_after_warm_up, peak_rss(process))
        finally:
            process.terminate()
            process.wait(timeout=60)
    report(args, sequential, concurrent, before, after, (load_before, load_after), peaks)


def report(args, sequential: dict, concurrent: dict, before: dict, after: dict, loads: tuple, peaks: tuple) -> None:
    batches = after["batches"] - before["batches"] - sequential["requests"]  # sequential requests ran alone
    batched = after["requests"] - before["requests"] - sequential["requests"]
    lines = [
        f"backend {args.backend}{' without the fast decoding loop' if args.no_fast_decoding else ''}, "
        f"model {args.model}, max_new_tokens {args.max_new_tokens}, {os.cpu_count()} cores, "
        f"max_batch_size {args.max_batch_size}, max_wait_ms {args.max_wait_ms}, server cpus {args.server_cpus or 'all'}, "
        f"server threads {args.server_threads or 'default'}; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in loads[0])}, after {', '.join(f'{x:.2f}' for x in loads[1])}",
        f"sequential: {sequential['requests']} requests, {sequential['throughput']:.2f} req/s, "
        f"p50 {sequential['p50'] * 1000:.0f} ms, p99 {sequential['p99'] * 1000:.0f} ms, errors {_errors(sequential)}",
        f"{args.clients} clients: {concurrent['requests']} requests, {concurrent['throughput']:.2f} req/s "
        f"({concurrent['throughput'] / sequential['throughput']:.2f}x sequential), p50 {concurrent['p50'] * 1000:.0f} ms, "
        f"p99 {concurrent['p99'] * 1000:.0f} ms, errors {_errors(concurrent)}",
        f"answer batches in the concurrent phase: {batches:.0f}, mean size {batched / max(batches, 1):.2f}; "
        f"cumulative size histogram (all phases) {after['cumulative_buckets']}",
        f"server peak RSS: {peaks[0] / 2**30:.2f} GiB after the warm-up (4 requests one at a time), "
        f"{peaks[1] / 2**30:.2f} GiB at the end" if all(peaks) else "server peak RSS: not available (no /proc)",
    ]
    print("\n".join(lines))


def _errors(phase: dict) -> str:
    total = sum(phase["errors"].values())
    return f"{total} {phase['errors']}" if total else "0"


if __name__ == "__main__":
    main()
