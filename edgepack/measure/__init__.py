"""Stage 3, measure: this machine (hardware, memory bandwidth, each variant in its own process) and the target
(profiles, and predictions for a device we are not on)."""

from edgepack.measure.on_target import performance_on_target
from edgepack.measure.profiler import profile
from edgepack.measure.targets import resolve_target

__all__ = ["performance_on_target", "profile", "resolve_target"]
