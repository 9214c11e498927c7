"""Attention backends over packed (varlen) sequences, in one registry.

Every backend takes packed ``q [T, Hq, D]``, ``k, v [T, Hk, D]`` (Hq a multiple of Hk: GQA is native) and
``cu_seqlens [B+1]`` int32, and returns ``[T, Hq, D]``. No token attends across a sequence boundary.

    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend="auto")

Decode runs one new token per sequence over a paged KV cache (``paged_attention``); the cache layout is
``[num_blocks, block_size, Hk, D]`` per layer, addressed through ``block_tables [B, max_blocks]``.

``sdpa`` is the reference: always available, one fused call with a block-diagonal mask (O(T^2) memory,
fine for a reference and for CPU-sized batches).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Backend:
    name: str
    fn: Callable  # fn(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k)
    available: Callable[[torch.device | None], bool]
    install_hint: str  # what to install when unavailable
    priority: int = 0  # higher wins under "auto"
    supports_window: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")


_BACKENDS: dict[str, Backend] = {}


def register_backend(
    name: str,
    fn: Callable,
    *,
    available: Callable[[torch.device | None], bool] = lambda device=None: True,
    install_hint: str = "",
    priority: int = 0,
    supports_window: bool = False,
    devices: tuple[str, ...] = ("cpu", "cuda"),
) -> None:
    """Add (or replace) a varlen attention backend under ``name``."""
    _BACKENDS[name] = Backend(name, fn, available, install_hint, priority, supports_window, devices)


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """Names of the backends usable here (for ``device`` if given), best first."""
    dev = torch.device(device) if device is not None else None
    names = [
        b
        for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)
        if (dev is None or dev.type in b.devices) and b.available(dev)
    ]
    return [b.name for b in names]


def resolve_backend(name: str | None, device: torch.device | str | None = None) -> str:
    """Map ``None``/``"auto"`` to the fastest backend present for ``device``; validate explicit names."""
    if name in (None, "auto"):
        return available_backends(device)[0]
    # accept transformers' spellings so `attn_implementation="flash_attention_2"` keeps working
    name = {"flash_attention_2": "flash", "flash_attention_3": "flash", "eager": "sdpa", "flex_attention": "flex"}.get(
        name, name
    )
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    backend = _BACKENDS[name]
    dev = torch.device(device) if device is not None else None
    if not backend.available(dev):
        raise RuntimeError(f"attention backend {name!r} is not available here: {backend.install_hint}")
    return name


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    causal: bool = True,
    softmax_scale: float | None = None,
    backend: str | None = "auto",
    window: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_k: int | None = None,
) -> torch.Tensor:
    """Attention within each packed sequence.

    ``window``: Mistral's sliding window (query at position i sees keys i-window < j <= i).
    ``cu_seqlens_k``: keys packed with their own lengths (a cached prefix followed by the new tokens, for
    chunked prefill); causal masking is then aligned bottom-right, as flash-attn does: query i of a sequence
    with Lq queries and Lk keys sees keys j <= i + Lk - Lq.
    """
    name = resolve_backend(backend, q.device)
    b = _BACKENDS[name]
    if window is not None and not b.supports_window:
        raise ValueError(f"attention backend {name!r} does not support a sliding window; use 'sdpa'")
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    return b.fn(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k)


# --------------------------------------------------------------------------------------------- sdpa


def sequence_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[T] index of the packed sequence each token belongs to (no host sync)."""
    tokens = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), tokens, right=True)


def varlen_mask(
    cu_seqlens: torch.Tensor,
    total: int,
    causal: bool,
    window: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    total_k: int | None = None,
) -> torch.Tensor:
    """[Tq, Tk] boolean mask, True where query i may attend key j (bottom-right aligned causal)."""
    if cu_seqlens_k is None:
        cu_seqlens_k, total_k = cu_seqlens, total
    seq_q = sequence_ids(cu_seqlens, total)
    seq_k = sequence_ids(cu_seqlens_k, total_k)
    mask = seq_q[:, None] == seq_k[None, :]
    if causal or window is not None:
        # position of each query counted from the end of its sequence's keys
        q_local = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seq_q]
        q_pos = q_local + (cu_seqlens_k[seq_q + 1] - cu_seqlens_k[seq_q]) - (cu_seqlens[seq_q + 1] - cu_seqlens[seq_q])
        k_pos = torch.arange(total_k, device=cu_seqlens.device) - cu_seqlens_k[seq_k]
        diff = q_pos[:, None] - k_pos[None, :]  # i - j in absolute positions
        if causal:
            mask &= diff >= 0
        if window is not None:
            mask &= diff < window
    return mask


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    T, Hq, _ = q.shape
    mask = varlen_mask(cu_seqlens, T, causal, window, cu_seqlens_k, k.shape[0])
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),  # (1, Hq, T, D)
        k.transpose(0, 1).unsqueeze(0),  # (1, Hk, Tk, D)
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        scale=scale,
        enable_gqa=k.shape[1] != Hq,
    )
    return out.squeeze(0).transpose(0, 1)  # (T, Hq, D)


register_backend("sdpa", sdpa_varlen, install_hint="always available", priority=0, supports_window=True)


# ---------------------------------------------------------------------------------- paged decode


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """One query token per sequence over a paged cache.

    q [B, Hq, D]; k_cache, v_cache [num_blocks, block_size, Hk, D]; block_tables [B, max_blocks] int32
    (entries past a sequence's last block are ignored); context_lens [B] (keys 0..len-1, the new token's
    own K/V included). Returns [B, Hq, D].
    """
    B, Hq, D = q.shape
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    tables = block_tables.long().clamp(min=0)
    k = k_cache[tables].flatten(1, 2)  # (B, L, Hk, D), L = max_blocks * block_size
    v = v_cache[tables].flatten(1, 2)
    pos = torch.arange(k.shape[1], device=q.device)
    lens = context_lens.to(q.device).long()[:, None]
    mask = pos[None, :] < lens  # (B, L)
    if window is not None:
        mask &= pos[None, :] >= lens - window
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),  # (B, Hq, 1, D)
        k.transpose(1, 2),  # (B, Hk, L, D)
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=k.shape[2] != Hq,
    )
    return out.squeeze(2)


_PAGED: dict[str, tuple[Callable, Callable[[torch.device | None], bool], str]] = {
    "sdpa": (paged_attention_ref, lambda device=None: True, "always available"),
}


def register_paged_backend(
    name: str, fn: Callable, available: Callable = lambda device=None: True, install_hint: str = ""
) -> None:
    _PAGED[name] = (fn, available, install_hint)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str | None = "auto",
    window: int | None = None,
) -> torch.Tensor:
    """Decode attention over a paged KV cache; see ``paged_attention_ref`` for shapes."""
    if backend in (None, "auto"):
        name = "triton" if ("triton" in _PAGED and q.is_cuda and _PAGED["triton"][1](q.device)) else "sdpa"
    else:
        name = resolve_backend(backend, q.device) if backend not in _PAGED else backend
        if name not in _PAGED:
            name = "sdpa"  # varlen-only backends (flex, xformers) decode through the reference
    fn, available, hint = _PAGED[name]
    if not available(q.device):
        raise RuntimeError(f"paged attention backend {name!r} is not available here: {hint}")
    return fn(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window)


def package_available(name: str) -> bool:
    """Availability flag for optional packages (flash_attn, xformers); import happens at use."""
    return importlib.util.find_spec(name) is not None
