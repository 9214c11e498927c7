"""Sampling: ``sample`` over per-row tensors, and ``BatchSampler``, the running batch's settings as those tensors.

``sample`` is batched and free of per-request host syncs: every row carries its own temperature, top-p, top-k
and seed as tensors. Randomness is a counter-based hash of (seed, step, token id), turned into Gumbel noise, so
a request samples the same tokens whatever batch it runs in (batch invariance, reproducible seeds).

``BatchSampler`` builds those tensors (temperature, top-p, top-k, seed, step). Building them from every
request's ``SamplingParams`` on every step is five small host tensors and five host->device copies per token. A
decode batch is mostly the same requests in the same order from one step to the next, each one token further:
then only the step counters change, by one, on the device. The tensors are rebuilt (two copies) only when the
rows differ from the last step's (a request joined, left, or was preempted; a row that left always misses at
least one step, so a match means every row sampled exactly once since).

Values are validated by ``SamplingParams`` at admission (int64 seeds and top-k, finite floats), so building
them cannot raise inside a step.
"""

from __future__ import annotations

import math

import torch

from fastllava.engine.request import Request


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


_C1, _C2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps mod 2^64)."""
    x = x ^ _shr(x, 30)
    x = x * _C1
    x = x ^ _shr(x, 27)
    x = x * _C2
    return x ^ _shr(x, 31)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1), a pure function of (seed, step, token id)."""
    key = _mix64(seeds.long() * _GOLDEN + steps.long())  # (B,)
    ids = torch.arange(vocab, device=seeds.device, dtype=torch.long)
    bits = _mix64(key[:, None] ^ (ids[None, :] * _C2))
    u = (_shr(bits, 11).double() + 0.5) / float(1 << 53)
    return u


def sample(
    logits: torch.Tensor,  # (B, V)
    temperature: torch.Tensor,  # (B,) 0 = greedy
    top_p: torch.Tensor,  # (B,) 1.0 = off
    top_k: torch.Tensor,  # (B,) 0 = off
    seeds: torch.Tensor,  # (B,) int64
    steps: torch.Tensor,  # (B,) int64, tokens generated so far
) -> torch.Tensor:
    """Next token per row: greedy where temperature is 0, else a sample from the temperature-scaled,
    top-k and top-p filtered distribution (Gumbel-max over the kept tokens)."""
    logits = logits.float()
    greedy = logits.argmax(-1)
    scaled = logits / temperature.clamp(min=1e-5)[:, None]
    sorted_logits, order = scaled.sort(-1, descending=True)  # (B, V)
    rank = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    probs = sorted_logits.softmax(-1)
    # nucleus: drop a token when the mass before it already reaches top_p (always keeps the first)
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1]))).float()
    choice = (sorted_logits + gumbel.gather(1, order)).argmax(-1)
    sampled = order.gather(1, choice[:, None]).squeeze(1)
    return torch.where(temperature > 0, sampled, greedy)


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
