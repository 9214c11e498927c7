"""The continuous-batching engine behind fastllava's workers (no HTTP here).

``request.py`` (SamplingParams, EngineImage, Request, RequestOutput), ``block_manager.py`` (paged KV blocks,
prefix caching), ``encoder_cache.py`` (image features by hash), ``scheduler.py`` (bookkeeping: what runs each
step), ``runner.py`` (tensors: encoder, packed prefill, batched decode), ``sampling.py`` (the batch's sampling
settings as tensors), ``decode_graphs.py`` (CUDA graphs of the decode step, per batch-size bucket),
``detokenizer.py`` (incremental text and stop strings), ``engine.py`` (``LLMEngine``, overlap scheduling),
``async_engine.py`` (``AsyncLLMEngine``, failure isolation), ``metrics.py``.
"""

from fastllava.engine.async_engine import AsyncLLMEngine, EngineDeadError, RequestFailedError
from fastllava.engine.engine import EngineConfig, LLMEngine, RequestTooLargeError
from fastllava.engine.metrics import EngineMetrics, RequestMetrics
from fastllava.engine.request import EngineImage, Request, RequestOutput, SamplingParams
from fastllava.engine.scheduler import QueueFullError

__all__ = [
    "AsyncLLMEngine",
    "EngineConfig",
    "EngineDeadError",
    "EngineImage",
    "EngineMetrics",
    "LLMEngine",
    "QueueFullError",
    "Request",
    "RequestFailedError",
    "RequestMetrics",
    "RequestOutput",
    "RequestTooLargeError",
    "SamplingParams",
]
