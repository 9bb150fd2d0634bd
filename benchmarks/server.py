"""The server under the loads users put on it, against llama-cpp-python's own OpenAI server on the same GGUF.

    python -m benchmarks.server [--gguf FILE] [--threads N] [--parallel 4] [--runs 5] [--json]
                                [--clients 32] [--requests 500] [--schema-requests 100]

Default file: the demo student's Q4_K_M (made once under the cache, as benchmarks.runtimes does). Every server
runs in a process of its own with the same threads and a 2,048-token context per sequence.
(1) One client: a streamed completion of a 128-token prompt, `--new-tokens` tokens, against `python -m
    llama_cpp.server` (llama-cpp-python[server]) on the same file, the two servers suspended in turn so each has
    the cores alone, alternating, median of `runs`; greedy, and sampled at temperature 0.8 with top_p 0.95 and a
    seed (both servers told top_k 0, min_p 0 and repeat_penalty 1, so they sample the same distribution).
(2) Concurrent streams: 1, 4 and 16 clients each stream 64 tokens of a prompt of their own at once; aggregate decode
    t/s (all tokens over the time from the first request to the last token) and p50/p99 time to first token.
(3) Prefix cache: a chat of ~1,000 tokens is answered, then a follow-up turn is asked; its time to first token
    against the same follow-up of a conversation the server has never seen (cold), median of 3.
(4) Load: `clients` threads send `requests` short completions in all (16 new tokens each); a client answered 503
    waits Retry-After and tries again (up to 5 tries). Final statuses, the 503s on the way, answers/s.
(5) Structured output: `schema-requests` chat requests spread over 5 JSON schemas (nested objects, enums, arrays),
    each answer parsed and validated with `jsonschema`.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from edgepack.measure.profiler import PROMPT_TEXT

PROMPT_TOKENS = 128
CONTEXT = 2048
SAMPLED = {"temperature": 0.8, "top_p": 0.95, "seed": 1234}
# llama_cpp.server's defaults add top-k 40, min-p 0.05 and a repeat penalty of 1.1; these turn them off
LLAMA_CPP_SERVER_SAME_SAMPLING = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0}
TOPICS = ["the sea", "a boat", "rain", "the harbour", "gulls", "a net", "the tide", "fish", "a lighthouse", "sails",
          "the storm", "a map", "the pier", "an island", "the wind", "a shell"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    model_id: str

    def suspended(self):
        return _suspended(self.process.pid)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextmanager
def _suspended(pid: int):
    process = psutil.Process(pid)
    process.suspend()
    try:
        yield
    finally:
        process.resume()


def wait_healthy(process: subprocess.Popen, url: str, health_path: str) -> httpx.Response:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}")
        try:
            answer = httpx.get(f"{url}{health_path}", timeout=2)
            if answer.status_code == 200:
                return answer
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"the server at {url} did not become healthy")


def start_server(gguf: Path, threads: int, extra: list[str] | None = None) -> tuple[subprocess.Popen, str, str]:
    """`edgepack serve` in its own process; (process, url, model id) once /health says it is ready."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "edgepack", "serve", str(gguf), "--port", str(port),
                                "--threads", str(threads), "--context", str(CONTEXT), *(extra or [])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    return process, url, wait_healthy(process, url, "/health").json()["model"]


def start_llama_cpp_server(gguf: Path, threads: int) -> Server:
    """llama-cpp-python's own server (its default: one sequence at a time), loaded safely on AMX CPUs."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.server", "--llama-cpp-server", str(gguf),
                                str(threads), str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_healthy(process, url, "/v1/models")
    return Server(process, url, gguf.name)


def run_llama_cpp_server(gguf: str, threads: str, port: str) -> None:
    from llama_cpp.server.__main__ import main as llama_cpp_server_main

    from runtimes.llamacpp_amx import safe_model_loading

    sys.argv = ["llama_cpp.server", "--model", gguf, "--n_threads", threads, "--n_threads_batch", threads,
                "--n_ctx", str(CONTEXT), "--port", port, "--host", "127.0.0.1", "--verbose", "False"]
    with safe_model_loading():
        llama_cpp_server_main()


def prompt_text(gguf: Path) -> tuple[str, dict[str, float]]:
    """A text of exactly 128 tokens (BOS included where the model adds one) on llama.cpp's tokenizer, and the
    logit bias that bans the model's end-of-generation tokens (so that every run makes the tokens asked for)."""
    from runtimes.base import LoadOptions
    from runtimes.llamacpp import LlamaCppRuntime

    runtime = LlamaCppRuntime(gguf, LoadOptions(threads=1, context_length=512))
    specials = len(runtime.tokenize("x")) - len(runtime.tokenize("x", add_special=False))  # BOS, where added
    text = runtime.detokenize(runtime.tokenize(PROMPT_TEXT, add_special=False)[:PROMPT_TOKENS - specials])
    assert len(runtime.tokenize(text)) == PROMPT_TOKENS, "the prompt does not round-trip to 128 tokens"
    no_end = {str(token): -100.0 for token in runtime.eos_token_ids}
    runtime.close()
    return text, no_end


@dataclass
class Stream:
    sent: float
    arrivals: list[float]  # when each piece of content arrived
    tokens: int

    @property
    def first(self) -> float:
        return self.arrivals[0]

    @property
    def last(self) -> float:
        return self.arrivals[-1]

    @property
    def ttft_s(self) -> float:
        return self.first - self.sent

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / (self.last - self.first)


def stream_completion(url: str, body: dict, chat: bool = False) -> Stream:
    """One streamed request; the times of the first and last content, and the tokens made (usage)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    arrivals: list[float] = []
    tokens = None
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=300) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices"):
                choice = data["choices"][0]
                text = choice["delta"].get("content") if chat else choice.get("text")
                if text:
                    arrivals.append(time.perf_counter())
    return Stream(sent, arrivals, tokens if tokens is not None else len(arrivals))


def one_client_against_llama_cpp_server(ours: Server, theirs: Server, text: str, no_end: dict[str, float],
                                        new_tokens: int, runs: int) -> dict:
    results = {}
    for name, sampling in (("greedy", {"temperature": 0}), ("sampled", SAMPLED)):
        body = {"prompt": text, "max_tokens": new_tokens, "logit_bias": no_end, **sampling}
        figures: dict[str, list[Stream]] = {"edgepack": [], "llama_cpp.server": []}
        for server in (ours, theirs):  # warm-up
            stream_completion(server.url, {**body, "model": server.model_id, **_extra(server, theirs)})
        for _ in range(runs):
            for server, other in ((ours, theirs), (theirs, ours)):
                with other.suspended():
                    figures["edgepack" if server is ours else "llama_cpp.server"].append(
                        stream_completion(server.url, {**body, "model": server.model_id, **_extra(server, theirs)}))
        results[name] = {key: {"decode_tps": statistics.median(s.decode_tps for s in streams),
                               "ttft_ms": statistics.median(s.ttft_s for s in streams) * 1000,
                               "tokens": streams[-1].tokens} for key, streams in figures.items()}
        results[name]["ratio"] = results[name]["edgepack"]["decode_tps"] / results[name]["llama_cpp.server"][
            "decode_tps"]
    return results


def _extra(server: Server, llama_cpp_server: Server) -> dict:
    return LLAMA_CPP_SERVER_SAME_SAMPLING if server is llama_cpp_server else {}


def concurrent_streams(server: Server, text: str, no_end: dict[str, float], clients: int, parallel: int,
                       rounds: int = 2) -> dict:
    """`clients` streams at once, each its own prompt, over `rounds`: aggregate decode t/s (the tokens of all streams
    while as many decode as can at once, over that time), the same over whole requests (first request sent to the
    last token: prompts and queueing included), and TTFT quantiles."""
    aggregates, decodes, ttfts = [], [], []
    for round_index in range(rounds):
        bodies = [{"model": server.model_id, "prompt": f"{TOPICS[(i + round_index) % len(TOPICS)]} {i}: " + text,
                   "max_tokens": 64, "temperature": 0, "logit_bias": no_end} for i in range(clients)]
        barrier = threading.Barrier(clients)

        def one(body: dict, barrier: threading.Barrier = barrier) -> Stream:
            barrier.wait()  # all clients send at once
            return stream_completion(server.url, body)

        with ThreadPoolExecutor(clients) as pool:
            streams = list(pool.map(one, bodies))
        start = min(s.sent for s in streams)
        end = max(s.last for s in streams)
        aggregates.append(sum(s.tokens for s in streams) / (end - start))
        decodes.append(_decode_rate_with_slots_full(streams, min(clients, parallel)))
        ttfts += [s.ttft_s for s in streams]
    ttfts.sort()
    return {"clients": clients, "aggregate_tps": statistics.median(aggregates),
            "decode_tps": statistics.median(decodes),
            "ttft_p50_ms": _quantile(ttfts, 0.5) * 1000, "ttft_p99_ms": _quantile(ttfts, 0.99) * 1000}


def _decode_rate_with_slots_full(streams: list[Stream], full: int) -> float:
    """Tokens per second of all streams together over the times when at least `full` of them were decoding (between
    their first and last token): the engine's batched decode rate, without the time spent reading prompts alone."""
    edges = sorted([(s.first, 1) for s in streams] + [(s.last, -1) for s in streams])
    windows, active, opened = [], 0, None
    for at, change in edges:
        active += change
        if active >= full and opened is None:
            opened = at
        elif active < full and opened is not None:
            windows.append((opened, at))
            opened = None
    length = sum(end - start for start, end in windows)
    tokens = sum(start < t <= end for s in streams for t in s.arrivals[1:] for start, end in windows)
    return tokens / length if length > 0 else 0.0


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def conversation(seed: int, target_tokens: int = 1000) -> list[dict]:
    """A chat of about `target_tokens` tokens on the demo's tokenizer, distinct from its first words on."""
    topic = TOPICS[seed % len(TOPICS)]
    messages = [{"role": "system", "content": f"Conversation {seed}. You help a sailor who asks about {topic}."}]
    filler = PROMPT_TEXT.split(". ")
    turn = 0
    while sum(len(m["content"]) for m in messages) < target_tokens * 4.2:  # ~4.2 characters a token in English
        messages.append({"role": "user", "content": f"Question {turn} about {topic}: {filler[turn % len(filler)]}?"})
        messages.append({"role": "assistant", "content": ". ".join(filler[turn % len(filler):][:3]) + "."})
        turn += 1
    return messages + [{"role": "user", "content": f"Tell me one more thing about {topic}."}]


def prefix_cache(server: Server, repeats: int = 3) -> dict:
    warm, cold, prompt_tokens = [], [], []
    for index in range(repeats):
        first = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
            "model": server.model_id, "messages": conversation(index), "max_tokens": 24, "temperature": 0}).json()
        prompt_tokens.append(first["usage"]["prompt_tokens"])
        follow_up = conversation(index) + [first["choices"][0]["message"],
                                           {"role": "user", "content": "And why is that?"}]
        warm.append(stream_completion(server.url, {"model": server.model_id, "messages": follow_up, "max_tokens": 8,
                                                   "temperature": 0}, chat=True).ttft_s)
        unseen = conversation(100 + index) + [first["choices"][0]["message"],
                                              {"role": "user", "content": "And why is that?"}]
        cold.append(stream_completion(server.url, {"model": server.model_id, "messages": unseen, "max_tokens": 8,
                                                   "temperature": 0}, chat=True).ttft_s)
    return {"conversation_tokens": statistics.median(prompt_tokens), "warm_ttft_ms": statistics.median(warm) * 1000,
            "cold_ttft_ms": statistics.median(cold) * 1000,
            "ratio": statistics.median(warm) / statistics.median(cold)}


def load_run(url: str, model_id: str, clients: int, requests: int) -> dict:
    busy_answers = []

    def one(index: int) -> tuple[int, float]:
        """A client that honours Retry-After, up to 5 tries, as the openai client does."""
        started = time.perf_counter()
        for _ in range(5):
            try:
                response = httpx.post(f"{url}/v1/completions", timeout=300, json={
                    "model": model_id, "prompt": f"A short story about {TOPICS[index % len(TOPICS)]}:",
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
    return {"statuses": statuses, "busy_503_seen": len(busy_answers), "p50_s": _quantile(answered, 0.5),
            "p99_s": _quantile(answered, 0.99), "wall_s": wall, "answered_per_s": len(answered) / wall}


SCHEMAS = {
    "person": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3}},
        "required": ["name", "age", "hobbies"]},
    "weather": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "sky": {"enum": ["sunny", "cloudy", "rainy", "snowy"]},
        "celsius": {"type": "number"}}, "required": ["city", "sky", "celsius"]},
    "order": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "product": {"type": "string", "maxLength": 30}, "quantity": {"type": "integer"}},
            "required": ["product", "quantity"]}, "minItems": 1, "maxItems": 3},
        "express": {"type": "boolean"}}, "required": ["items", "express"]},
    "address": {"type": "object", "properties": {
        "street": {"type": "string", "maxLength": 40}, "town": {"type": "string", "maxLength": 30},
        "location": {"type": "object", "properties": {"lat": {"type": "number"}, "lon": {"type": "number"}},
                     "required": ["lat", "lon"]}}, "required": ["street", "town", "location"]},
    "review": {"type": "object", "properties": {
        "stars": {"enum": [1, 2, 3, 4, 5]}, "summary": {"type": "string", "maxLength": 60},
        "tags": {"type": "array", "items": {"enum": ["price", "quality", "service", "delivery"]}, "maxItems": 4}},
        "required": ["stars", "summary", "tags"]},
}
SCHEMA_PROMPTS = {
    "person": "Describe a person as JSON: name, age and hobbies.",
    "weather": "Give today's weather for a city as JSON.",
    "order": "Write a small shop order as JSON.",
    "address": "Give a postal address with its coordinates as JSON.",
    "review": "Write a short product review as JSON.",
}


def structured_output(server: Server, requests: int, clients: int = 4) -> dict:
    import jsonschema

    names = list(SCHEMAS)

    def one(index: int) -> tuple[str, str, str, int]:
        name = names[index % len(names)]
        answer = httpx.post(f"{server.url}/v1/chat/completions", timeout=300, json={
            "model": server.model_id, "messages": [{"role": "user", "content": SCHEMA_PROMPTS[name]}],
            "max_tokens": 256, "temperature": 0.7, "seed": index,
            "response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}}})
        answer.raise_for_status()
        body = answer.json()
        choice = body["choices"][0]
        try:
            jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMAS[name])
            verdict = "valid"
        except json.JSONDecodeError:
            verdict = "not JSON"
        except jsonschema.ValidationError:
            verdict = "invalid"
        return name, verdict, choice["finish_reason"], body["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    verdicts: dict[str, int] = {}
    for _, verdict, finish, _ in answers:
        key = verdict if finish == "stop" else f"{verdict} (finish {finish})"
        verdicts[key] = verdicts.get(key, 0) + 1
    return {"requests": requests, "schemas": len(SCHEMAS), "verdicts": verdicts,
            "tokens_per_s": sum(a[3] for a in answers) / wall, "wall_s": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--schema-requests", type=int, default=100)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--llama-cpp-server", nargs=3, metavar=("GGUF", "THREADS", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_cpp_server:
        run_llama_cpp_server(*args.llama_cpp_server)
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
    text, no_end = prompt_text(gguf)

    ours = Server(*start_server(gguf, threads, ["--parallel", str(args.parallel)]))
    theirs = start_llama_cpp_server(gguf, threads)
    try:
        with theirs.suspended():
            ours_rss = psutil.Process(ours.process.pid).memory_info().rss
        one_client = one_client_against_llama_cpp_server(ours, theirs, text, no_end, args.new_tokens, args.runs)
    finally:
        theirs.stop()
    try:
        streams = [concurrent_streams(ours, text, no_end, clients, args.parallel) for clients in (1, 4, 16)]
        cache = prefix_cache(ours)
        structured = structured_output(ours, args.schema_requests)
        load = load_run(ours.url, ours.model_id, args.clients, args.requests)
        rss_after = psutil.Process(ours.process.pid).memory_info().rss
    finally:
        ours.stop()

    result = {"gguf": gguf.name, "threads": threads, "parallel": args.parallel, "one_client": one_client,
              "streams": streams, "prefix_cache": cache, "structured": structured,
              "load": {**load, "clients": args.clients, "requests": args.requests,
                       "rss_start_mib": ours_rss / 2**20, "rss_end_mib": rss_after / 2**20}}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print_tables(result, args)


def print_tables(result: dict, args: argparse.Namespace) -> None:
    print(f"{result['gguf']}, {result['threads']} threads, --parallel {result['parallel']}, {CONTEXT}-token context "
          f"per sequence\n")
    print(f"One client, {PROMPT_TOKENS}-token prompt, {args.new_tokens} new tokens, median of {args.runs}:\n")
    print("| sampling | edgepack t/s | llama_cpp.server t/s | ratio | edgepack TTFT ms | llama_cpp.server TTFT ms |")
    print("|---|---|---|---|---|---|")
    for name, label in (("greedy", "temperature 0"), ("sampled", "temperature 0.8, top_p 0.95")):
        row = result["one_client"][name]
        print(f"| {label} | {row['edgepack']['decode_tps']:.1f} | {row['llama_cpp.server']['decode_tps']:.1f} | "
              f"{row['ratio']:.2f}x | {row['edgepack']['ttft_ms']:.0f} | {row['llama_cpp.server']['ttft_ms']:.0f} |")
    single = result["streams"][0]
    print(f"\nConcurrent streams (64 tokens each after a {PROMPT_TOKENS}-token prompt of their own); decode: tokens of "
          "all streams while as many decode as the server runs at once, over that time; whole: all tokens from the "
          "first request to the last token:\n")
    print("| clients | aggregate decode t/s | vs 1 client | whole requests t/s | vs 1 client | TTFT p50 ms | "
          "TTFT p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for row in result["streams"]:
        print(f"| {row['clients']} | {row['decode_tps']:.1f} | {row['decode_tps'] / single['decode_tps']:.2f}x | "
              f"{row['aggregate_tps']:.1f} | {row['aggregate_tps'] / single['aggregate_tps']:.2f}x | "
              f"{row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} |")
    cache = result["prefix_cache"]
    print(f"\nFollow-up turn over a {cache['conversation_tokens']:.0f}-token conversation: TTFT "
          f"{cache['warm_ttft_ms']:.0f} ms with the prefix cached, {cache['cold_ttft_ms']:.0f} ms cold "
          f"({cache['ratio']:.2f}x)")
    structured = result["structured"]
    print(f"\nStructured output: {structured['requests']} requests over {structured['schemas']} JSON schemas: "
          f"{json.dumps(structured['verdicts'])}, {structured['tokens_per_s']:.1f} t/s over 4 clients")
    load = result["load"]
    print("\n| clients | requests | final statuses | 503s answered on the way | p50 s | p99 s | answered/s | "
          "RSS start MiB | RSS end MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {load['clients']} | {load['requests']} | {json.dumps(load['statuses'])} | {load['busy_503_seen']} | "
          f"{load['p50_s']:.2f} | {load['p99_s']:.2f} | {load['answered_per_s']:.1f} | {load['rss_start_mib']:.0f} | "
          f"{load['rss_end_mib']:.0f} |")


if __name__ == "__main__":
    main()
