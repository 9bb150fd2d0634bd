"""Selection on synthetic reports: every rejection reason, ties, preferences, nothing fits."""

from __future__ import annotations

import pytest

from edgepack.core.artifacts import Candidate
from edgepack.core.errors import EdgepackError, NothingFitsError, NothingPassedError
from edgepack.select import select

MIB = 2**20


def candidate(name, *, mib, tps, kld=0.01, passed=True, reasons=(), need_mib=None, measured=True):
    return Candidate(name=name, bytes=mib * MIB, passed_gate=passed, gate_reasons=tuple(reasons), kld_mean=kld,
                     ppl_ratio=1.0 + kld, memory_bytes=(need_mib or mib + 50) * MIB, decode_tps=tps,
                     measured=measured)


F16 = candidate("gguf-f16", mib=260, tps=55.0, kld=0.00001)
Q8 = candidate("gguf-q8_0", mib=140, tps=85.0, kld=0.003)
Q4 = candidate("gguf-q4_k_m", mib=100, tps=97.0, kld=0.043, passed=False, reasons=("perplexity +6.30% > +5.00%",))
INT8 = candidate("onnx-int8", mib=240, tps=53.0, kld=0.06, need_mib=900)


def test_gate_then_budget_then_fastest():
    decision = select([F16, Q8, Q4, INT8], budget_bytes=500 * MIB)
    assert decision.chosen == "gguf-q8_0"
    reasons = {r.name: (r.reason, r.detail) for r in decision.rejected}
    assert reasons["gguf-q4_k_m"] == ("gate", "perplexity +6.30% > +5.00%")
    assert reasons["onnx-int8"] == ("does not fit", "needs 900 MiB (measured), budget 500 MiB")
    assert reasons["gguf-f16"] == ("slower", "55.0 t/s vs 85.0 t/s for gguf-q8_0")
    assert [r.name for r in decision.rejected] == ["gguf-f16", "gguf-q4_k_m", "onnx-int8"]  # input order
    assert "needs 190 MiB of 500 MiB, 85.0 t/s (measured)" in decision.why


def test_a_tie_in_speed_goes_to_the_smaller_file():
    big = candidate("a-big", mib=300, tps=100.0)
    small = candidate("b-small", mib=150, tps=99.0)  # within 2%: a tie
    decision = select([big, small], budget_bytes=10_000 * MIB)
    assert decision.chosen == "b-small"
    (rejection,) = decision.rejected
    assert rejection.reason == "larger" and "300 MiB vs 150 MiB" in rejection.detail
    clearly_faster = candidate("c-fast", mib=300, tps=110.0)
    assert select([clearly_faster, small], budget_bytes=10_000 * MIB).chosen == "c-fast"


def test_preferences():
    everything = [F16, Q8, candidate("tiny", mib=80, tps=60.0, kld=0.04)]
    assert select(everything, 10_000 * MIB, prefer="quality").chosen == "gguf-f16"
    assert select(everything, 10_000 * MIB, prefer="size").chosen == "tiny"
    size = select(everything, 10_000 * MIB, prefer="size")
    assert {r.reason for r in size.rejected} == {"larger"}
    quality = select(everything, 10_000 * MIB, prefer="quality")
    assert {r.reason for r in quality.rejected} == {"lower quality"}
    with pytest.raises(EdgepackError, match="unknown preference 'cheap'"):
        select(everything, 10_000 * MIB, prefer="cheap")


def test_nothing_fits_says_the_smallest_need_and_the_budget():
    with pytest.raises(NothingFitsError) as info:
        select([F16, Q8, Q4], budget_bytes=100 * MIB)
    assert info.value.exit_code == 6
    message = str(info.value)
    assert "gguf-q8_0, needing 190 MiB" in message and "budget is 100 MiB" in message
    with pytest.raises(NothingPassedError, match="no variant passes the quality gate; the closest is gguf-q4_k_m") \
            as info:
        select([Q4], budget_bytes=10_000 * MIB)
    assert info.value.exit_code == 5


def test_predicted_needs_are_labelled():
    predicted = candidate("p", mib=100, tps=10.0, need_mib=2000, measured=False)
    fits = candidate("q", mib=100, tps=5.0)
    decision = select([predicted, fits], budget_bytes=1000 * MIB)
    assert decision.rejected[0].detail == "needs 2000 MiB (predicted), budget 1000 MiB"
