"""Scale-out for ``train/train.py``, applied from outside the model (torchtitan's ``parallelize`` idea).

* ``TrainModule``: one ``nn.Module`` whose ``forward`` is the training step's compute (packed forward + fused
  linear cross-entropy at the target rows), so FSDP2 and DeepSpeed see every parameter used inside a module
  forward (their gather/reshard hooks live on ``forward``). The LM head is swapped for ``LMHeadWithLoss``,
  an ``nn.Linear`` that computes the loss itself: ZeRO-3 gathers its weight when it runs.
* data parallel without an engine: gradients are summed over ranks with bucketed ``all_reduce`` after the
  accumulation steps (the loss is already divided by the *global* target count, so a sum is right, and
  samples without images simply contribute zero to the tower's / projector's gradients);
* FSDP2 (``fully_shard`` per decoder layer and vision layer, then the root);
* DeepSpeed ZeRO-2/3 (``deepspeed.initialize`` with a config from ``train/configs``).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastllava.losses import linear_cross_entropy
from fastllava.model.llava import LlavaModel

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


class LMHeadWithLoss(nn.Linear):
    """``lm_head`` that returns the summed cross-entropy when given targets (logits are never materialised)."""

    chunk_size: int = 1024
    impl: str = "auto"

    def forward(self, hidden: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        return linear_cross_entropy(
            hidden, self.weight, targets, bias=self.bias, chunk_size=self.chunk_size, impl=self.impl
        )


def swap_lm_head(model: LlavaModel, chunk_size: int, impl: str) -> None:
    """Replace ``language_model.lm_head`` by an ``LMHeadWithLoss`` sharing its parameters (ties kept)."""
    old = model.language_model.lm_head
    if isinstance(old, LMHeadWithLoss):
        return
    new = LMHeadWithLoss.__new__(LMHeadWithLoss)
    nn.Module.__init__(new)
    new.in_features, new.out_features = old.in_features, old.out_features
    new.weight = old.weight
    new.bias = old.bias
    new.chunk_size, new.impl = chunk_size, impl
    model.language_model.lm_head = new


class TrainModule(nn.Module):
    """The training step's compute: summed next-token CE over a micro-batch's target rows."""

    def __init__(self, model: LlavaModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed, target_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.forward_packed(packed)  # (T, D)
        return self.model.language_model.lm_head(hidden[target_rows], targets)  # fp32 scalar


# ------------------------------------------------------------------------------------ process group


def init_distributed(backend: str | None, device_type: str) -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the default group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend=backend or ("nccl" if device_type == "cuda" else "gloo"))
    return rank, world, local_rank


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_grads(params: list[nn.Parameter], bucket_numel: int = 25_000_000) -> None:
    """Sum gradients over ranks (bucketed). A parameter without a gradient on this rank contributes zeros."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params + [None]:
        if p is not None:
            bucket.append(p.grad)
            size += p.grad.numel()
        if bucket and (p is None or size >= bucket_numel):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            bucket, size = [], 0


# ------------------------------------------------------------------------------------ engines


def apply_fsdp2(module: TrainModule, bf16: bool) -> TrainModule:
    """FSDP2: shard each decoder layer and vision layer, then the root (embeddings, projector, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    model = module.model
    for layer in model.vision_tower.encoder.layers:
        if any(p.requires_grad for p in layer.parameters()):
            fully_shard(layer, **kw)
    for layer in model.language_model.layers:
        fully_shard(layer, **kw)
    fully_shard(module, **kw)
    return module


def deepspeed_config(path: str | Path, train_args, world_size: int, hidden_size: int) -> dict:
    """Load a DeepSpeed JSON config and fill its ``"auto"`` values from the training arguments and the model's
    hidden size, as HF's ``HfTrainerDeepSpeedConfig`` does."""
    cfg = json.loads(Path(path).read_text())
    fills = {
        "train_micro_batch_size_per_gpu": 1,  # one packed micro-batch
        "gradient_accumulation_steps": train_args.gradient_accumulation_steps,
        "train_batch_size": world_size * train_args.gradient_accumulation_steps,
        "gradient_clipping": train_args.max_grad_norm,
    }
    for k, v in fills.items():
        if cfg.get(k, "auto") == "auto":
            cfg[k] = v
    for key, flag in (("bf16", train_args.bf16), ("fp16", train_args.fp16)):
        if key in cfg and cfg[key].get("enabled") == "auto":
            cfg[key]["enabled"] = bool(flag)
    zero = cfg.get("zero_optimization", {})
    h2 = hidden_size * hidden_size
    for k, v in (
        ("reduce_bucket_size", h2),
        ("stage3_prefetch_bucket_size", int(0.9 * h2)),
        ("stage3_param_persistence_threshold", 10 * hidden_size),
    ):
        if zero.get(k) == "auto":
            zero[k] = v
    cfg.pop("optimizer", None)  # ours (AdamW with a projector group) and our scheduler are passed in
    cfg.pop("scheduler", None)
    return cfg


def init_deepspeed(module: TrainModule, optimizer, scheduler, cfg: dict):
    """``deepspeed.initialize``; returns the engine (its ``backward``/``step`` replace ours)."""
    if not HAS_DEEPSPEED:
        raise SystemExit("--deepspeed needs DeepSpeed: pip install deepspeed")
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=cfg)
    return engine
