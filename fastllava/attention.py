"""Attention backends over packed (varlen) sequences, in one registry.

Every backend takes packed ``q [T, Hq, D]``, ``k, v [T, Hk, D]`` (Hq a multiple of Hk: GQA is native) and
``cu_seqlens [B+1]`` int32, and returns ``[T, Hq, D]``. No token attends across a sequence boundary.

    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=True, backend="auto")

Decode runs one new token per sequence over a paged KV cache (``paged_attention``); the cache layout is
``[num_blocks, block_size, Hk, D]`` per layer, addressed through ``block_tables [B, max_blocks]``.

Backends (``available_backends()`` lists those usable here, best first; ``auto`` picks the first one allowed
to run automatically on the tensors' device):

- ``flash``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16; ``pip install flash-attn``).
- ``triton``: our varlen FlashAttention-2 kernels (``kernels/flash_attention.py``): CUDA, or CPU tensors under
  ``TRITON_INTERPRET=1`` (tests only: ``auto`` never picks it on CPU).
- ``flex``: torch FlexAttention with a document mask built from cu_seqlens. On CUDA it is compiled; on CPU
  torch runs it unfused and has no backward (torch 2.13 raises), so with grads on CPU the same ``mask_mod`` is
  materialised with ``create_mask`` and run through SDPA.
- ``xformers``: ``xformers.ops.memory_efficient_attention`` with block-diagonal biases (CUDA; host seqlens, so
  one sync per call; ``pip install xformers``).
- ``sdpa`` is the reference: always available, one fused call with a block-diagonal mask (O(T^2) memory,
  fine for a reference and for CPU-sized batches).
- ``sdpa_padded``: the sequences gathered into a padded ``[B, L]`` batch for one SDPA call (O(B L^2); one host
  sync). What ``auto`` picks on CPU, where a packed training batch would otherwise pay for the whole T x T mask.

``auto`` on CUDA: flash > triton > flex > xformers > sdpa; on CPU: sdpa_padded.

Decode: each backend declares its paged path in the same registry (``register_backend(paged=...)``). ``sdpa``
(the reference) and ``triton`` (``kernels/paged_attention.py``) have one; ``flash``, ``flex``, ``xformers`` and
``sdpa_padded`` declare ``decode_with="sdpa"`` instead, and the first decode through each logs a warning saying
so (name ``triton`` at decode for the paged kernel). ``auto`` decodes with the Triton kernel on CUDA, the
reference elsewhere. A backend with neither raises a ``ValueError`` at decode.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastllava import optional
from fastllava.kernels.dispatch import get_kernels, triton_interpreting
from fastllava.kernels.paged_attention import paged_attention_decode_ref
from fastllava.optional import HAS_FLASH_ATTN, HAS_FLEX, HAS_TRITON, HAS_XFORMERS

log = logging.getLogger(__name__)


@dataclass
class Backend:
    name: str
    fn: Callable  # fn(q, k, v, cu_seqlens, max_seqlen, causal, scale, window, cu_seqlens_k, max_seqlen_k)
    available: Callable[[torch.device | None], bool]
    install_hint: str  # what to install when unavailable
    priority: int = 0  # higher wins under "auto"
    supports_window: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    auto_devices: tuple[str, ...] | None = None  # devices where "auto" may pick it (None: all of `devices`)
    # decode: paged(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window), its own paged-KV path
    paged: Callable | None = None
    decode_with: str | None = None  # no `paged` of its own: the backend that decodes for it (logged once)


_BACKENDS: dict[str, Backend] = {}
# transformers' spellings, so `attn_implementation="flash_attention_2"` keeps working
_ALIASES = {"flash_attention_2": "flash", "flash_attention_3": "flash", "eager": "sdpa", "flex_attention": "flex"}


def register_backend(
    name: str,
    fn: Callable,
    *,
    available: Callable[[torch.device | None], bool] = lambda device=None: True,
    install_hint: str = "",
    priority: int = 0,
    supports_window: bool = False,
    devices: tuple[str, ...] = ("cpu", "cuda"),
    auto_devices: tuple[str, ...] | None = None,
    paged: Callable | None = None,
    decode_with: str | None = None,
) -> None:
    """Add (or replace) an attention backend under ``name``.

    ``fn`` is its varlen (prefill / training) attention. Decode over the paged KV cache runs ``paged`` when the
    backend has one; a backend without one names the backend that decodes for it in ``decode_with`` (an
    explicit choice, logged once at first use); with neither, asking it to decode raises a ``ValueError``.
    """
    if paged is not None and decode_with is not None:
        raise ValueError(f"attention backend {name!r}: give a paged path or a decode_with backend, not both")
    _BACKENDS[name] = Backend(
        name, fn, available, install_hint, priority, supports_window, devices, auto_devices, paged, decode_with
    )


def get_backend(name: str) -> Backend:
    """The registry entry of ``name`` (transformers' spellings accepted); ``ValueError`` for an unknown name."""
    name = _ALIASES.get(name, name)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


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
    dev = torch.device(device) if device is not None else None
    if name in (None, "auto"):
        if dev is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for candidate in available_backends(dev):
            b = _BACKENDS[candidate]
            if dev.type in (b.auto_devices if b.auto_devices is not None else b.devices):
                return candidate
        raise RuntimeError(f"no attention backend may run automatically on {dev.type}; registered: {sorted(_BACKENDS)}")
    backend = get_backend(name)
    name = backend.name
    if not backend.available(dev):
        raise RuntimeError(f"attention backend {name!r} is not available here: {backend.install_hint}")
    if dev is not None and dev.type not in backend.devices:
        raise RuntimeError(f"attention backend {name!r} runs on {'/'.join(backend.devices)}, not {dev.type} tensors")
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


def token_positions(
    cu_seqlens: torch.Tensor, total: int, cu_seqlens_k: torch.Tensor, total_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: (seq_q [Tq], q_pos [Tq], seq_k [Tk], k_pos [Tk]), on the device, no host sync.

    ``k_pos`` is a key's position in its sequence; ``q_pos`` counts a query in the same key positions, aligned
    bottom-right (the last query sits at the last key), so causal is ``q_pos >= k_pos`` for any Lq <= Lk.
    """
    seq_q = sequence_ids(cu_seqlens, total)
    seq_k = sequence_ids(cu_seqlens_k, total_k)
    len_q = (cu_seqlens[1:] - cu_seqlens[:-1])[seq_q]
    len_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1])[seq_q]
    q_pos = torch.arange(total, device=cu_seqlens.device) - cu_seqlens[seq_q] + len_k - len_q
    k_pos = torch.arange(total_k, device=cu_seqlens.device) - cu_seqlens_k[seq_k]
    return seq_q, q_pos, seq_k, k_pos


def varlen_mask(
    cu_seqlens: torch.Tensor,
    total: int,
    causal: bool,
    window: int | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    total_k: int | None = None,
) -> torch.Tensor:
    """[Tq, Tk] boolean mask, True where query i may attend key j (bottom-right aligned causal)."""
    from fastllava.kernels.flash_attention import varlen_mask as mask_fn  # the kernels' reference

    if cu_seqlens_k is None:
        cu_seqlens_k, total_k = cu_seqlens, total
    return mask_fn(cu_seqlens, total, cu_seqlens_k, total_k, causal, window)


def sdpa_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    """The reference backend: the Triton kernel's own torch reference (one SDPA call, block-diagonal mask)."""
    from fastllava.kernels.flash_attention import flash_attn_varlen_ref

    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    return flash_attn_varlen_ref(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale, window)


# one query token per sequence over a paged cache, the Triton kernel's own torch reference: q [B, Hq, D];
# k_cache, v_cache [num_blocks, block_size, Hk, D]; block_tables [B, max_blocks] int32 (entries past a sequence's
# last block are ignored); context_lens [B] (keys 0..len-1, the new token's own K/V included). Returns [B, Hq, D].
paged_attention_ref = paged_attention_decode_ref


register_backend(
    "sdpa", sdpa_varlen, install_hint="always available", priority=0, supports_window=True, paged=paged_attention_ref
)


def _padded_layout(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(gather index [B, L] into the packed rows, with ``total`` = a zero row for padding; lengths [B]; L)."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    width = int(lengths.max()) if lengths.numel() else 0  # the one host sync of the padded backend
    pos = torch.arange(width, device=cu_seqlens.device)
    index = cu_seqlens[:-1, None].long() + pos
    return torch.where(pos < lengths[:, None], index, total), lengths, width


def sdpa_padded(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    """SDPA over the packed sequences laid out as a padded ``[B, H, L, D]`` batch.

    O(B * L^2) work and memory instead of the reference's O(T^2) with T = B * L: on CPU, where SDPA has no
    varlen kernel, a packed training micro-batch of 32 samples costs ~1/32 of the block-diagonal mask's
    attention. One host sync (the longest sequence). The padding queries attend to their sequence's first key
    (never to nothing: an all-masked row would be NaN, and NaN leaks into the backward pass).
    """
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens
    T, Hq, D = q.shape
    Tk = k.shape[0]
    if T == 0:
        return q.new_empty(T, Hq, D)
    qi, len_q, Lq = _padded_layout(cu_seqlens, T)
    ki, len_k, Lk = _padded_layout(cu_seqlens_k, Tk)

    def padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # [T, H, D] -> [B, H, L, D]
        x = torch.cat([x, x.new_zeros(1, *x.shape[1:])])
        return x[index].transpose(1, 2)

    i = torch.arange(Lq, device=q.device)[None, :, None]  # query position in its sequence
    j = torch.arange(Lk, device=q.device)[None, None, :]
    offset = (len_k - len_q)[:, None, None]  # bottom-right alignment (a cached prefix before the queries)
    mask = j < len_k[:, None, None]
    if causal:
        mask = mask & (j <= i + offset)
    if window is not None:
        mask = mask & (i + offset - j < window)
    mask = mask | ((i >= len_q[:, None, None]) & (j == 0))  # padding rows: any valid key
    out = F.scaled_dot_product_attention(
        padded(q, qi), padded(k, ki), padded(v, ki), attn_mask=mask[:, None], scale=scale, enable_gqa=k.shape[1] != Hq
    )  # [B, Hq, Lq, D]
    seq = sequence_ids(cu_seqlens, T)
    rows = seq * Lq + torch.arange(T, device=q.device) - cu_seqlens[seq]
    return out.transpose(1, 2).reshape(-1, Hq, D)[rows]


register_backend(
    "sdpa_padded",
    sdpa_padded,
    install_hint="always available",
    priority=5,
    supports_window=True,
    auto_devices=("cpu",),  # CUDA has real varlen kernels (flash, triton, flex); on CPU this beats the mask
    decode_with="sdpa",  # one query per sequence: nothing to pad; the reference gathers each context
)


# --------------------------------------------------------------------------------------------- flex

_flex_compiled: Callable | None = None
_flex_mask_cache: dict[str, tuple] = {}  # one entry: the last packed batch's BlockMask


def flex_document_mask(cu_seqlens, total, causal, window, cu_seqlens_k, total_k) -> Callable:
    """FlexAttention ``mask_mod`` of the packed batch: same document, bottom-right causal, sliding window."""
    seq_q, q_pos, seq_k, k_pos = token_positions(cu_seqlens, total, cu_seqlens_k, total_k)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = seq_q[q_idx] == seq_k[kv_idx]
        if causal:
            ok = ok & (q_pos[q_idx] >= k_pos[kv_idx])
        if window is not None:
            ok = ok & (q_pos[q_idx] - k_pos[kv_idx] < window)
        return ok

    return mask_mod


def _flex_block_mask(cu_seqlens, total, causal, window, cu_seqlens_k, total_k):
    """The BlockMask of a packed batch, reused while the same cu_seqlens tensors come back unchanged.

    A model calls attention once per layer with the same cu_seqlens; building the mask once per batch instead
    of once per layer matters on GPU. The key holds the tensors themselves (identity + in-place version).
    """
    from torch.nn.attention import flex_attention as fa

    key = (total, total_k, causal, window, cu_seqlens._version, cu_seqlens_k._version)
    cached = _flex_mask_cache.get("last")
    if cached is not None and cached[0] is cu_seqlens and cached[1] is cu_seqlens_k and cached[2] == key:
        return cached[3]
    mask_mod = flex_document_mask(cu_seqlens, total, causal, window, cu_seqlens_k, total_k)
    # on CUDA the block mask is built by a compiled kernel (no [Tq, Tk] tensor); on CPU eagerly
    block_mask = fa.create_block_mask(
        mask_mod, None, None, total, total_k, device=cu_seqlens.device, _compile=cu_seqlens.is_cuda
    )
    _flex_mask_cache["last"] = (cu_seqlens, cu_seqlens_k, key, block_mask)
    return block_mask


def flex_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    from torch.nn.attention import flex_attention as fa

    global _flex_compiled
    T, Hq, _ = q.shape
    Tk = k.shape[0]
    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens
    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # (1, H, T, D)
    gqa = k.shape[1] != Hq
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    if q.device.type == "cpu" and needs_grad:
        mask_mod = flex_document_mask(cu_seqlens, T, causal, window, cu_seqlens_k, Tk)
        # torch's CPU flex_attention has no backward (NotImplementedError in 2.13): evaluate the same mask_mod
        # densely and let SDPA differentiate.
        mask = fa.create_mask(mask_mod, None, None, T, Tk, device=q.device)
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale, enable_gqa=gqa)
        return out.squeeze(0).transpose(0, 1)
    if q.is_cuda:
        # fused kernel: flex is only fast compiled; the block mask is built by a compiled kernel as well
        if _flex_compiled is None:
            _flex_compiled = torch.compile(fa.flex_attention)
        attend = _flex_compiled
    else:
        attend = fa.flex_attention  # CPU: torch runs it unfused (it warns once); compiling costs ~30 s per shape
    block_mask = _flex_block_mask(cu_seqlens, T, causal, window, cu_seqlens_k, Tk)
    out = attend(qh, kh, vh, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out.squeeze(0).transpose(0, 1)  # (T, Hq, D)


register_backend(
    "flex",
    flex_varlen,
    available=lambda device=None: HAS_FLEX,
    install_hint="needs torch >= 2.5 (torch.nn.attention.flex_attention): "
    + optional.install_hint("torch.nn.attention.flex_attention"),
    priority=20,
    supports_window=True,
    auto_devices=("cuda",),  # unfused on CPU: slower than sdpa there
    decode_with="sdpa",  # no paged-KV FlexAttention here yet
)


# ------------------------------------------------------------------------------------------- triton


def _triton_available(device: torch.device | None = None) -> bool:
    if not HAS_TRITON:
        return False
    if device is None:
        return torch.cuda.is_available() or triton_interpreting()
    return (device.type == "cuda" and torch.cuda.is_available()) or (device.type == "cpu" and triton_interpreting())


def triton_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    # imported at first use: TRITON_INTERPRET must be set before the kernels are defined
    from fastllava.kernels import flash_attention as fa

    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    # naming the backend asks for the kernel; the global switch set to "torch" still turns it off for A/B runs
    op = fa.flash_attn_varlen_ref if get_kernels() == "torch" else fa.flash_attn_varlen_triton
    return op(q, k, v, cu_seqlens, cu_seqlens_k, max_seqlen, max_seqlen_k, causal, scale, window)


def triton_paged(q, k_cache, v_cache, block_tables, context_lens, softmax_scale=None, window=None):
    from fastllava.kernels import paged_attention as pa  # at first use, like the varlen kernels

    op = pa.paged_attention_decode_ref if get_kernels() == "torch" else pa.paged_attention_decode_triton
    return op(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window)


register_backend(
    "triton",
    triton_varlen,
    available=_triton_available,
    install_hint=f"needs triton ({optional.install_hint('triton')}) and CUDA tensors, or TRITON_INTERPRET=1 set "
    "before importing triton for CPU tensors",
    priority=30,
    supports_window=True,
    auto_devices=("cuda",),  # the interpreter is for tests, never picked automatically
    paged=triton_paged,
)


# -------------------------------------------------------------------------------------------- flash


def flash_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    if not HAS_FLASH_ATTN:
        raise RuntimeError(f"attention backend 'flash' needs flash-attn: {optional.install_hint('flash_attn')}")
    from flash_attn import flash_attn_varlen_func

    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"flash-attn runs fp16/bf16 only, got {q.dtype}; use the 'triton' or 'sdpa' backend")
    if cu_seqlens_k is None:
        cu_seqlens_k, max_seqlen_k = cu_seqlens, max_seqlen
    # flash-attn's window is (left, right) inclusive: our "i - j < w" is left = w - 1; right 0 when causal
    window_size = (-1, -1) if window is None else (window - 1, 0 if causal else -1)
    return flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens.to(torch.int32),
        cu_seqlens_k.to(torch.int32),
        max_seqlen,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=scale,
        causal=causal,  # bottom-right aligned since flash-attn 2.1, as ours
        window_size=window_size,
    )


register_backend(
    "flash",
    flash_varlen,
    available=lambda device=None: HAS_FLASH_ATTN,
    install_hint=optional.install_hint("flash_attn"),
    priority=40,
    supports_window=True,
    devices=("cuda",),
    decode_with="sdpa",  # flash-attn's paged decode (flash_attn_with_kvcache) is not wired in
)


# ----------------------------------------------------------------------------------------- xformers


def xformers_varlen(q, k, v, cu_seqlens, max_seqlen, causal, scale, window=None, cu_seqlens_k=None, max_seqlen_k=None):
    if not HAS_XFORMERS:
        raise RuntimeError(f"attention backend 'xformers' needs xformers: {optional.install_hint('xformers')}")
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalMask

    if cu_seqlens_k is None:
        cu_seqlens_k = cu_seqlens
    # xformers builds its bias from host lengths: one device->host copy per call (per layer, cache it upstream)
    seqlens_q = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    seqlens_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    # newer xformers take the bias device (else it defaults to cuda:0, wrong on other GPUs); older ones do not
    takes_device = "device" in inspect.signature(BlockDiagonalMask.from_seqlens).parameters
    extra = {"device": q.device} if takes_device else {}
    bias = BlockDiagonalMask.from_seqlens(seqlens_q, seqlens_k, **extra)
    if causal and window is not None:
        bias = bias.make_local_attention_from_bottomright(window)  # keys with i + Lk - Lq - j < window
    elif causal:
        bias = bias.make_causal_from_bottomright()
    elif window is not None:
        raise ValueError("xformers has no non-causal sliding window; use the 'triton', 'flex' or 'sdpa' backend")
    T, Hq, D = q.shape
    Tk, Hk, _ = k.shape
    group = Hq // Hk
    # GQA as xformers' BMGHK layout: K/V expanded over the group (a stride-0 view, no copy)
    out = memory_efficient_attention(
        q.reshape(1, T, Hk, group, D),
        k.reshape(1, Tk, Hk, 1, D).expand(1, Tk, Hk, group, D),
        v.reshape(1, Tk, Hk, 1, D).expand(1, Tk, Hk, group, D),
        attn_bias=bias,
        scale=scale,
    )
    return out.reshape(T, Hq, D)


register_backend(
    "xformers",
    xformers_varlen,
    available=lambda device=None: HAS_XFORMERS,
    install_hint=optional.install_hint("xformers"),
    priority=10,
    supports_window=True,
    devices=("cuda",),
    decode_with="sdpa",  # xformers has no paged-KV attention
)


# ---------------------------------------------------------------------------------- paged decode


def resolve_paged_backend(name: str | None, device: torch.device | str | None = None) -> str:
    """The backend whose paged path runs decode when ``name`` is asked for (see ``register_backend``).

    ``None``/``"auto"``: the best backend with its own paged path that ``auto`` may pick on ``device`` (the
    Triton kernel on CUDA, the reference otherwise). A backend without one decodes through its ``decode_with``
    backend, logged once; with neither, a ``ValueError`` says so.
    """
    dev = torch.device(device) if device is not None else None
    if name in (None, "auto"):
        dev = dev if dev is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for candidate in available_backends(dev):
            b = _BACKENDS[candidate]
            if b.paged is not None and dev.type in (b.auto_devices if b.auto_devices is not None else b.devices):
                return candidate
        raise RuntimeError(f"no paged attention backend may run automatically on {dev.type}")
    backend = get_backend(resolve_backend(name, dev))
    if backend.paged is not None:
        return backend.name
    if backend.decode_with is None:
        raise ValueError(
            f"attention backend {backend.name!r} has no paged (decode) path; decode with one that has: "
            f"{sorted(n for n, b in _BACKENDS.items() if b.paged is not None)}"
        )
    if backend.name not in _decode_redirects_logged:
        _decode_redirects_logged.add(backend.name)
        log.warning(
            "attention backend %r has no paged decode path: decode runs the %r backend's", backend.name,
            backend.decode_with,
        )  # fmt: skip
    return resolve_paged_backend(backend.decode_with, dev)


_decode_redirects_logged: set[str] = set()


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
    """Decode attention over a paged KV cache; see ``paged_attention_ref`` for shapes.

    ``backend`` is the model's attention backend; ``resolve_paged_backend`` says which paged path serves it.
    """
    paged = _BACKENDS[resolve_paged_backend(backend, q.device)].paged
    return paged(q, k_cache, v_cache, block_tables, context_lens, softmax_scale, window)
