"""Starting a tensor-parallel model: rank 0 (the caller: a worker, a script) spawns one follower process per
other rank, every rank loads its own shard, and rank 0 returns a ``TensorParallelModel`` the engine drives.

    model = launch(2, load_kwargs, device="cuda")     # what load_pretrained_model(tensor_parallel_size=2) does
    engine = LLMEngine(model, tokenizer)              # unchanged: every forward is mirrored on the followers

Rank 0 owns the scheduler and sampling. Each language-model call (``forward_packed``, ``logits``) is first
sent to the followers (``TPGroup.send``: the step's batch description) and then run locally; the followers
run the same call on their shards (``follower.py``), meeting rank 0 in every all-reduce and all-gather.
Images are encoded on rank 0 only; their features travel with the step that scatters them.

Failures: a monitor thread watches the follower processes; when one exits, the model is marked failed
(``RankFailedError`` from every later call, and from a collective that was waiting on the dead rank) and
the ``on_failure`` callbacks run (the worker turns unhealthy and exits non-zero). Followers watch rank 0
in turn (its exit, or a collective timing out, ends them). While idle, rank 0 sends a keep-alive so that
the followers' wait for the next step never reaches the collective timeout.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import fastllava
from fastllava.distributed.comm import DEFAULT_TIMEOUT_S, RankFailedError, TPGroup
from fastllava.distributed.loading import RankShard
from fastllava.engine.decode_graphs import DecodeGraphs

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0  # rank 0 pings idle followers this often (well inside the collective timeout)


def rank_device(device: str | torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda`` / ``cuda:k`` -> ``cuda:(k + rank)``; CPU ranks share the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return device
    index = (device.index or 0) + rank
    if index >= torch.cuda.device_count():
        raise ValueError(f"tensor-parallel rank {rank} needs cuda:{index}, but only {torch.cuda.device_count()} GPUs")
    return torch.device("cuda", index)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TensorParallelModel:
    """Rank 0's model: the engine's model interface over this rank's shard, mirroring each language-model
    call on the follower ranks. ``config``, ``device``, ``dtype`` and ``language_model`` are rank 0's."""

    def __init__(self, local, group: TPGroup, followers: list[subprocess.Popen]) -> None:
        self.local = local
        self.group = group
        self.followers = followers
        self.config = local.config
        self.language_model = local.language_model
        self.tensor_parallel_size = group.world
        self.image_processor = None
        self.failure: RankFailedError | None = None
        self._on_failure: list[Callable[[RankFailedError], None]] = []
        self._lock = threading.Lock()
        self._last_send = time.monotonic()
        self._closed = False
        threading.Thread(target=self._watch, name="tp-monitor", daemon=True).start()
        threading.Thread(target=self._keepalive, name="tp-keepalive", daemon=True).start()
        atexit.register(self.close)

    # ------------------------------------------------------------------------------- model interface
    @property
    def device(self) -> torch.device:
        return self.local.device

    @property
    def dtype(self) -> torch.dtype:
        return self.local.dtype

    def eval(self) -> TensorParallelModel:
        self.local.eval()
        return self

    def parameters(self):
        return self.local.parameters()

    def set_attn_implementation(self, name: str | None) -> None:
        self._call("attn", name, lambda: self.local.set_attn_implementation(name))

    def encode_images(self, pixel_values: torch.Tensor, feature_index: torch.Tensor | None = None) -> torch.Tensor:
        return self.local.encode_images(pixel_values, feature_index)  # rank 0 only: the tower is not sharded

    def forward_packed(self, batch, meta=None, cache=None, image_features=None, max_position=None) -> torch.Tensor:
        """Final hidden states ``[T, D]`` (the same on every rank); the followers run the same forward."""
        if image_features is None and batch.image_offsets is not None:
            image_features = self.local.encode_images(batch.pixel_values, batch.feature_index).flatten(0, -2)
        sent = dataclasses.replace(batch, pixel_values=None, feature_index=None, labels=None)
        return self._call(
            "forward",
            (sent, meta, _cache_key(cache), image_features, max_position),
            lambda: self.local.forward_packed(sent, meta, cache, image_features, max_position),
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of the given rows (sent to the followers: each computes its vocabulary slice)."""
        return self._call("logits", hidden, lambda: self.local.logits(hidden))

    def decode_graphs(self, kv, block_tables=None, **kwargs) -> DecodeGraphs:
        """Rank 0's ``DecodeGraphs`` over its shard (``kwargs``: the constructor's); each follower builds its own
        of the same buckets over its shard and K/V cache at the same time (capturing the step's collectives in
        the same order), and runs each step with the inputs rank 0 sends (``DecodeGraphs.send_step``)."""
        key = _cache_key(kv)
        graphs = self._call(
            "decode_graphs", (key, kwargs), lambda: DecodeGraphs(self.local, kv, block_tables=block_tables, **kwargs)
        )
        graphs.send_step = lambda rows, tables, launch: self._call("decode_step", (key, rows, tables), launch)
        return graphs

    def parameter_bytes(self) -> list[int]:
        """Bytes of parameters held by each rank (rank 0 first; it alone holds the vision tower)."""
        return self._call("parameter_bytes", None, lambda: self.group.gather_objects(parameter_bytes(self.local)))

    # ------------------------------------------------------------------------------------- failures
    def on_failure(self, callback: Callable[[RankFailedError], None]) -> None:
        """Call ``callback(error)`` (from a monitor thread) when a rank dies; at once if one already has."""
        self._on_failure.append(callback)
        if self.failure is not None:
            callback(self.failure)

    def _fail(self, error: RankFailedError) -> RankFailedError:
        if self.failure is None and not self._closed:
            self.failure = error
            log.error("tensor parallelism failed: %s", error)
            for cb in self._on_failure:
                cb(error)
        return self.failure or error

    def _dead_follower(self) -> RankFailedError | None:
        for rank, p in enumerate(self.followers, start=1):
            code = p.poll()
            if code is not None:
                return RankFailedError(f"tensor-parallel rank {rank} (pid {p.pid}) exited with status {code}")
        return None

    def _call(self, cmd: str, payload: Any, run: Callable[[], Any]) -> Any:
        with self._lock:
            if self.failure is not None:
                raise self.failure
            try:
                self.group.send(cmd, payload)
                self._last_send = time.monotonic()
                return run()
            except Exception as e:
                dead = self._wait_dead_follower(1.0)  # a peer's reset socket can come before its exit status
                if dead is None and not isinstance(e, dist.DistError) and "gloo" not in str(e):
                    raise  # an error of this call on every rank (the followers log it and go on)
                raise self._fail(dead or RankFailedError(f"tensor-parallel collective failed: {e}")) from e

    def _wait_dead_follower(self, timeout: float) -> RankFailedError | None:
        deadline = time.monotonic() + timeout
        while (dead := self._dead_follower()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return dead

    def _watch(self) -> None:
        while not self._closed and self.failure is None:
            dead = self._dead_follower()
            if dead is not None:
                self._fail(dead)
                return
            time.sleep(0.2)

    def _keepalive(self) -> None:
        while not self._closed and self.failure is None:
            time.sleep(1.0)
            if time.monotonic() - self._last_send < KEEPALIVE_S or not self._lock.acquire(blocking=False):
                continue
            try:
                if self.failure is None and not self._closed:
                    self.group.send("ping")
                    self._last_send = time.monotonic()
            except Exception as e:
                self._fail(self._dead_follower() or RankFailedError(f"tensor-parallel keep-alive failed: {e}"))
            finally:
                self._lock.release()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the followers and leave the process group (idempotent)."""
        if self._closed:
            return
        with self._lock:
            self._closed = True
            if self.failure is None:
                try:
                    self.group.send("stop")
                except Exception as e:  # a follower already gone: it is killed below
                    log.warning("could not tell the followers to stop: %s", e)
        deadline = time.monotonic() + timeout
        for p in self.followers:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.group.close()


def _cache_key(cache) -> tuple | None:
    """What names a rank-0 K/V cache to the followers (each keeps one of its own K/V heads, same geometry)."""
    return None if cache is None else (id(cache), cache.num_blocks, cache.block_size, cache.k[0].dtype)


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (packed 4-bit weights count as stored)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _follower_env() -> dict[str, str]:
    """This environment, with the folder holding the ``fastllava`` package that rank 0 runs first on the path."""
    root = str(Path(fastllava.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else root + os.pathsep + path}


def launch(world: int, load_kwargs: dict[str, Any], load_rank: Callable[[RankShard], Any]) -> TensorParallelModel:
    """Rank 0: spawn ranks 1..world-1 (``python -m fastllava.distributed.follower``), join the group, load
    rank 0's shard with ``load_rank``; raises if any rank fails to load (naming it and its error).

    ``load_kwargs`` (JSON-serialisable) go to the followers' loader; ``device`` in them is rank 0's device."""
    device = rank_device(load_kwargs.get("device", "cpu"), 0)
    for r in range(1, world):
        rank_device(load_kwargs.get("device", "cpu"), r)  # enough GPUs, before any process starts
    init_method = f"tcp://127.0.0.1:{free_port()}"
    followers = []
    for r in range(1, world):
        spec = {"rank": r, "world": world, "init_method": init_method, "load": load_kwargs}
        cmd = [sys.executable, "-m", "fastllava.distributed.follower", json.dumps(spec)]
        followers.append(subprocess.Popen(cmd, env=_follower_env()))
    try:
        group = TPGroup.init(0, world, init_method, device, DEFAULT_TIMEOUT_S)
    except Exception:
        for p in followers:
            p.kill()
        raise
    error = None
    try:
        local = load_rank(RankShard(0, world))
    except Exception as e:
        error, local = e, None
    statuses = group.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        group.close()
        for p in followers:
            p.wait(10)
        if error is not None:
            raise error
        r, s = failed[0]
        raise RuntimeError(f"tensor-parallel rank {r} failed to load its shard: {s}")
    return TensorParallelModel(local, group, followers)
