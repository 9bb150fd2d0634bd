"""Anchor measurement: an onnxruntime-genai model folder run by its own Generator.

Run with a Python that has onnxruntime-genai installed (not the edgepack venv):

    python benchmarks/genai_anchor.py MODEL_DIR --prompt-tokens 128 --new-tokens 64 \
        --runs 5 --threads 2 [--token-ids FILE] [--dump-logits FILE]

Imports only onnxruntime_genai, numpy and the standard library. Prints one JSON
object on stdout. Generation is greedy and does not stop at EOS: min_length is
set to max_length, which makes the search mask EOS until then.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import numpy as np
import onnxruntime_genai as og

TEXT = (
    "The history of computing is a story of people trying to make machines do "
    "arithmetic faster and more reliably than any clerk could. Early mechanical "
    "calculators used gears and levers, and later designs replaced them with "
    "relays, vacuum tubes and finally transistors. Each step made the machines "
    "smaller, cheaper and more dependable, and each step changed who could use "
    "them. Today a phone in a pocket holds more memory than the rooms full of "
    "equipment that once guided spacecraft, and small language models can run "
    "on an ordinary laptop without any network connection at all. "
)


def load_model(model_dir: str, threads: int):
    cfg = og.Config(model_dir)
    cfg.clear_providers()  # plain CPU execution provider
    overlay = {"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}
    cfg.overlay(json.dumps(overlay))
    return og.Model(cfg)


def prompt_ids(model, n: int, path: str | None) -> list[int]:
    if path:
        with open(path) as f:
            ids = [int(t) for t in json.load(f)]
        return ids[:n]
    tok = og.Tokenizer(model)
    ids: list[int] = []
    text = TEXT
    while len(ids) < n:
        ids = [int(t) for t in tok.encode(text)]
        text += TEXT
    return ids[:n]


def one_run(model, ids: list[int], new_tokens: int, dump_logits: str | None = None):
    total = len(ids) + new_tokens + 8
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=total, min_length=total)
    gen = og.Generator(model, params)
    prompt = np.asarray(ids, dtype=np.int32)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)  # runs the prompt through the model
    if dump_logits:  # only in the untimed warm-up
        logits = np.asarray(gen.get_output("logits"), dtype=np.float32)
        np.save(dump_logits, logits.reshape(-1, logits.shape[-1])[-1])
    gen.generate_next_token()  # picks the first token from the prefill logits
    t1 = time.perf_counter()
    out = [int(gen.get_next_tokens()[0])]
    early = False
    for _ in range(new_tokens - 1):
        if gen.is_done():
            early = True
            break
        gen.generate_next_token()  # one decode step
        out.append(int(gen.get_next_tokens()[0]))
    t2 = time.perf_counter()
    del gen
    return t1 - t0, t2 - t1, out, early


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--token-ids", help="JSON list of prompt token ids")
    ap.add_argument("--dump-logits", help="write last-position prompt logits (.npy)")
    a = ap.parse_args(argv)
    if a.new_tokens < 2:
        ap.error("--new-tokens must be at least 2")

    t = time.perf_counter()
    model = load_model(a.model_dir, a.threads)
    load_s = time.perf_counter() - t
    ids = prompt_ids(model, a.prompt_tokens, a.token_ids)

    # Warm-up (not timed); also the place where logits are dumped.
    _, _, warm_out, _ = one_run(model, ids, a.new_tokens, a.dump_logits)

    pre, dec, early_any = [], [], False
    for _ in range(a.runs):
        tp, td, out, early = one_run(model, ids, a.new_tokens)
        early_any |= early
        pre.append(len(ids) / tp)
        dec.append((len(out) - 1) / td if len(out) > 1 else 0.0)

    res = {
        "prefill_tps": round(statistics.median(pre), 2),
        "decode_tps": round(statistics.median(dec), 2),
        "decode_min": round(min(dec), 2),
        "decode_max": round(max(dec), 2),
        "load_s": round(load_s, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "threads": a.threads,
        "prompt_tokens": len(ids),
        "new_tokens": a.new_tokens,
        "runs": a.runs,
        "stopped_early": early_any,
        "first_generated": warm_out[:8],
    }
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
