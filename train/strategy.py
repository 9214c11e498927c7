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
# DeepSpeed steps inside ``engine.step()``, before our finite check sees the global loss: what it does then.
ENGINE_SKIP = (
    " -- left to DeepSpeed, which already stepped: ZeRO-1/2 skip a non-finite grad norm (fp32, fp16), "
    "ZeRO-3 only under fp16 loss scaling; --on_nonfinite stop stops here"
)


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


# ------------------------------------------------------------------------------------ state under engines


def is_zero3(engine) -> bool:
    return engine is not None and engine.zero_optimization_stage() == 3


def grad_norm_value(norm: torch.Tensor) -> float:
    """A ``clip_grad_norm_`` result as a float (under FSDP2 it is a DTensor: materialise it first)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_trainable_state(model: LlavaModel, module: nn.Module, engine, fsdp: bool) -> dict[str, torch.Tensor]:
    """The trainable weights, unsharded, on CPU, under the model's own names (what ``trainable.safetensors``
    holds). Collective under FSDP2 and ZeRO-3: call it on every rank; complete on rank 0."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {n: full["model." + n] for n in names if "model." + n in full}
    if is_zero3(engine):
        import deepspeed

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_state(optimizer, module: nn.Module, engine, fsdp: bool) -> tuple[dict, dict]:
    """(what rank 0 writes as ``optimizer.pt``, what every rank adds to its ``rng_state_<rank>.pth``).

    Plain / DDP: the optimizer's own state. FSDP2: the full (unsharded) optimizer state, keyed by parameter
    name. DeepSpeed: each rank's ZeRO partition (``engine.optimizer.state_dict()``) in its rank file, since the
    base optimizer's parameter groups were replaced by flat partitions. Collective under FSDP2."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(
            module, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return full, {}
    if engine is not None:
        return {"zero_stage": engine.zero_optimization_stage()}, {"zero_optimizer": engine.optimizer.state_dict()}
    return optimizer.state_dict(), {}


def consolidated_state_dict(module: nn.Module, engine, fsdp: bool) -> dict[str, torch.Tensor]:
    """Every weight of the model, unsharded, under the model's names (``model.`` of ``TrainModule`` removed).
    FSDP2: the full state dict; ZeRO-3: DeepSpeed's consolidated 16-bit state dict (the model's dtype, so fp32
    in an fp32 run; ``stage3_gather_16bit_weights_on_model_save`` must be true). Collective; rank 0 gets it."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    elif is_zero3(engine):
        if not engine.zero_gather_16bit_weights_on_model_save():
            raise SystemExit(
                "ZeRO-3 final save needs 'stage3_gather_16bit_weights_on_model_save': true in the DeepSpeed config"
            )
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        raise ValueError("consolidated_state_dict is for FSDP2 / ZeRO-3 runs")
    return {k.removeprefix("model."): v for k, v in (full or {}).items()}


def materialize(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Replace every (sharded / partitioned) parameter of ``model`` by a plain CPU fp32 parameter holding the
    full weight from ``full``; tied parameters stay tied. Rank 0, after ``consolidated_state_dict``."""
    new: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) not in new:
            if name not in full:
                raise KeyError(f"consolidated state dict lacks {name}")
            new[id(p)] = nn.Parameter(full[name].detach().to("cpu", torch.float32).clone(), p.requires_grad)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = new[id(p)]
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():  # FSDP2 swapped in FSDP<Cls> subclasses (their _apply expects DTensors): undo
        if isinstance(m, FSDPModule):
            m.__class__ = next(c for c in type(m).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule))


def load_train_state(model: LlavaModel, module: nn.Module, optimizer, engine, fsdp: bool, loaded: dict) -> None:
    """Resume: put back what ``full_trainable_state`` / ``optimizer_state`` saved (``loaded`` is
    ``checkpointing.load_checkpoint``'s answer on this rank). Same world size and engine as the saving run."""
    weights = loaded["trainable"]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        if "state" not in loaded["optimizer"] or "zero_stage" in loaded["optimizer"]:
            raise SystemExit("this checkpoint was not written by an --fsdp run: resume it with its own setup")
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(module, {"model." + n: t for n, t in weights.items()}, options=full)
        set_optimizer_state_dict(module, optimizer, loaded["optimizer"], options=full)
        return
    if engine is not None:
        zero_sd = loaded["rank_state"].get("zero_optimizer")
        if zero_sd is None or loaded["optimizer"].get("zero_stage") != engine.zero_optimization_stage():
            raise SystemExit(
                f"this checkpoint was not written by a ZeRO-{engine.zero_optimization_stage()} run of the same "
                "world size: resume it with its own setup"
            )
        if not is_zero3(engine):  # ZeRO-1/2: the (16-bit) model weights are whole on every rank
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if p.requires_grad:
                        p.copy_(weights[n].to(p.dtype))
        # the fp32 master partition of this rank (ZeRO-3 rebuilds its parameter partitions from it as well)
        world = dist.get_world_size() if dist.is_initialized() else 1
        engine.optimizer.load_state_dict([zero_sd] * world, load_optimizer_states=True, load_from_fp32_weights=True)
        return
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(weights[n].to(p.dtype))
    optimizer.load_state_dict(loaded["optimizer"])
