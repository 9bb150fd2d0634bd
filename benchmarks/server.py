"""The server against raw llama-cpp-python on the same GGUF, and a bounded load run.

    python -m benchmarks.server [--gguf FILE] [--threads N] [--runs 5] [--clients 32] [--requests 320] [--json]

Default file: the demo student's Q4_K_M (made once under the cache, as benchmarks.runtimes does).
(1) Streaming decode t/s and time to first token through HTTP (`edgepack serve`, a streaming completion read
with httpx) against llama-cpp-python's own generate loop in a separate process, same file, threads, prompt and
number of tokens; the median of `runs` after a warm-up, the two alternating.
(2) Load: `clients` threads send `requests` short completions in all (16 new tokens each) to a server with the
default queue bound (16); a client answered 503 waits Retry-After and tries again (up to 5 tries). Final status
counts, the 503s answered on the way (the deliberate answer past the bound), p50/p99 latency of the answered
requests (queueing included), and the server's RSS before and after.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from benchmarks.common import llama_cpp_generate_timing
from edgepack.measure.profiler import PROMPT_TEXT

PROMPT_TOKENS = 128


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raw_llama_cpp(path: Path, threads: int, new_tokens: int, text: str) -> dict:
    """The child's side: llama-cpp-python's generate loop, greedy; TTFT and decode t/s of one run."""
    from runtimes.llamacpp_amx import load_llama

    llm = load_llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=1024, verbose=False)
    prompt = llm.tokenize(text.encode())
    assert len(prompt) == PROMPT_TOKENS
    llama_cpp_generate_timing(llm, prompt[::-1], new_tokens)  # warm up on another prompt (see the helper)
    ttft, decode = llama_cpp_generate_timing(llm, prompt, new_tokens)
    return {"ttft_s": ttft, "decode_tps": decode}


def http_stream(url: str, model_id: str, prompt: str, max_tokens: int) -> dict:
    """One streaming completion: time to the first content, decode t/s after it, tokens made."""
    body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            elif data["choices"] and data["choices"][0]["text"]:
                now = time.perf_counter()
                first = first or now
                last = now
    return {"ttft_s": first - start, "decode_s": last - first, "tokens": tokens}


def start_server(gguf: Path, threads: int, extra: list[str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """`edgepack serve` in its own process; (process, url, model id) once /health says it is ready."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(gguf), "--port", str(port),
                                "--threads", str(threads), "--context", "1024", *(extra or [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            if health.status_code == 200:
                return process, url, health.json()["model"]
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not become healthy")


def prompt_text(gguf: Path) -> str:
    """A text of exactly 128 tokens (BOS included where the model adds one) on llama.cpp's tokenizer."""
    from runtimes.base import LoadOptions
    from runtimes.llamacpp import LlamaCppRuntime

    runtime = LlamaCppRuntime(gguf, LoadOptions(threads=1, context_length=512))
    specials = len(runtime.tokenize("x")) - len(runtime.tokenize("x", add_special=False))  # BOS, where added
    text = runtime.detokenize(runtime.tokenize(PROMPT_TEXT, add_special=False)[:PROMPT_TOKENS - specials])
    assert len(runtime.tokenize(text)) == PROMPT_TOKENS, "the prompt does not round-trip to 128 tokens"
    runtime.close()
    return text


def load_run(url: str, model_id: str, clients: int, requests: int) -> dict:
    topics = ["the sea", "a boat", "rain", "the harbour", "gulls", "a net", "the tide", "fish"]

    busy_answers = []

    def one(index: int) -> tuple[int, float]:
        """A client that honours Retry-After, up to 5 tries, as the openai client does."""
        started = time.perf_counter()
        for _ in range(5):
            try:
                response = httpx.post(f"{url}/v1/completions", timeout=120, json={
                    "model": model_id, "prompt": f"A short story about {topics[index % len(topics)]}:",
                    "max_tokens": 16, "temperature": 0})
            except httpx.HTTPError:
                return -1, time.perf_counter() - started
            if response.status_code != 503:
                break
            busy_answers.append(1)
            time.sleep(float(response.headers.get("retry-after", "1")))
        return response.status_code, time.perf_counter() - started

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    statuses: dict[str, int] = {}
    for status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    answered = sorted(latency for status, latency in results if status == 200)
    quantile = (lambda q: answered[min(len(answered) - 1, int(q * len(answered)))]) if answered else (lambda q: 0.0)
    return {"statuses": statuses, "busy_503_seen": len(busy_answers), "p50_s": quantile(0.5),
            "p99_s": quantile(0.99), "wall_s": wall, "answered_per_s": len(answered) / wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=320)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--raw", nargs=3, metavar=("PATH", "THREADS", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.raw:
        print(json.dumps(raw_llama_cpp(Path(args.raw[0]), int(args.raw[1]), int(args.raw[2]), sys.stdin.read())))
        return

    from benchmarks.runtimes import ensure_variants, variant_path
    from edgepack.core.cache import cache_root
    from edgepack.student.demo import demo_student
    from runtimes.base import physical_cores

    threads = args.threads or physical_cores()
    gguf = args.gguf
    if gguf is None:
        model = demo_student()
        root = cache_root() / "bench" / model.name
        ensure_variants(model, root)
        gguf = variant_path(root, model, "gguf-q4_k_m")
    text = prompt_text(gguf)

    server, url, model_id = start_server(gguf, threads)
    try:
        http_stream(url, model_id, text, args.new_tokens)  # warm-up
        ours, raw = [], []
        for _ in range(args.runs):
            ours.append(http_stream(url, model_id, text, args.new_tokens))
            tokens = ours[-1]["tokens"]
            server_proc = psutil.Process(server.pid)
            server_proc.suspend()  # the raw run gets the cores to itself, as the server got them
            try:
                done = subprocess.run([sys.executable, "-m", "benchmarks.server", "--raw", str(gguf), str(threads),
                                       str(tokens)], input=text, capture_output=True, text=True, check=True)
            finally:
                server_proc.resume()
            raw.append(json.loads(done.stdout.strip().splitlines()[-1]))
    finally:
        server.terminate()
        server.wait(timeout=30)
    ours_tps = statistics.median((o["tokens"] - 1) / o["decode_s"] for o in ours)
    raw_tps = statistics.median(r["decode_tps"] for r in raw)
    ours_ttft = statistics.median(o["ttft_s"] for o in ours)
    raw_ttft = statistics.median(r["ttft_s"] for r in raw)

    server, url, model_id = start_server(gguf, threads)
    try:
        rss_before = psutil.Process(server.pid).memory_info().rss
        load = load_run(url, model_id, args.clients, args.requests)
        rss_after = psutil.Process(server.pid).memory_info().rss
    finally:
        server.terminate()
        server.wait(timeout=30)

    result = {"gguf": gguf.name, "threads": threads, "tokens": ours[-1]["tokens"], "http_decode_tps": ours_tps,
              "raw_decode_tps": raw_tps, "ratio": ours_tps / raw_tps, "http_ttft_ms": ours_ttft * 1000,
              "raw_ttft_ms": raw_ttft * 1000, "ttft_overhead_ms": (ours_ttft - raw_ttft) * 1000,
              "load": {**load, "clients": args.clients, "requests": args.requests,
                       "rss_before_mib": rss_before / 2**20, "rss_after_mib": rss_after / 2**20}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{gguf.name}, {threads} threads, {PROMPT_TOKENS}-token prompt, {result['tokens']} new tokens, "
          f"median of {args.runs}\n")
    print("| path | decode t/s | ratio | TTFT ms |")
    print("|---|---|---|---|")
    print(f"| edgepack serve, streaming over HTTP | {ours_tps:.1f} | {ours_tps / raw_tps:.3f}x | "
          f"{ours_ttft * 1000:.1f} |")
    print(f"| llama-cpp-python generate (raw) | {raw_tps:.1f} | 1.000x | {raw_ttft * 1000:.1f} |")
    print(f"\nTTFT overhead of HTTP + server: {(ours_ttft - raw_ttft) * 1000:.1f} ms\n")
    print("| clients | requests | final statuses | 503s answered on the way | p50 s | p99 s | answered/s | "
          "RSS before MiB | RSS after MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {args.clients} | {args.requests} | {json.dumps(load['statuses'])} | {load['busy_503_seen']} | "
          f"{load['p50_s']:.2f} | "
          f"{load['p99_s']:.2f} | {load['answered_per_s']:.1f} | {rss_before / 2**20:.0f} | {rss_after / 2**20:.0f} |")


if __name__ == "__main__":
    main()
