"""Sampling and the static-batch generate loop behind ``LlavaModel.generate``.

Sampling is batched and free of per-request host syncs: every row carries its own temperature, top-p,
top-k and seed as tensors. Randomness is a counter-based hash of (seed, step, token id), turned into Gumbel
noise, so a request samples the same tokens whatever batch it runs in (batch invariance, reproducible seeds).

The loop: one packed prefill writes every prompt's K/V into a paged cache, then one batched decode step per
token through paged attention. The continuous-batching engine reuses the same pieces with a scheduler.
"""

from __future__ import annotations

import math

import torch

from fastllava.mm_utils import StopStrings
from fastllava.model.language import AttnMetadata, KVCache
from fastllava.packing import PackedBatch

_MASK64 = (1 << 64) - 1


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


def _eos_ids(model, tokenizer, eos_token_id) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
        if eos_token_id is None:
            eos_token_id = model.config.text.eos_token_id
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def generate(
    model,
    input_ids: torch.Tensor,
    images=None,
    image_sizes=None,
    attention_mask: torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float | None = None,
    top_k: int | None = None,
    max_new_tokens: int = 128,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: list[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    streamer=None,
    num_beams: int = 1,
    block_size: int = 16,
    pixel_values=None,
    stopping_criteria=None,
    **unused,
) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` for every prompt of a padded batch; returns the new ids ``[B, n]``
    (rows that finished early are padded with ``pad_token_id``, default the first EOS id or 0).

    Stops a row at EOS or when its decoded text contains one of ``stop_strings`` (needs ``tokenizer``).
    ``temperature == 0`` or ``do_sample=False`` is greedy. ``images`` + ``image_sizes`` as (W, H) is LLaVA's
    call, ``pixel_values`` + (H, W) transformers'. ``stopping_criteria`` (transformers' / LLaVA's
    ``KeywordsStoppingCriteria``) are called as transformers calls them: with prompt + generated ids
    ``[B, L + n]`` and the last logits, returning a bool or a ``[B]`` bool tensor. ``streamer`` gets
    ``put(prompt ids)``, ``put(token [B])`` per step and ``end()``, as transformers' streamers expect.
    ``use_cache``, ``position_ids`` and the other keywords transformers' generate takes are ignored.
    """
    if num_beams != 1:
        raise ValueError("beam search is not supported; use num_beams=1 (LLaVA's default)")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings need the tokenizer to decode the generated text")
    device = model.device
    batch, _ = model._pack_padded(input_ids, attention_mask, images, image_sizes, None, pixel_values)
    B = len(batch.seq_lens)
    eos = _eos_ids(model, tokenizer, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    # paged cache: each row owns a contiguous run of blocks, enough for prompt + new tokens
    lens = batch.seq_lens
    blocks_per_row = [math.ceil((n + max_new_tokens) / block_size) for n in lens]
    max_blocks = max(blocks_per_row)
    cache = KVCache(model.config.text, B * max_blocks, block_size, device, model.dtype)
    block_tables = torch.arange(B * max_blocks, device=device, dtype=torch.int32).view(B, max_blocks)
    row = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(lens, device=device))
    slots = row * max_blocks * block_size + batch.position_ids  # rows' blocks are contiguous
    meta = AttnMetadata(cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen, slot_mapping=slots)
    max_position = max(lens) + max_new_tokens
    hidden = model.forward_packed(batch, meta, cache, max_position=max_position)
    logits = model.logits(hidden[batch.last_token_index()])  # (B, V)

    greedy = not do_sample or temperature == 0
    temp = torch.full((B,), 0.0 if greedy else float(temperature), device=device)
    tp = torch.full((B,), float(top_p) if top_p is not None else 1.0, device=device)
    tk = torch.full((B,), int(top_k) if top_k else 0, device=device, dtype=torch.long)
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    seeds = torch.full((B,), int(seed), device=device, dtype=torch.long)
    eos_t = torch.tensor(eos, device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    context = torch.tensor(lens, device=device, dtype=torch.long)
    out: list[torch.Tensor] = []
    stops = StopStrings(stop_strings, tokenizer) if stop_strings else None
    if streamer is not None:
        streamer.put(input_ids.cpu())
    for step in range(max_new_tokens):
        steps = torch.full((B,), step, device=device, dtype=torch.long)
        # greedy: the argmax `sample` would return, without its full-vocabulary sort and noise
        token = logits.argmax(-1) if greedy else sample(logits, temp, tp, tk, seeds, steps)
        token = torch.where(finished, torch.full_like(token, pad), token)
        out.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if eos:
            finished |= torch.isin(token, eos_t)
        if stops is not None:  # decodes a short tail per row: one host sync per step, only when asked
            ids = torch.stack(out, 1).tolist()
            for b in range(B):
                if stops.check(ids[b]):
                    finished[b] = True
        if stopping_criteria:
            full = torch.cat([input_ids.to(device), torch.stack(out, 1)], 1)  # (B, L + n), as transformers passes
            for criterion in stopping_criteria:
                finished |= torch.as_tensor(criterion(full, logits), device=device, dtype=torch.bool).expand(B)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        # decode step: one token per row at position `context`
        slot = torch.arange(B, device=device) * max_blocks * block_size + context
        step_batch = PackedBatch(
            input_ids=token,
            position_ids=context,
            cu_seqlens=torch.arange(B + 1, device=device, dtype=torch.int32),
            max_seqlen=1,
            seq_lens=[1] * B,
        )
        context = context + 1
        meta = AttnMetadata(
            cu_seqlens=step_batch.cu_seqlens,
            max_seqlen=1,
            slot_mapping=slot,
            block_tables=block_tables,
            context_lens=context,
            decode=True,
        )
        hidden = model.forward_packed(step_batch, meta, cache, max_position=max_position)
        logits = model.logits(hidden)
    if streamer is not None:
        streamer.end()
    return torch.stack(out, 1)
