"""The server's Prometheus metrics, in the text exposition format: requests by route and status, tokens in and
out, decode tokens/s, queue depth, time to first token."""

from __future__ import annotations

import threading
from collections import Counter

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()
        self.routes: Counter[str] = Counter()  # answers by where they came from: local, remote, local-fallback
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.decode_seconds = 0.0
        self.last_decode_tps = 0.0
        self.ttft_count = 0
        self.ttft_sum = 0.0
        self.ttft_buckets = [0] * len(TTFT_BUCKETS)
        self.rejected_busy = 0

    def count_request(self, route: str, status: int) -> None:
        with self._lock:
            self.requests[(route, status)] += 1

    def count_route(self, served_by: str) -> None:
        with self._lock:
            self.routes[served_by] += 1

    def answers(self) -> dict[str, int]:
        with self._lock:
            return dict(self.routes)

    def local_share(self) -> float | None:
        """The share of answers the local model gave (its fallbacks included)."""
        with self._lock:
            total = sum(self.routes.values())
            return (self.routes["local"] + self.routes["local-fallback"]) / total if total else None

    def observe_ttft(self, seconds: float) -> None:
        with self._lock:
            self.ttft_count += 1
            self.ttft_sum += seconds
            for index, bound in enumerate(TTFT_BUCKETS):
                if seconds <= bound:
                    self.ttft_buckets[index] += 1

    def count_tokens(self, prompt: int, completion: int, decode_seconds: float | None) -> None:
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            if decode_seconds and completion > 1:
                self.decode_seconds += decode_seconds
                self.last_decode_tps = (completion - 1) / decode_seconds

    def render(self, in_flight: int, queued: int) -> str:
        with self._lock:
            lines = ["# HELP edgepack_requests_total HTTP requests by route and status.",
                     "# TYPE edgepack_requests_total counter"]
            for (route, status), count in sorted(self.requests.items()):
                lines.append(f'edgepack_requests_total{{route="{route}",status="{status}"}} {count}')
            lines += ["# HELP edgepack_answers_total Generated answers by where they came from.",
                      "# TYPE edgepack_answers_total counter"]
            for served_by, count in sorted(self.routes.items()):
                lines.append(f'edgepack_answers_total{{route="{served_by}"}} {count}')
            lines += ["# TYPE edgepack_prompt_tokens_total counter",
                      f"edgepack_prompt_tokens_total {self.prompt_tokens}",
                      "# TYPE edgepack_completion_tokens_total counter",
                      f"edgepack_completion_tokens_total {self.completion_tokens}",
                      "# HELP edgepack_decode_tokens_per_second Decode speed of the last finished generation.",
                      "# TYPE edgepack_decode_tokens_per_second gauge",
                      f"edgepack_decode_tokens_per_second {self.last_decode_tps:.3f}",
                      "# TYPE edgepack_in_flight_requests gauge", f"edgepack_in_flight_requests {in_flight}",
                      "# TYPE edgepack_queue_depth gauge", f"edgepack_queue_depth {queued}",
                      "# TYPE edgepack_rejected_busy_total counter",
                      f"edgepack_rejected_busy_total {self.rejected_busy}",
                      "# HELP edgepack_time_to_first_token_seconds From request to the first generated token.",
                      "# TYPE edgepack_time_to_first_token_seconds histogram"]
            for bound, count in zip(TTFT_BUCKETS, self.ttft_buckets, strict=True):
                lines.append(f'edgepack_time_to_first_token_seconds_bucket{{le="{bound}"}} {count}')
            lines += [f'edgepack_time_to_first_token_seconds_bucket{{le="+Inf"}} {self.ttft_count}',
                      f"edgepack_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                      f"edgepack_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(lines) + "\n"
