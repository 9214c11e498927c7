"""Paged KV-cache bookkeeping: fixed-size blocks, per-request block tables, ref counts, prefix caching.

No tensors here: a block is an index into ``KVCache.k[layer][block]``. Prefix caching (vLLM's automatic
prefix caching): once a block is full of computed tokens it is registered under its chained hash
(``Request.block_hashes``: parent hash, token ids, and the images in it). A new request looks its full
prompt blocks up in order and reuses the hits (ref count + 1) instead of prefilling them. Freed blocks go to
a free queue: blocks without a hash at the front (reused first), cached ones at the back in LRU order; a
cached block is evicted (its hash dropped) only when the allocator pops it for a new use.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from fastllava.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding those tokens' K/V
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = next to use
        self.tables: dict[str, list[int]] = {}  # request id -> its blocks, in token order
        self._num_registered: dict[str, int] = {}  # request id -> how many of its blocks are hashed
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens found cached

    # --------------------------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.block_size)

    def cached_prefix(self, request: Request) -> tuple[list[int], int]:
        """Cached blocks that hold a prefix of ``request``'s tokens, and how many tokens they cover.

        Always leaves at least one token to compute: the last one's logits give the next token.
        """
        if not self.enable_prefix_caching or request.request_id in self.tables:
            return [], 0
        n_full = request.num_tokens // self.block_size
        blocks: list[int] = []
        for h in request.block_hashes(self.block_size, n_full):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        if blocks and len(blocks) * self.block_size >= request.num_tokens:
            blocks.pop()
        return blocks, len(blocks) * self.block_size

    # ------------------------------------------------------------------------------- mutations
    def allocate(self, request: Request, num_tokens: int, prefix_blocks: list[int] | None = None) -> bool:
        """Make ``request``'s table cover ``num_tokens`` tokens (first taking ``prefix_blocks``, cache hits).

        Returns False, changing nothing, when too few blocks are free.
        """
        table = self.tables.get(request.request_id, [])
        prefix_blocks = prefix_blocks or []
        need = self.blocks_needed(num_tokens) - len(table) - len(prefix_blocks)
        reviving = sum(1 for b in prefix_blocks if self.ref_counts[b] == 0)  # hits now sitting in the free queue
        if need > len(self.free) - reviving:
            return False
        for b in prefix_blocks:
            if self.ref_counts[b] == 0:
                del self.free[b]
            self.ref_counts[b] += 1
        if prefix_blocks:
            table = table + prefix_blocks
        for _ in range(max(need, 0)):
            b, _ = self.free.popitem(last=False)
            if self.block_hash[b] is not None:  # evict: this block's old contents are about to be overwritten
                del self.cached[self.block_hash[b]]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            table.append(b)
        self.tables[request.request_id] = table
        if prefix_blocks:
            self._num_registered[request.request_id] = len(prefix_blocks)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block of ``request`` that is now full of computed tokens under its hash."""
        if not self.enable_prefix_caching:
            return
        rid = request.request_id
        table = self.tables[rid]
        done = self._num_registered.get(rid, 0)
        n_full = min(request.num_computed_tokens // self.block_size, len(table))
        if n_full <= done:
            return
        hashes = request.block_hashes(self.block_size, n_full)
        for i in range(done, n_full):
            b, h = table[i], hashes[i]
            if h not in self.cached and self.block_hash[b] is None:  # a duplicate stays uncached
                self.cached[h] = b
                self.block_hash[b] = h
        self._num_registered[rid] = n_full

    def free_request(self, request_id: str) -> None:
        """Drop a request's blocks (finish, abort, preemption). Tail blocks go first, so they are evicted
        before the shared head of a conversation."""
        table = self.tables.pop(request_id, [])
        self._num_registered.pop(request_id, None)
        for b in reversed(table):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] == 0:
                self.free[b] = None
                if self.block_hash[b] is None:
                    self.free.move_to_end(b, last=False)

    def record_prefix_lookup(self, query_tokens: int, hit_tokens: int) -> None:
        self.prefix_queries += query_tokens
        self.prefix_hits += hit_tokens

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (blocks in use keep their contents)."""
        for b in self.cached.values():
            self.block_hash[b] = None
        self.cached.clear()
