"""A follower rank (1..N-1) of a tensor-parallel model: load this rank's shard, then run every call rank 0
sends, on this rank's shard, until told to stop. Started by ``launch.launch``, never by hand:

    python -m fastllava.distributed.follower '{"rank": 1, "world": 2, "init_method": "tcp://...", "load": {...}}'

Exits 0 when rank 0 says stop, non-zero when rank 0 goes away (its process, or a collective timing out).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Any

import torch

from fastllava.distributed.comm import TPGroup
from fastllava.distributed.launch import parameter_bytes, rank_device
from fastllava.distributed.loading import RankShard
from fastllava.engine.decode_graphs import DecodeGraphs
from fastllava.model.language import KVCache

log = logging.getLogger("fastllava.tp")
MAX_CACHES = 4  # K/V caches kept (one per rank-0 engine; older ones are dropped)


def _watch_parent(parent: int) -> None:
    """Exit when rank 0's process is gone (orphaned followers never linger)."""
    while True:
        if os.getppid() != parent:
            log.error("rank 0 (pid %d) is gone; exiting", parent)
            os._exit(1)
        time.sleep(0.5)


class Follower:
    """Runs rank 0's calls on this rank's shard; keeps this rank's K/V caches."""

    def __init__(self, model, group: TPGroup) -> None:
        self.model, self.group = model, group
        self.caches: dict[tuple, KVCache] = {}
        self.graphs: dict[tuple, DecodeGraphs] = {}  # per cache: this rank's decode graphs (rank 0's buckets)

    def cache(self, key: tuple | None) -> KVCache | None:
        if key is None:
            return None
        if key not in self.caches:
            _, num_blocks, block_size, dtype = key
            lm = self.model.language_model
            while len(self.caches) >= MAX_CACHES:
                oldest = next(iter(self.caches))
                self.caches.pop(oldest)
                self.graphs.pop(oldest, None)
            self.caches[key] = KVCache(lm.cfg, num_blocks, block_size, self.group.device, dtype, lm.num_kv_heads)
        return self.caches[key]

    @torch.inference_mode()
    def run(self, cmd: str, payload: Any) -> None:
        if cmd == "forward":
            batch, meta, cache_key, image_features, max_position = payload
            self.model.forward_packed(batch, meta, self.cache(cache_key), image_features, max_position)
        elif cmd == "decode_graphs":  # built (and captured) in step with rank 0's
            cache_key, kwargs = payload
            self.graphs.pop(cache_key, None)
            self.graphs[cache_key] = DecodeGraphs(self.model, self.cache(cache_key), **kwargs)
        elif cmd == "decode_step":
            cache_key, rows, block_tables = payload
            if cache_key not in self.graphs:
                raise ValueError("a decode step for decode graphs this rank has not built")
            self.graphs[cache_key].run_rows(rows, block_tables)
        elif cmd == "logits":
            self.model.logits(payload)
        elif cmd == "attn":
            self.model.set_attn_implementation(payload)
        elif cmd == "parameter_bytes":
            self.group.gather_objects(parameter_bytes(self.model))
        elif cmd != "ping":
            raise ValueError(f"unknown tensor-parallel command {cmd!r}")

    def serve(self) -> None:
        while True:
            cmd, payload = self.group.recv()
            if cmd == "stop":
                return
            try:
                self.run(cmd, payload)
            except (RuntimeError, ValueError) as e:
                if isinstance(e, torch.distributed.DistError):
                    raise
                # the same call failed on rank 0 too (same code, same inputs): its request fails, we go on
                log.exception("tensor-parallel call %r failed on this rank", cmd)


def main(argv: list[str] | None = None) -> int:
    from fastllava.model.builder import load_rank_model

    spec = json.loads((argv or sys.argv[1:])[0])
    rank, world, load = spec["rank"], spec["world"], spec["load"]
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(message)s")
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    if load.get("device", "cpu") == "cpu":  # CPU ranks share the cores
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    device = rank_device(load.get("device", "cpu"), rank)
    group = TPGroup.init(rank, world, spec["init_method"], device)
    error, model = None, None
    try:
        model = load_rank_model(RankShard(rank, world), {**load, "device": str(device)})
    except Exception as e:
        log.exception("loading rank %d's shard failed", rank)
        error = f"{type(e).__name__}: {e}"
    failed = any(s is not None for s in group.gather_objects(error))
    if not failed:
        Follower(model, group).serve()
    return 1 if failed else 0


def _exit_now(status: int) -> None:
    """Leave without tearing the process group down: rank 0 may still hold its end of gloo's connections, and
    destroying ours under it can abort the process from a C++ destructor ("terminate called without an active
    exception"), turning a clean stop into a failure exit. Nothing is left to flush but the logs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    _exit_now(main())
