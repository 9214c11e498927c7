"""The sampling settings of the running batch, as device tensors built when the batch changes.

``fastllava.generation.sample`` takes per-row tensors (temperature, top-p, top-k, seed, step). Building them
from every request's ``SamplingParams`` on every step is five small host tensors and five host->device copies
per token. A decode batch is mostly the same requests in the same order from one step to the next, each one
token further: then only the step counters change, by one, on the device. The tensors are rebuilt (two
copies) only when the rows differ from the last step's (a request joined, left, or was preempted; a row
that left always misses at least one step, so a match means every row sampled exactly once since).

Values are validated by ``SamplingParams`` at admission (int64 seeds and top-k, finite floats), so building
them cannot raise inside a step.
"""

from __future__ import annotations

import torch

from fastllava.engine.request import Request
from fastllava.generation import sample


class BatchSampler:
    """``sampler(logits, reqs)``: the next token of every row, ``(B,)`` int64 on the logits' device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._rows: list[Request] = []  # the last step's rows (held, so that no id can be reused meanwhile)
        self._greedy = True
        self._floats = self._longs = None  # (2, B) temperature, top_p; (3, B) top_k, seed, step
        self.num_rebuilds = 0

    def __call__(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        same = len(reqs) == len(self._rows) and all(a is b for a, b in zip(reqs, self._rows, strict=True))
        if same:
            if not self._greedy:
                self._longs[2] += 1  # every row is one token further than at the last step
        else:
            self._rebuild(reqs)
        if self._greedy:
            return logits.argmax(-1)  # what `sample` returns for all-greedy rows, without its sort
        f, lg = self._floats, self._longs
        return sample(logits, f[0], f[1], lg[0], lg[1], lg[2])

    def _rebuild(self, reqs: list[Request]) -> None:
        self._rows = list(reqs)
        self.num_rebuilds += 1
        params = [r.params for r in reqs]
        self._greedy = all(p.temperature == 0 for p in params)
        if self._greedy:
            return
        floats = torch.tensor([[p.temperature for p in params], [p.top_p for p in params]], dtype=torch.float32)
        longs = torch.tensor(
            [
                [p.top_k for p in params],
                [p.seed or 0 for p in params],
                [len(r.output_token_ids) for r in reqs],  # tokens generated so far: the noise stream's index
            ],
            dtype=torch.long,
        )
        self._floats = floats.to(self.device)
        self._longs = longs.to(self.device)
