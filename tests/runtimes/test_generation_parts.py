"""The shared generation pieces on their own: sampling, stop strings, incremental decoding."""

from __future__ import annotations

import numpy as np
import pytest

from runtimes.sampling import Sampler, log_softmax
from runtimes.token_stream import IncrementalDecoder, StopMatcher


def test_greedy_and_degenerate_sampling_pick_the_argmax():
    logits = np.array([0.1, 3.0, 2.9, -1.0])
    assert Sampler().pick(logits) == 1
    assert Sampler(temperature=1.0, top_k=1, seed=0).pick(logits) == 1
    assert Sampler(temperature=1.0, top_p=0.01, seed=0).pick(logits) == 1


def test_sampling_follows_the_distribution():
    logits = np.log(np.array([0.7, 0.2, 0.1]))
    sampler = Sampler(temperature=1.0, seed=3)
    counts = np.bincount([sampler.pick(logits) for _ in range(4000)], minlength=3) / 4000
    assert counts == pytest.approx([0.7, 0.2, 0.1], abs=0.03)
    nucleus = Sampler(temperature=1.0, top_p=0.75, seed=3)
    assert {nucleus.pick(logits) for _ in range(500)} == {0, 1}  # 0.7 < 0.75, so the nucleus is {0, 1}


def test_log_softmax():
    values = log_softmax(np.array([1.0, 2.0, 3.0]))
    assert np.exp(values).sum() == pytest.approx(1.0)
    assert values[2] == pytest.approx(3.0 - np.log(np.exp([1.0, 2.0, 3.0]).sum()))


def test_stop_string_split_across_pieces_is_never_emitted():
    matcher = StopMatcher(["STOP"])
    emitted = []
    for piece in ["Hello S", "TO", "P and more"]:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            break
    assert stopped and "".join(emitted) == "Hello "


def test_held_back_prefix_is_released_when_no_stop_follows():
    matcher = StopMatcher(["STOP"])
    out = [matcher.feed("abc ST")[0], matcher.feed("ar")[0], matcher.flush()]
    assert "".join(out) == "abc STar" and out[0] == "abc "


def test_incremental_decoder_holds_partial_utf8():
    # one token per byte: the worst case for multi-byte characters
    data = "añ🙂b".encode()

    def detokenize(ids):
        return bytes(ids).decode("utf-8", errors="replace")

    decoder = IncrementalDecoder(detokenize, [])
    pieces = [decoder.add(byte) for byte in data]
    assert pieces == ["a", "", "ñ", "", "", "", "🙂", "b"]


def reference_stop_feed(pending: str, text: str, stops: list[str]) -> tuple[str, str, bool]:
    """The stop rule stated plainly (quadratic, for checking): cut at the earliest start of any stop in the text
    held back plus the new text; else hold back the longest end of it that begins some stop."""
    pending += text
    starts = [pending.find(stop) for stop in stops if stop in pending]
    if starts:
        return pending[:min(starts)], "", True
    keep = max((n for stop in stops for n in range(1, len(stop)) if pending.endswith(stop[:n])), default=0)
    return pending[:len(pending) - keep], pending[len(pending) - keep:], False


def test_stop_matching_agrees_with_the_plain_rule_on_random_streams():
    rng = np.random.default_rng(0)
    alphabet = "ab<|>"
    for _ in range(400):
        stops = ["".join(rng.choice(list(alphabet), size=int(rng.integers(1, 6))))
                 for _ in range(int(rng.integers(1, 4)))]
        matcher, pending, expected, got = StopMatcher(stops), "", [], []
        for _ in range(int(rng.integers(1, 12))):
            piece = "".join(rng.choice(list(alphabet), size=int(rng.integers(0, 5))))
            out, pending, stopped = reference_stop_feed(pending, piece, stops)
            expected.append(out)
            mine, mine_stopped = matcher.feed(piece)
            got.append(mine)
            assert mine_stopped == stopped, (stops, expected, got)
            if stopped:
                break
        assert got == expected, (stops, expected, got)


def test_a_long_stop_string_is_matched_across_many_pieces():
    stop = "ab" * 128  # 256 characters, the server's limit
    matcher = StopMatcher([stop])
    emitted = [matcher.feed("x" + "ab" * 127 + "a")[0]]  # one character short, with a near miss before it
    assert emitted == ["x"]
    out, stopped = matcher.feed("b tail")
    assert stopped and out == ""
