"""Which samples go into which micro-batch: best-fit-decreasing packing and a seeded, modality-aware sampler.

    sampler = MicroBatchSampler(ds.lengths, ds.is_multimodal, ds.indices, token_budget=4096, seed=42,
                                micro_batches_per_step=world_size * grad_accum)
    for step, micro in sampler.steps(epoch):          # micro: list of micro-batches, each a list of indices
        mine = micro[rank::world_size]                 # this rank's grad-accumulation micro-batches

Every optimizer step consumes ``world_size * gradient_accumulation_steps`` micro-batches, chosen the same way
whatever the split: one process accumulating 2 micro-batches sees exactly what two processes see between them.
The plan of an epoch is a pure function of (seed, epoch), so resuming at step k replays nothing and skips
nothing. A trailing incomplete step is dropped (and counted).

Packing (``token_budget``): samples are shuffled, split by modality (image vs text-only, LLaVA's
``group_by_modality_length``) and, window by window, packed by best fit: each sample goes into the open bin
with the least room that still fits it. The bins are then shuffled. Two orders (``strategy``):

- ``bfd`` (best-fit-decreasing, the default): longest first. The tightest packs, but a bin holds samples of
  nearly equal length, so a micro-batch is a length-sorted slice of the data -- harmless when length says
  little about content, harmful when it does: on the synthetic shapes set (where the answer word fixes the
  length) the default model trained with ``bfd`` micro-batches of ~8 samples stopped at 62% held-out accuracy
  where random micro-batches reach 100% (same steps, same model, one optimizer step per micro-batch).
- ``shuffled``: best fit in the shuffled order (no sort). Micro-batches are random samples of the data, as
  unpacked training's are; packs are slightly less tight when samples are large against the budget.

Unpacked: micro-batches of ``batch_size`` samples per modality, shuffled (the padded baseline).
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

PACKING_STRATEGIES = ("bfd", "shuffled")


def best_fit_decreasing(items: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Pack ``(index, length)`` items into bins of ``budget`` tokens, longest first; returns bins of indices."""
    return best_fit(sorted(items, key=lambda x: (-x[1], x[0])), budget)


def best_fit(items: list[tuple[int, int]], budget: int) -> list[list[int]]:
    """Pack ``(index, length)`` items, in the order given, into bins of ``budget`` tokens; returns bins of indices.

    O(n log n): open bins are kept sorted by remaining room, and each item goes to the first bin (least
    room) whose room is at least its length.
    """
    order = items
    rooms: list[tuple[int, int]] = []  # (room, bin id), sorted
    bins: list[list[int]] = []
    for idx, length in order:
        if length > budget:
            raise ValueError(f"sample {idx} has {length} tokens, more than the budget of {budget}")
        pos = bisect.bisect_left(rooms, (length, -1))
        if pos < len(rooms):
            room, b = rooms.pop(pos)
        else:
            room, b = budget, len(bins)
            bins.append([])
        bins[b].append(idx)
        bisect.insort(rooms, (room - length, b))
    return bins


@dataclass
class MicroBatchSampler:
    """Plans the micro-batches of each epoch (see the module docstring)."""

    lengths: list[int]
    is_multimodal: list[bool]
    indices: list[int]  # the usable samples
    micro_batches_per_step: int = 1
    token_budget: int | None = None  # packing when set
    batch_size: int = 1  # samples per micro-batch when not packing
    seed: int = 42
    group_by_modality: bool = True
    window: int = 8192  # samples packed together (bounds BFD's length sorting to a window: keeps randomness)
    strategy: str = "bfd"  # bfd | shuffled (see the module docstring)

    def __post_init__(self) -> None:
        if self.strategy not in PACKING_STRATEGIES:
            raise ValueError(f"packing strategy must be one of {PACKING_STRATEGIES}, got {self.strategy!r}")

    def micro_batches(self, epoch: int) -> list[list[int]]:
        """All micro-batches of ``epoch`` in order."""
        rng = random.Random(self.seed * 7919 + epoch)
        order = list(self.indices)
        rng.shuffle(order)
        groups = (
            [[i for i in order if self.is_multimodal[i]], [i for i in order if not self.is_multimodal[i]]]
            if self.group_by_modality
            else [order]
        )
        batches: list[list[int]] = []
        for group in groups:
            for start in range(0, len(group), self.window if self.token_budget else len(group) or 1):
                chunk = group[start : start + (self.window if self.token_budget else len(group))]
                if self.token_budget:
                    items = [(i, self.lengths[i]) for i in chunk]
                    pack = best_fit_decreasing if self.strategy == "bfd" else best_fit
                    bins = pack(items, self.token_budget)
                    batches.extend(bins)
                else:
                    batches.extend(chunk[j : j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        return [b for b in batches if b]

    def steps(self, epoch: int, start_step: int = 0):
        """Yield ``(step_in_epoch, [micro_batch, ...])`` from ``start_step`` on."""
        mbs = self.micro_batches(epoch)
        k = self.micro_batches_per_step
        for s in range(start_step, len(mbs) // k):
            yield s, mbs[s * k : (s + 1) * k]

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return len(self.micro_batches(epoch)) // self.micro_batches_per_step

    def dropped_per_epoch(self, epoch: int = 0) -> int:
        """Micro-batches of the trailing incomplete step (not trained on this epoch)."""
        return len(self.micro_batches(epoch)) % self.micro_batches_per_step
