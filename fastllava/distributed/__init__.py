"""Tensor-parallel serving: one model sharded over N ranks (one process per device), driven by rank 0.

    tokenizer, model, processor, _ = load_pretrained_model(path, device="cuda", tensor_parallel_size=2)
    engine = LLMEngine(model, tokenizer)     # rank 0: scheduler and sampling; ranks 1..N-1 mirror each forward

``sharding.py``: which slice of each weight a rank holds and the module swaps (Megatron-style);
``loading.py``: reading only a rank's slices from a checkpoint; ``comm.py``: the process group (gloo on CPU,
NCCL on CUDA) and the step channel; ``launch.py``: rank 0's side (spawn, ``TensorParallelModel``, failure
monitor); ``follower.py``: ranks 1..N-1.
"""

from fastllava.distributed.comm import RankFailedError, TPGroup
from fastllava.distributed.launch import TensorParallelModel, launch, parameter_bytes
from fastllava.distributed.loading import RankShard
from fastllava.distributed.sharding import ShardLayout, shard_model_

__all__ = [
    "RankFailedError",
    "RankShard",
    "ShardLayout",
    "TPGroup",
    "TensorParallelModel",
    "launch",
    "parameter_bytes",
    "shard_model_",
]
