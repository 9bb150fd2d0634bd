"""Load and faults, measured: a server under many clients, and builds killed with SIGKILL at random moments.

    python -m benchmarks.reliability [--part load|kills|hostile|all] [--model DIR] [--clients 32]
                                     [--requests 500] [--kills 10] [--schemas 200] [--prompts 50] [--seed 7] [--json]

Default model: stories260K from ../shared (a 260K-parameter Llama), so the run measures the server and the build,
not the model.
(1) load: `edgepack serve` on the model's gguf-q8_0 in its own process, default queue bound (16). `clients` threads
each send `requests` requests, one after another, with no retry: chat and completions, streaming and not, 8 new
tokens, sampled with a seed. Every answer is checked: a 200 must be a well-formed OpenAI object (a stream: every
event parses, one finish_reason, `[DONE]` last, no error event); a 503 must be the queue-full answer with
Retry-After; anything else is counted as a failure. Latency p50/p99 over all requests (the refused included) and
over the answered; the server's RSS after a warm-up, its peak and at the end.
(2) kills: a build of the model (gguf-q8_0, host) into an output folder that already holds a bundle of an earlier
build (another --context, so the new build replaces it), from an empty stage cache, killed with SIGKILL at a random
moment between its start and its end (the end measured by one unkilled build first). After each kill: the bundle
folder, when present, verifies (the old bundle or the new, never a mix); every leftover partial folder or file fails
to verify; the archive, when present, matches its .sha256. Then the build is run again on the same cache, and its
bundle and archive must verify.
(3) hostile: generated hostile JSON schemas and oversized prompts against one server (benchmarks.hostile_inputs):
no crash, no 5xx, RSS growth and /health's p99 within bounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil

from benchmarks.hostile_inputs import hostile_part, print_hostile
from benchmarks.server import start_server

SHARED_STORIES = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K-hf"
KIND = "gguf-q8_0"
TOPICS = ["the sea", "a boat", "rain", "the harbour", "gulls", "a net", "the tide", "fish"]


# -- (1) load ---------------------------------------------------------------------------------------------------

def request_for(index: int, model_id: str, chat: bool) -> tuple[str, dict]:
    topic = TOPICS[index % len(TOPICS)]
    common = {"model": model_id, "max_tokens": 8, "temperature": 0.8, "seed": index}
    shape = index % 4 if chat else 2 + index % 2
    if shape < 2:
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": f"Tell me about {topic}."}],
                                        "stream": shape == 1}
    return "/v1/completions", {**common, "prompt": f"Once upon a time, {topic}", "stream": shape == 3}


def check_whole(path: str, body: dict) -> str | None:
    """Why a non-streamed 200 is not a well-formed OpenAI answer (None: it is)."""
    chat = path.endswith("chat/completions")
    if body.get("object") != ("chat.completion" if chat else "text_completion") or len(body.get("choices", [])) != 1:
        return "wrong object or choices"
    choice = body["choices"][0]
    text = choice["message"]["content"] if chat else choice["text"]
    usage = body.get("usage", {})
    if not isinstance(text, str) or choice.get("finish_reason") not in ("stop", "length"):
        return "no text or finish_reason"
    if usage.get("total_tokens") != usage.get("prompt_tokens", -1) + usage.get("completion_tokens", -1) or \
            not 0 <= usage["completion_tokens"] <= 8:
        return "usage does not add up"
    return None


def check_stream(text: str) -> str | None:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    if not events or events[-1] != "[DONE]":
        return "no [DONE] at the end"
    finishes = 0
    for event in events[:-1]:
        data = json.loads(event)
        if "error" in data:
            return "an error event"
        finishes += sum(1 for choice in data.get("choices", []) if choice.get("finish_reason"))
    return None if finishes == 1 else f"{finishes} finish_reasons"


def one_request(client: httpx.Client, index: int, model_id: str, chat: bool) -> tuple[str, float]:
    """(outcome, seconds): outcome is "200", "503" (the deliberate refusal) or what was wrong."""
    path, body = request_for(index, model_id, chat)
    started = time.perf_counter()
    try:
        response = client.post(path, json=body)
    except httpx.HTTPError as exc:
        return f"transport error {type(exc).__name__}", time.perf_counter() - started
    seconds = time.perf_counter() - started
    if response.status_code == 503:
        ok = response.headers.get("retry-after") and response.json()["error"]["code"] == "queue_full"
        return ("503" if ok else "malformed 503"), seconds
    if response.status_code != 200:
        return f"status {response.status_code}", seconds
    try:
        problem = check_stream(response.text) if body["stream"] else check_whole(path, response.json())
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"unparsable: {exc}"
    return ("200" if problem is None else f"malformed 200: {problem}"), seconds


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load_part(gguf: Path, clients: int, requests: int, threads: int) -> dict:
    server, url, model_id = start_server(gguf, threads, ["--context", "256"])
    process = psutil.Process(server.pid)
    peak = [0]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], process.memory_info().rss)

    try:
        with httpx.Client(base_url=url, timeout=120) as warm:
            probe = warm.post("/v1/chat/completions", json={"model": model_id, "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "hi"}]})
            chat = probe.status_code == 200  # a model without a chat template gets completions only
            for index in range(16):  # the engine and the server's first allocations
                one_request(warm, index, model_id, chat)
        rss_warm = process.memory_info().rss
        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()

        def client_run(client_index: int) -> list[tuple[str, float]]:
            with httpx.Client(base_url=url, timeout=120) as client:
                return [one_request(client, client_index * requests + n, model_id, chat) for n in range(requests)]

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [row for rows in pool.map(client_run, range(clients)) for row in rows]
        wall = time.perf_counter() - started
        done.set()
        sampler.join()
        rss_end = process.memory_info().rss
        alive = httpx.get(f"{url}/health", timeout=5).status_code
    finally:
        done.set()
        server.terminate()
        server.wait(timeout=30)
    outcomes: dict[str, int] = {}
    for outcome, _ in results:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    answered = [seconds for outcome, seconds in results if outcome == "200"]
    every = [seconds for _, seconds in results]
    return {"model": gguf.name, "chat": chat, "clients": clients, "requests_each": requests, "total": len(results),
            "outcomes": outcomes, "wall_s": wall, "answered_per_s": len(answered) / wall,
            "p50_all_s": quantile(every, 0.5), "p99_all_s": quantile(every, 0.99),
            "p50_answered_s": quantile(answered, 0.5), "p99_answered_s": quantile(answered, 0.99),
            "rss_warm_mib": rss_warm / 2**20, "rss_peak_mib": max(peak[0], rss_end) / 2**20,
            "rss_end_mib": rss_end / 2**20, "health_after": alive}


# -- (2) kills ---------------------------------------------------------------------------------------------------

def build_command(model: Path, out: Path, context: int) -> list[str]:
    return [sys.executable, "-m", "edgepack", "build", str(model), "--target", "host", "--formats", KIND,
            "--context", str(context), "--out", str(out), "--json"]


def run_build(model: Path, out: Path, context: int, cache: Path) -> float:
    started = time.perf_counter()
    subprocess.run(build_command(model, out, context), env={**os.environ, "EDGEPACK_CACHE": str(cache)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def verifies(path: Path) -> bool:
    from edgepack.bundle.verify import verify_bundle
    from edgepack.core.errors import EdgepackError

    try:
        verify_bundle(path)
        return True
    except (EdgepackError, OSError, ValueError):
        return False


def archive_matches(archive: Path) -> bool | None:
    from edgepack.core.fileio import sha256_file

    checksum = Path(f"{archive}.sha256")
    if not archive.exists() or not checksum.exists():
        return None
    return checksum.read_text().split()[0] == sha256_file(archive)


def last_stage(stderr: str) -> str:
    steps = [line.strip() for line in stderr.splitlines() if line.strip().startswith("[")]
    return steps[-1][:40] if steps else "starting"


def kills_part(model: Path, kills: int, seed: int) -> dict:
    rng = random.Random(seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-kills-") as scratch:
        scratch_dir = Path(scratch)
        out = scratch_dir / "dist"
        contexts = (128, 256)
        full_s = run_build(model, out, contexts[1], scratch_dir / "cache-first")  # the bundle a trial replaces
        name = next(p.name for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))
        for trial in range(kills):
            context = contexts[trial % 2]
            cache = scratch_dir / f"cache-{trial}"
            at = rng.uniform(0.3, 0.95 * full_s)
            with tempfile.TemporaryFile() as stderr:
                build = subprocess.Popen(build_command(model, out, context), stdout=subprocess.DEVNULL,
                                         stderr=stderr, env={**os.environ, "EDGEPACK_CACHE": str(cache)})
                try:
                    build.wait(timeout=at)
                    finished_first = True
                    full_s = min(full_s, at)  # builds got quicker (a warmer machine): later kills come sooner
                except subprocess.TimeoutExpired:
                    finished_first = False
                    for child in psutil.Process(build.pid).children(recursive=True):
                        child.kill()  # a scoring or measuring child dies with its build, as under the OOM killer
                    os.kill(build.pid, signal.SIGKILL)
                    build.wait()
                stderr.seek(0)
                stage = last_stage(stderr.read().decode(errors="replace"))
            bundle = out / name
            leftovers = [p for p in out.iterdir() if p.name.startswith(".") and "partial" in p.name]
            row = {"trial": trial, "kill_at_s": round(at, 2), "stage": "finished" if finished_first else stage,
                   "bundle_present": bundle.is_dir(), "bundle_verifies": verifies(bundle) if bundle.is_dir() else None,
                   "partials": len(leftovers), "partials_verifying": sum(verifies(p) for p in leftovers),
                   "archive_matches": archive_matches(out / f"{name}.tar.gz")}
            run_build(model, out, context, cache)
            row["rerun_bundle_verifies"] = verifies(bundle)
            row["rerun_archive_verifies"] = verifies(out / f"{name}.tar.gz") and archive_matches(
                out / f"{name}.tar.gz")
            rows.append(row)
            shutil.rmtree(cache, ignore_errors=True)
    good = all(r["bundle_verifies"] in (True, None) and r["partials_verifying"] == 0 and r["archive_matches"]
               in (True, None) and r["rerun_bundle_verifies"] and r["rerun_archive_verifies"] for r in rows)
    return {"full_build_s": full_s, "trials": rows, "all_good": good}


# -- report ---------------------------------------------------------------------------------------------------------

def print_load(result: dict) -> None:
    kinds = "chat and completions" if result["chat"] else "completions (the model has no chat template)"
    print(f"load: {result['clients']} clients x {result['requests_each']} requests on {result['model']}: {kinds}, "
          f"streamed and not, 8 new tokens each, queue bound 16, no retries; {result['wall_s']:.0f} s\n")
    print("| outcome | requests |")
    print("|---|---|")
    for outcome, count in sorted(result["outcomes"].items()):
        print(f"| {outcome} | {count} |")
    print(f"\n| latency | p50 s | p99 s |\n|---|---|---|\n| all requests (503s included) | "
          f"{result['p50_all_s']:.3f} | {result['p99_all_s']:.3f} |\n| answered (200) | "
          f"{result['p50_answered_s']:.3f} | {result['p99_answered_s']:.3f} |")
    print(f"\nanswered/s {result['answered_per_s']:.1f}; server RSS after warm-up {result['rss_warm_mib']:.1f} MiB, "
          f"peak {result['rss_peak_mib']:.1f} MiB, end {result['rss_end_mib']:.1f} MiB; /health after: "
          f"{result['health_after']}\n")


def print_kills(result: dict) -> None:
    print(f"kills: one build takes {result['full_build_s']:.1f} s unkilled; SIGKILL at a random moment, then rerun\n")
    print("| trial | killed at s | during | bundle there | it verifies | partials left | partials verifying | "
          "archive = .sha256 | rerun bundle verifies | rerun archive verifies |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["trials"]:
        print(f"| {r['trial']} | {r['kill_at_s']} | {r['stage']} | {r['bundle_present']} | {r['bundle_verifies']} | "
              f"{r['partials']} | {r['partials_verifying']} | {r['archive_matches']} | "
              f"{r['rerun_bundle_verifies']} | {r['rerun_archive_verifies']} |")
    print(f"\nall good: {result['all_good']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("load", "kills", "hostile", "all"), default="all")
    parser.add_argument("--model", type=Path, default=SHARED_STORIES)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=500, help="per client")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--schemas", type=int, default=200, help="hostile: generated schemas")
    parser.add_argument("--prompts", type=int, default=50, help="hostile: oversized prompts")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        parser.error(f"{args.model} is not a Hugging Face model folder (config.json missing); pass --model DIR")

    from converters.registry import ConvertOptions
    from edgepack.convert.stage import convert
    from runtimes.base import physical_cores

    result: dict = {}
    if args.part in ("load", "all"):
        with tempfile.TemporaryDirectory(prefix="edgepack-bench-load-") as scratch:
            variant = convert(args.model, [KIND], Path(scratch), ConvertOptions(show_progress=False))[0]
            result["load"] = load_part(variant.path, args.clients, args.requests, args.threads or physical_cores())
    if args.part in ("kills", "all"):
        result["kills"] = kills_part(args.model, args.kills, args.seed)
    if args.part in ("hostile", "all"):
        with tempfile.TemporaryDirectory(prefix="edgepack-bench-hostile-") as scratch:
            variant = convert(args.model, [KIND], Path(scratch), ConvertOptions(show_progress=False))[0]
            result["hostile"] = hostile_part(variant.path, args.threads or physical_cores(), args.schemas,
                                             args.prompts, args.seed)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    if "load" in result:
        print_load(result["load"])
    if "kills" in result:
        print_kills(result["kills"])
    if "hostile" in result:
        print_hostile(result["hostile"])


if __name__ == "__main__":
    main()
