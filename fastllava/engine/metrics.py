"""Per-request and engine-wide metrics: queue time, time to first token, inter-token latency, KV usage.

Times are ``time.perf_counter()`` seconds, taken on the host when the engine step that produced a token
returns (one host sync per step), so they are what a streaming client sees, minus the transport.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    arrival_time: float
    num_prompt_tokens: int = 0  # image slots included
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_preemptions: int = 0
    inter_token_latencies: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def mean_itl(self) -> float | None:
        itl = self.inter_token_latencies
        return sum(itl) / len(itl) if itl else None

    def on_token(self, now: float, n: int = 1) -> None:
        if self.first_token_time is None:
            self.first_token_time = now
        elif self.last_token_time is not None:
            self.inter_token_latencies.append(now - self.last_token_time)
        self.last_token_time = now
        self.num_output_tokens += n


@dataclass
class EngineMetrics:
    """A snapshot of the engine (``LLMEngine.metrics()``); counters are totals since start."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_usage: float  # fraction of blocks held by requests (cached-but-free blocks count as free)
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose K/V were already cached
    encoder_images_run: int  # images run through the vision tower
    encoder_cache_hits: int  # images whose features came from the encoder cache
    encoder_cache_entries: int
    num_preemptions: int
    num_steps: int
    num_prompt_tokens_computed: int  # prefill tokens actually run
    num_generated_tokens: int
    num_finished: int
    num_aborted: int
    num_rejected: int

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
