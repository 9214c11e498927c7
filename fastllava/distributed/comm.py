"""The tensor-parallel process group and the step channel from rank 0 to the follower ranks.

    group = TPGroup.init(rank, world, "tcp://127.0.0.1:29500", device)   # gloo on CPU, NCCL on CUDA
    group.send("forward", (batch, meta, ...))        # rank 0: one pickled header + one broadcast per dtype
    cmd, payload = group.recv()                       # followers: the same objects, tensors on their device

A step's description (a ``PackedBatch``, an ``AttnMetadata``, image features ...) is split into a skeleton
(pickled: host values, dataclass types, tensor shapes) and its tensors, which travel flattened into one
buffer per dtype: a decode step costs one object broadcast and two tensor broadcasts, whatever its fields.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from fastllava import envs

# seconds a collective may wait for a peer before it fails (a watchdog: no rank waits forever on a dead one);
# rank 0 sends a keep-alive while idle, so only a step that really stalls hits it
DEFAULT_TIMEOUT_S = envs.FASTLLAVA_TP_TIMEOUT


class RankFailedError(dist.DistError):
    """A tensor-parallel rank died or a collective failed: the group cannot serve any more."""


@dataclass
class _TensorRef:
    index: int  # position in the message's tensor list


def _walk(obj: Any, is_leaf: Callable[[Any], bool], leaf: Callable[[Any], Any]) -> Any:
    """A copy of ``obj`` with ``leaf(x)`` for each ``x`` that ``is_leaf`` (dataclasses, lists, tuples, dicts walked)."""
    if is_leaf(obj):
        return leaf(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            setattr(out, f.name, _walk(getattr(obj, f.name), is_leaf, leaf))
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(_walk(v, is_leaf, leaf) for v in obj)
    if isinstance(obj, dict):
        return {k: _walk(v, is_leaf, leaf) for k, v in obj.items()}
    return obj


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    """``obj`` with every tensor replaced by a ``_TensorRef`` into ``tensors`` (appended to)."""

    def ref(t: torch.Tensor) -> _TensorRef:
        tensors.append(t)
        return _TensorRef(len(tensors) - 1)

    return _walk(obj, lambda x: isinstance(x, torch.Tensor), ref)


def _unflatten(skel: Any, tensors: list[torch.Tensor]) -> Any:
    return _walk(skel, lambda x: isinstance(x, _TensorRef), lambda r: tensors[r.index])


class TPGroup:
    """This process's place in the tensor-parallel group (the default process group) and its device."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        # gloo moves CPU tensors; NCCL device tensors
        self.comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")

    @classmethod
    def init(
        cls, rank: int, world: int, init_method: str, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S
    ) -> TPGroup:
        """Join the group (blocks until every rank has joined, or ``timeout_s``)."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        return cls(rank, world, device)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------------------------- step channel
    def send(self, cmd: str, payload: Any = None) -> None:
        """Rank 0: broadcast a command and its payload to the followers."""
        tensors: list[torch.Tensor] = []
        skel = _flatten(payload, tensors)
        metas = [(tuple(t.shape), t.dtype) for t in tensors]
        dist.broadcast_object_list([(cmd, skel, metas)], src=0, device=self.comm_device)  # any thread
        for dtype in _dtypes(metas):
            flat = torch.cat([t.reshape(-1) for t in tensors if t.dtype == dtype])
            dist.broadcast(flat.to(self.comm_device), src=0)

    def recv(self) -> tuple[str, Any]:
        """Follower: wait for rank 0's next command; its tensors arrive on this rank's device."""
        header: list[Any] = [None]
        dist.broadcast_object_list(header, src=0, device=self.comm_device)
        cmd, skel, metas = header[0]
        tensors: list[torch.Tensor | None] = [None] * len(metas)
        for dtype in _dtypes(metas):
            idx = [i for i, (_, d) in enumerate(metas) if d == dtype]
            sizes = [math.prod(metas[i][0]) for i in idx]
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.comm_device)
            dist.broadcast(flat, src=0)
            for i, part in zip(idx, flat.to(self.device).split(sizes), strict=True):
                tensors[i] = part.view(metas[i][0])
        return cmd, _unflatten(skel, tensors)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, on every rank."""
        out: list[Any] = [None] * self.world
        # NCCL gathers objects on the calling thread's current CUDA device: make it this rank's
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            dist.all_gather_object(out, obj)
        return out


def _dtypes(metas: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.dtype]:
    return sorted({d for _, d in metas}, key=str)
