"""How ``train/train.py`` spreads a step over processes: one small interface, four strategies behind it.

    strat = make_strategy(args, world, hidden_size)      # Local | DDP | FSDP2 | DeepSpeed
    module = strat.wrap(TrainModule(model, ...), make_optimizer, make_scheduler)
    for i, b in enumerate(micro_batches):                # the accumulation steps of one optimizer step
        strat.backward(module(b.packed, b.target_rows, b.targets) * scale, last=i == len(micro_batches) - 1)
    norm = strat.clip(max_grad_norm); strat.step() or strat.skip(); ...
    strat.trainable_state(), strat.optimizer_state(), strat.load_state(loaded), strat.gather_full_model()

Applied from outside the model (torchtitan's ``parallelize`` idea); each strategy is the library's own engine:

* ``Local``: one process, plain autograd.
* ``DDP``: ``torch.nn.parallel.DistributedDataParallel``: gradients all-reduced in buckets as backward produces
  them (communication overlaps the rest of backward), once per optimizer step (``no_sync`` on the other
  accumulation steps). ``find_unused_parameters``: a micro-batch without images leaves the tower / projector
  without gradients.
* ``FSDP2``: ``fully_shard`` per decoder layer and vision layer, then the root (embeddings, projector, head).
* ``DeepSpeed``: ZeRO-2/3 through ``deepspeed.initialize`` with a config from ``train/configs`` (its engine
  clips and steps; our optimizer and scheduler are passed in).

Every rank backpropagates its micro-batch's *summed* CE divided by the global target count, so the gradient to
apply is the *sum* over ranks. All four engines average over ranks: ``grad_scale`` (the world size) undoes it.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from fastllava.model.llava import LlavaModel
from fastllava.optional import HAS_DEEPSPEED, install_hint


class TrainModule(nn.Module):
    """The training step's compute in one ``nn.Module`` (its ``forward`` is where DDP, FSDP2 and DeepSpeed
    hook in): the summed next-token CE over a micro-batch's target rows, through the model's own loss."""

    def __init__(self, model: LlavaModel, chunk_size: int = 1024, impl: str = "auto") -> None:
        super().__init__()
        self.model = model
        self.chunk_size, self.impl = chunk_size, impl

    def forward(self, packed, target_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.forward_packed(packed)  # (T, D)
        return self.model.loss(hidden[target_rows], targets, self.chunk_size, self.impl)  # fp32 scalar


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


def full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


# ------------------------------------------------------------------------------------ strategies


class Local:
    """One process, plain autograd (the base the others override)."""

    grad_scale = 1.0  # multiply the loss by it: undoes the engines' average over ranks
    lockstep = False  # every rank must run every micro-batch (collectives in forward / backward / step)
    autocast_ok = True  # our torch.autocast around the forward (the sharding engines cast themselves)
    nonfinite_note = " -- step skipped (--on_nonfinite skip)"

    def __init__(self) -> None:
        self.module: nn.Module | None = None
        self.model: LlavaModel | None = None
        self.optimizer = self.scheduler = None

    def wrap(self, module: TrainModule, make_optimizer, make_scheduler) -> nn.Module:
        """Wrap the module; build the optimizer (``make_optimizer(model)``) and the schedule
        (``make_scheduler(optimizer)``) on the parameters the engine trains. Returns the module to call."""
        self.model, self.module = module.model, self.shard(module)
        self.optimizer = make_optimizer(self.model)
        self.scheduler = make_scheduler(self.optimizer)
        return self.module

    def shard(self, module: TrainModule) -> nn.Module:
        return module

    def params(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def sync_context(self, last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backpropagate one micro-batch; ``last``: the optimizer step's last (gradients are reduced then)."""
        with self.sync_context(last):
            loss.backward()

    def clip(self, max_norm: float) -> float:
        """Clip the gradients (global norm over every rank's); returns the norm before clipping."""
        norm = torch.nn.utils.clip_grad_norm_(self.params(), max_norm)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
            norm = norm.full_tensor()
        return float(norm)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        """A non-finite step: drop its gradients (weights, optimizer and schedule stay as they were)."""
        self.optimizer.zero_grad(set_to_none=True)

    # ---- checkpoint state (collective for the sharding strategies: call on every rank)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable weights, unsharded, under the model's own names (``trainable.safetensors``)."""
        return {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def optimizer_state(self) -> tuple[dict, dict]:
        """(what rank 0 writes as ``optimizer.pt``, what every rank adds to its ``rng_state_<rank>.pth``)."""
        return self.optimizer.state_dict(), {}

    def load_state(self, loaded: dict) -> None:
        """Resume: put back what ``trainable_state`` / ``optimizer_state`` saved (``loaded`` is
        ``checkpointing.load_checkpoint``'s answer on this rank). Same world size and strategy as the saving run."""
        if "state" not in loaded["optimizer"]:
            raise SystemExit(f"this checkpoint was not written by a {type(self).__name__} run: resume it with its own")
        self.copy_trainable(loaded["trainable"])
        self.optimizer.load_state_dict(loaded["optimizer"])

    def copy_trainable(self, weights: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    p.copy_(weights[n].to(p.dtype))

    def gather_full_model(self) -> None:
        """After training: rank 0's ``model`` holds every weight as a plain parameter (a no-op unless sharded)."""


class DDP(Local):
    """``DistributedDataParallel``: bucketed all-reduce overlapped with backward, once per optimizer step."""

    lockstep = True

    def __init__(self, world: int, device: torch.device) -> None:
        super().__init__()
        self.grad_scale, self.device = float(world), device

    def shard(self, module: TrainModule) -> nn.Module:
        return nn.parallel.DistributedDataParallel(
            module,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=True,  # text-only micro-batches leave the tower / projector without grads
            broadcast_buffers=False,  # the model's buffers (rotary tables) are constants
            gradient_as_bucket_view=True,  # grads live in the buckets: no copy in or out
        )

    def sync_context(self, last: bool):
        return nullcontext() if last else self.module.no_sync()


class FSDP2(Local):
    """FSDP2: each decoder layer and vision layer sharded, then the root; full (unsharded) checkpoints."""

    autocast_ok = False  # mixed precision is FSDP2's MixedPrecisionPolicy
    lockstep = True

    def __init__(self, world: int, bf16: bool) -> None:
        super().__init__()
        self.grad_scale, self.bf16 = float(world), bf16

    def shard(self, module: TrainModule) -> nn.Module:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        kw = {"mp_policy": mp} if mp is not None else {}
        for layer in module.model.vision_tower.encoder.layers:
            if any(p.requires_grad for p in layer.parameters()):
                fully_shard(layer, **kw)
        for layer in module.model.language_model.layers:
            fully_shard(layer, **kw)
        fully_shard(module, **kw)  # before the optimizer: the parameters are now sharded DTensors
        return module

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.module.set_requires_gradient_sync(last)  # reduce-scatter once per optimizer step
        loss.backward()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(self.module, options=full_state_options())
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        return {n: full["model." + n] for n in names if "model." + n in full}

    def optimizer_state(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, self.optimizer, options=full_state_options()), {}

    def load_state(self, loaded: dict) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opt = loaded["optimizer"]
        if "state" not in opt or "zero_stage" in opt:
            raise SystemExit("this checkpoint was not written by an --fsdp run: resume it with its own setup")
        full = StateDictOptions(full_state_dict=True, strict=False)
        set_model_state_dict(self.module, {"model." + n: t for n, t in loaded["trainable"].items()}, options=full)
        set_optimizer_state_dict(self.module, self.optimizer, opt, options=full)

    def gather_full_model(self) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        from torch.distributed.fsdp import FSDPModule

        full = get_model_state_dict(self.module, options=full_state_options())
        if dist.get_rank() == 0:
            materialize(self.model, {k.removeprefix("model."): v for k, v in full.items()})
            for m in self.model.modules():  # FSDP2 swapped in FSDP<Cls> subclasses (their _apply expects DTensors)
                if isinstance(m, FSDPModule):
                    m.__class__ = next(
                        c for c in type(m).__mro__ if issubclass(c, nn.Module) and not issubclass(c, FSDPModule)
                    )


class DeepSpeed(Local):
    """DeepSpeed ZeRO-2/3: its engine reduces, clips (``gradient_clipping``) and steps at the accumulation
    boundary; each rank checkpoints its ZeRO partition of the optimizer state."""

    autocast_ok = False  # bf16 / fp16 are the DeepSpeed config's
    lockstep = True  # its engine counts micro-batches to find the accumulation boundary
    # DeepSpeed steps inside ``engine.step()``, before our finite check sees the global loss: what it does then.
    nonfinite_note = (
        " -- left to DeepSpeed, which already stepped: ZeRO-1/2 skip a non-finite grad norm (fp32, fp16), "
        "ZeRO-3 only under fp16 loss scaling; --on_nonfinite stop stops here"
    )

    def __init__(self, config: dict, world: int) -> None:
        super().__init__()
        if not HAS_DEEPSPEED:
            raise SystemExit(f"--deepspeed needs DeepSpeed: {install_hint('deepspeed')}")
        self.config, self.grad_scale = config, float(world)
        self.accumulation = config["gradient_accumulation_steps"]
        self.engine = None

    def wrap(self, module: TrainModule, make_optimizer, make_scheduler) -> nn.Module:
        import deepspeed

        self.model = module.model
        self.optimizer = make_optimizer(self.model)
        self.scheduler = make_scheduler(self.optimizer)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.config
        )
        if self.zero3:
            # ZeRO-3 gathers a module's own parameters around its forward; the head's weight (read by the
            # model's loss) and the model's direct parameters (image_newline) are used inside TrainModule's
            for p in [*self.model.language_model.lm_head.parameters(), *self.model.parameters(recurse=False)]:
                deepspeed.zero.register_external_parameter(module, p)
        self.module = self.engine
        return self.engine

    @property
    def zero3(self) -> bool:
        return self.engine.zero_optimization_stage() == 3

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        # the engine divides by the accumulation steps (it averages micro-batches): we want their sum
        self.engine.backward(loss * self.accumulation)
        self.engine.step()  # a no-op except at the accumulation boundary

    def clip(self, max_norm: float) -> float:
        return float(self.engine.get_global_grad_norm() or 0.0)  # clipped by the engine (gradient_clipping)

    def step(self) -> None:
        """Done in ``backward``'s ``engine.step()``."""

    def skip(self) -> None:
        """Left to DeepSpeed (see ``nonfinite_note``)."""

    def trainable_state(self) -> dict[str, torch.Tensor]:
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not self.zero3:
            return {n: p.detach() for n, p in named}
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            return {n: p.detach().cpu().clone() for n, p in named}

    def optimizer_state(self) -> tuple[dict, dict]:
        # the base optimizer's parameter groups were replaced by flat partitions: each rank keeps its own
        stage = self.engine.zero_optimization_stage()
        return {"zero_stage": stage}, {"zero_optimizer": self.engine.optimizer.state_dict()}

    def load_state(self, loaded: dict) -> None:
        zero_sd = loaded["rank_state"].get("zero_optimizer")
        stage = self.engine.zero_optimization_stage()
        if zero_sd is None or loaded["optimizer"].get("zero_stage") != stage:
            raise SystemExit(
                f"this checkpoint was not written by a ZeRO-{stage} run of the same world size: resume it with its own"
            )
        if not self.zero3:  # ZeRO-1/2: the (16-bit) model weights are whole on every rank
            self.copy_trainable(loaded["trainable"])
        # the fp32 master partition of this rank (ZeRO-3 rebuilds its parameter partitions from it as well)
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.engine.optimizer.load_state_dict(
            [zero_sd] * world, load_optimizer_states=True, load_from_fp32_weights=True
        )

    def gather_full_model(self) -> None:
        """ZeRO-3: DeepSpeed's consolidated 16-bit state dict (the model's dtype, so fp32 in an fp32 run)."""
        if not self.zero3:
            return
        if not self.engine.zero_gather_16bit_weights_on_model_save():
            raise SystemExit(
                "ZeRO-3 final save needs 'stage3_gather_16bit_weights_on_model_save': true in the DeepSpeed config"
            )
        full = self.engine._zero3_consolidated_16bit_state_dict()  # collective; rank 0 gets it
        if dist.get_rank() == 0:
            materialize(self.model, {k.removeprefix("model."): v for k, v in full.items()})


def materialize(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Replace every (sharded / partitioned) parameter of ``model`` by a plain CPU fp32 parameter holding the
    full weight from ``full``; tied parameters stay tied."""
    new: dict[int, nn.Parameter] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)):
        if id(p) not in new:
            if name not in full:
                raise KeyError(f"consolidated state dict lacks {name}")
            new[id(p)] = nn.Parameter(full[name].detach().to("cpu", torch.float32).clone(), p.requires_grad)
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._parameters[leaf] = new[id(p)]  # in place: FSDP / ZeRO hooks stay out of it


# ------------------------------------------------------------------------------------ choosing one


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


def make_strategy(args, world: int, device: torch.device, hidden_size: int) -> Local:
    """The strategy the arguments ask for: ``--deepspeed CONFIG``, ``--fsdp full_shard``, else DDP under
    ``torchrun`` with more than one process, else one process."""
    if args.deepspeed:
        return DeepSpeed(deepspeed_config(args.deepspeed, args, world, hidden_size), world)
    if args.fsdp:
        return FSDP2(world, args.bf16)
    if world > 1:
        return DDP(world, device)
    return Local()
