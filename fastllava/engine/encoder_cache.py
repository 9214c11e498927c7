"""Encoder cache: projected image features ``[slots, D]`` keyed by the image's content hash.

The scheduler decides (bookkeeping only: ``has``/``acquire``/``release``) which images the vision tower must
run this step; the runner ``put``s their features and reads rows back while the image's slots are being
prefilled. An entry a request still needs holds a reference and is never evicted; entries nobody holds stay
cached (LRU) until the total rows exceed ``capacity_rows``. A resent image (the LLaVA web UI sends the whole
conversation every turn) is therefore encoded once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch


@dataclass
class _Entry:
    features: torch.Tensor | None = None  # None until the runner has encoded it
    users: set[str] = field(default_factory=set)


class EncoderCache:
    def __init__(self, capacity_rows: int) -> None:
        self.capacity_rows = capacity_rows
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order, most recent last
        self.rows = 0  # rows of features held
        self.hits = 0  # images served from the cache
        self.misses = 0  # images that had to be encoded

    # ---------------------------------------------------------------- scheduler side (no tensors)
    def has(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.features is not None

    def acquire(self, key: str, request_id: str) -> None:
        entry = self._entries.setdefault(key, _Entry())
        entry.users.add(request_id)
        self._entries.move_to_end(key)

    def release(self, key: str, request_id: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            return
        entry.users.discard(request_id)
        if not entry.users and entry.features is None:
            del self._entries[key]  # a placeholder nobody will fill
        else:
            self._evict()

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    @property
    def num_refs(self) -> int:
        """References held by requests (0 once every request has finished or been aborted)."""
        return sum(len(e.users) for e in self._entries.values())

    # ---------------------------------------------------------------------------- runner side
    def put(self, key: str, features: torch.Tensor) -> None:
        entry = self._entries.setdefault(key, _Entry())
        if entry.features is None:
            self.rows += features.shape[0]
        entry.features = features
        self._evict()

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries.get(key)
        if entry is None or entry.features is None:
            raise KeyError(f"image {key[:12]}... is not in the encoder cache (scheduler/runner out of step)")
        return entry.features

    def _evict(self) -> None:
        if self.rows <= self.capacity_rows:
            return
        for key in [k for k, e in self._entries.items() if not e.users and e.features is not None]:
            self.rows -= self._entries.pop(key).features.shape[0]
            if self.rows <= self.capacity_rows:
                return

    def clear(self) -> None:
        """Drop every entry nobody holds."""
        for key in [k for k, e in self._entries.items() if not e.users]:
            entry = self._entries.pop(key)
            if entry.features is not None:
                self.rows -= entry.features.shape[0]
