"""Per-engine serving statistics, fed by a vLLM stat logger, read by the engine's Serve replica.

`EngineStatsLogger` is registered under vLLM's `vllm.stat_logger_plugins` entry point, so every AsyncLLM
created in a process records into that process's `ENGINE_STATS`. A Serve replica hosts exactly one engine, so
the replica reads its own engine's numbers from there (`snapshot()`), with no extra RPC or scrape.

What is counted (the signals the autoscaler and tests need):
- generation tokens (decode TPS), prompt tokens by source: computed locally (prefix-cache misses: the paper's
  KV-miss prefill TPS), local prefix-cache hits, loaded over the KV connector (NIXL) from a prefill engine;
- time to first token and inter-token latencies (engine-side), running/waiting requests, KV-cache usage.

Must not import Ray. vLLM types are used only through the objects vLLM hands to `record()`.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass

from common import histogram
from common.histogram import percentile

try:  # The logger base class is vLLM's; the counters work without vLLM (unit tests).
    from vllm.v1.metrics.loggers import StatLoggerBase as _Base
except ImportError:  # pragma: no cover - vLLM absent
    _Base = object

_SAMPLES = 20_000  # bounded memory: latency samples kept for percentiles
_RATE_POINTS = 600  # bounded memory: (t, counters) points kept for windowed rates


@dataclass(frozen=True)
class StatsSnapshot:
    """Windowed rates and percentiles for one engine. Units are in the names; NaN means no sample."""

    window_s: float
    decode_tokens_per_s: float
    prefill_computed_tokens_per_s: float  # prompt tokens that missed every cache: real prefill work
    prompt_external_tokens_per_s: float  # prompt tokens whose KV arrived over the KV connector
    ttft_p50_s: float
    ttft_p90_s: float
    tbt_p50_s: float
    tbt_p90_s: float
    num_running: float
    num_waiting: float
    kv_cache_usage: float  # 0..1
    # Totals since the engine started (for tests and reports).
    total_generation_tokens: int
    total_prompt_tokens: int
    total_prompt_computed_tokens: int
    total_prompt_local_hit_tokens: int
    total_prompt_external_tokens: int
    total_finished_requests: int

    def as_metrics(self) -> dict[str, float]:
        """The numbers as floats; a latency with no sample in the window is left out (missing stays missing,
        never 0, which would read as perfect latency)."""
        return {key: float(value) for key, value in self.__dict__.items()
                if not (isinstance(value, float) and math.isnan(value))}


class EngineStats:
    """Thread-safe accumulator. `record_*` is called from vLLM's output loop; `snapshot` from the replica."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.prompt_computed = 0
        self.prompt_local_hit = 0
        self.prompt_external = 0
        self.finished_requests = 0
        self.num_running = 0
        self.num_waiting = 0
        self.kv_cache_usage = 0.0
        self._ttft: deque[tuple[float, float]] = deque(maxlen=_SAMPLES)
        self._tbt: deque[tuple[float, float]] = deque(maxlen=_SAMPLES)
        self._points: deque[tuple[float, int, int, int]] = deque(maxlen=_RATE_POINTS)
        self._points.append((clock(), 0, 0, 0))
        self._ttft_hist = histogram.empty()  # cumulative, since the engine started (common.histogram buckets)
        self._tbt_hist = histogram.empty()

    def record_iteration(self, *, generation_tokens: int, prompt_total: int, prompt_computed: int,
                         prompt_local_hit: int, prompt_external: int, ttfts_s: list[float],
                         tbts_s: list[float], finished: int) -> None:
        now = self._clock()
        with self._lock:
            self.generation_tokens += generation_tokens
            self.prompt_tokens += prompt_total
            self.prompt_computed += prompt_computed
            self.prompt_local_hit += prompt_local_hit
            self.prompt_external += prompt_external
            self.finished_requests += finished
            self._ttft.extend((now, v) for v in ttfts_s)
            self._tbt.extend((now, v) for v in tbts_s)
            histogram.add(self._ttft_hist, ttfts_s)
            histogram.add(self._tbt_hist, tbts_s)
            point = (now, self.generation_tokens, self.prompt_computed, self.prompt_external)
            if now - self._points[-1][0] < 0.25 and len(self._points) > 1:
                self._points[-1] = point  # coalesce: at most ~4 points a second
            else:
                self._points.append(point)

    def record_scheduler(self, *, num_running: int, num_waiting: int, kv_cache_usage: float) -> None:
        with self._lock:
            self.num_running, self.num_waiting, self.kv_cache_usage = num_running, num_waiting, kv_cache_usage

    def histograms(self) -> dict[str, list[int]]:
        """Cumulative TTFT and TBT bucket counts (for merging across replicas and differencing over time)."""
        with self._lock:
            return {"ttft": list(self._ttft_hist), "tbt": list(self._tbt_hist)}

    def snapshot(self, window_s: float = 30.0) -> StatsSnapshot:
        if window_s <= 0:
            raise ValueError(f"window_s ({window_s}) must be > 0")
        now = self._clock()
        with self._lock:
            current = (now, self.generation_tokens, self.prompt_computed, self.prompt_external)
            # Counters are step functions that change only at recorded points, so their value at the window's
            # start is that of the last point at or before it (or the first point, for a young engine).
            window_start = now - window_s
            start = self._points[0]
            for p in self._points:
                if p[0] > window_start:
                    break
                start = p
            span = max(now - max(start[0], window_start), 1e-9)
            ttft = [v for t, v in self._ttft if t >= now - window_s]
            tbt = [v for t, v in self._tbt if t >= now - window_s]
            return StatsSnapshot(
                window_s=min(window_s, span),
                decode_tokens_per_s=(current[1] - start[1]) / span,
                prefill_computed_tokens_per_s=(current[2] - start[2]) / span,
                prompt_external_tokens_per_s=(current[3] - start[3]) / span,
                ttft_p50_s=percentile(ttft, 0.5),
                ttft_p90_s=percentile(ttft, 0.9),
                tbt_p50_s=percentile(tbt, 0.5),
                tbt_p90_s=percentile(tbt, 0.9),
                num_running=float(self.num_running),
                num_waiting=float(self.num_waiting),
                kv_cache_usage=float(self.kv_cache_usage),
                total_generation_tokens=self.generation_tokens,
                total_prompt_tokens=self.prompt_tokens,
                total_prompt_computed_tokens=self.prompt_computed,
                total_prompt_local_hit_tokens=self.prompt_local_hit,
                total_prompt_external_tokens=self.prompt_external,
                total_finished_requests=self.finished_requests,
            )


#: The process-wide accumulator (one engine per Serve replica process).
ENGINE_STATS = EngineStats()


class EngineStatsLogger(_Base):
    """vLLM stat logger that feeds `ENGINE_STATS`. Registered as a `vllm.stat_logger_plugins` entry point."""

    def __init__(self, vllm_config=None, engine_index: int = 0):
        self.engine_index = engine_index

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        if scheduler_stats is not None:
            ENGINE_STATS.record_scheduler(
                num_running=scheduler_stats.num_running_reqs,
                num_waiting=scheduler_stats.num_waiting_reqs,
                kv_cache_usage=scheduler_stats.kv_cache_usage,
            )
        if iteration_stats is not None:
            prompt = iteration_stats.prompt_token_stats
            ENGINE_STATS.record_iteration(
                generation_tokens=iteration_stats.num_generation_tokens,
                prompt_total=prompt.total,
                prompt_computed=prompt.computed,
                prompt_local_hit=prompt.local_cache_hit,
                prompt_external=prompt.external_kv_transfer,
                ttfts_s=list(iteration_stats.time_to_first_tokens_iter),
                tbts_s=list(iteration_stats.inter_token_latencies_iter),
                finished=len(iteration_stats.finished_requests),
            )

    def log_engine_initialized(self):
        pass
