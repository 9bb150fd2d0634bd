"""Selection: the quality gate, then the memory budget, then the best by preference — and why not, for every other.

prefer "speed" (the default): the fastest decode; within TIE_SHARE of each other, the smaller file.
prefer "quality": the lowest mean KL divergence; ties by speed. prefer "size": the smallest file; ties by speed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal, get_args

from edgepack.core.artifacts import Candidate, CrashedVariant, Decision, Rejection
from edgepack.core.errors import EdgepackError, NothingFitsError, NothingPassedError

Preference = Literal["speed", "quality", "size"]
PREFERENCES: tuple[str, ...] = get_args(Preference)
TIE_SHARE = 0.02  # decode speeds within 2% of each other count as a tie (run-to-run noise is about that)


def _mib(value: int) -> str:
    return f"{value / 2**20:.0f} MiB"


def _speed(candidate: Candidate) -> float:
    return candidate.decode_tps if candidate.decode_tps is not None else 0.0


def _rank_key(candidate: Candidate, prefer: str, fastest: float):
    tied_with_fastest = fastest > 0 and _speed(candidate) >= fastest * (1 - TIE_SHARE)
    if prefer == "speed":
        return (0 if tied_with_fastest else 1, -_speed(candidate) if not tied_with_fastest else 0, candidate.bytes)
    if prefer == "quality":
        return (round(candidate.kld_mean, 6), -_speed(candidate), candidate.bytes)
    return (candidate.bytes, -_speed(candidate))


def select(candidates: list[Candidate], budget_bytes: int, prefer: str = "speed") -> Decision:
    if prefer not in PREFERENCES:
        raise EdgepackError(f"unknown preference {prefer!r}; accepted: {', '.join(PREFERENCES)}")
    if not candidates:
        raise EdgepackError("there are no variants to choose from")
    rejected: list[Rejection] = []
    passing = []
    for c in candidates:
        if not c.passed_gate:
            rejected.append(Rejection(c.name, "gate", "; ".join(c.gate_reasons) or "failed the quality gate"))
        else:
            passing.append(c)
    if not passing:
        closest = min(candidates, key=lambda c: c.kld_mean)
        raise NothingPassedError(
            f"no variant passes the quality gate; the closest is {closest.name} "
            f"({'; '.join(closest.gate_reasons) or 'failed'}); loosen --max-ppl-increase/--max-kld or add a "
            "higher-precision format")
    fitting = []
    for c in passing:
        if c.memory_bytes > budget_bytes:
            source = "measured" if c.measured else "predicted"
            rejected.append(Rejection(c.name, "does not fit",
                                      f"needs {_mib(c.memory_bytes)} ({source}), budget {_mib(budget_bytes)}"))
        else:
            fitting.append(c)
    if not fitting:
        smallest = min(passing, key=lambda c: c.memory_bytes)
        raise NothingFitsError(
            f"no variant fits: the smallest that passes the quality gate is {smallest.name}, needing "
            f"{_mib(smallest.memory_bytes)}, "
            f"and the target's budget is {_mib(budget_bytes)}; try a smaller quantization, a shorter --context, "
            "or a target with more memory")
    fastest = max(_speed(c) for c in fitting)
    ranked = sorted(fitting, key=lambda c: _rank_key(c, prefer, fastest))
    chosen = ranked[0]
    for c in ranked[1:]:
        rejected.append(_why_not(c, chosen, prefer, fastest))
    order = {c.name: i for i, c in enumerate(candidates)}
    rejected.sort(key=lambda r: order[r.name])
    speed = f"{chosen.decode_tps:.1f} t/s" if chosen.decode_tps is not None else \
        "no decode figure for this target (the smallest file is taken for speed)"
    why = (f"{chosen.name}: passes the gate (KLD {chosen.kld_mean:.4f}, PPL x{chosen.ppl_ratio:.3f}), needs "
           f"{_mib(chosen.memory_bytes)} of {_mib(budget_bytes)}, {speed} "
           f"({'measured' if chosen.measured else 'predicted'}), {_mib(chosen.bytes)} on disk; preferred for {prefer}")
    return Decision(chosen=chosen.name, prefer=prefer, budget_bytes=budget_bytes, why=why, rejected=tuple(rejected))


def _why_not(c: Candidate, chosen: Candidate, prefer: str, fastest: float) -> Rejection:
    if prefer == "speed" and fastest <= 0:
        return Rejection(c.name, "larger", f"no decode figure for this target, so the smaller file is preferred: "
                                           f"{_mib(c.bytes)} vs {_mib(chosen.bytes)}")
    if prefer == "speed":
        if _speed(c) >= fastest * (1 - TIE_SHARE) and _speed(chosen) >= fastest * (1 - TIE_SHARE):
            return Rejection(c.name, "larger", f"as fast within {TIE_SHARE:.0%} ({_speed(c):.1f} vs "
                                               f"{_speed(chosen):.1f} t/s) but {_mib(c.bytes)} vs {_mib(chosen.bytes)}")
        return Rejection(c.name, "slower", f"{_speed(c):.1f} t/s vs {_speed(chosen):.1f} t/s for {chosen.name}")
    if prefer == "quality":
        return Rejection(c.name, "lower quality", f"KLD {c.kld_mean:.4f} vs {chosen.kld_mean:.4f} for {chosen.name}")
    return Rejection(c.name, "larger", f"{_mib(c.bytes)} vs {_mib(chosen.bytes)} for {chosen.name}")


def reject_crashed(decision: Decision, crashed: tuple[CrashedVariant, ...]) -> Decision:
    """The decision, with a rejection for every variant whose engine crashed before it could be a candidate."""
    extra = tuple(Rejection(c.name, "crashed", f"{c.stage} stage: {c.detail}") for c in crashed)
    return replace(decision, rejected=decision.rejected + extra)
