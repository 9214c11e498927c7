"""The continuous-batching engine behind fastllava's workers (no HTTP here).

``request.py`` (SamplingParams, EngineImage, Request, RequestOutput), ``block_manager.py`` (paged KV blocks,
prefix caching), ``encoder_cache.py`` (image features by hash), ``scheduler.py`` (bookkeeping: what runs each
step), ``runner.py`` (tensors: encoder, packed prefill, batched decode, sampling), ``decode_graphs.py`` (CUDA graphs of
the decode step, per batch-size bucket), ``engine.py`` (``LLMEngine``, ``AsyncLLMEngine``), ``metrics.py``.
"""

from fastllava.engine.engine import AsyncLLMEngine, EngineConfig, LLMEngine, RequestTooLargeError
from fastllava.engine.metrics import EngineMetrics, RequestMetrics
from fastllava.engine.request import EngineImage, RequestOutput, SamplingParams
from fastllava.engine.scheduler import QueueFullError

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineImage",
    "EngineMetrics",
    "LLMEngine",
    "QueueFullError",
    "RequestMetrics",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]
