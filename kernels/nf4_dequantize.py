"""NF4 / FP4 dequantization in bitsandbytes' own format (Triton kernel + plain-torch reference).

    w = nf4_dequantize(qweight, absmax, shape, blocksize=64, dtype=torch.float16, nested=None)

The format is bitsandbytes' 4-bit blockwise quantization (Dettmers et al., "QLoRA", 2023), bit for bit:
- ``qweight`` uint8, two 4-bit codes per byte, the flat element ``2i`` in the HIGH nibble of byte ``i`` and
  ``2i + 1`` in the low nibble (bnb: ``packed = (q[::2] << 4) | q[1::2]``), any shape holding
  ``ceil(numel / 2)`` bytes (transformers stores ``[numel / 2, 1]``);
- ``absmax`` fp32 ``[ceil(numel / blocksize)]``: element ``e`` is ``code[nibble(e)] * absmax[e // blocksize]``,
  computed in fp32 and then cast to ``dtype`` (exactly bnb's order, so fp32 output is bit-identical);
- double quantization (bnb ``compress_statistics=True``): ``absmax`` holds uint8 indices into the 8-bit dynamic
  map ``nested.code`` and the real scale is ``nested.code[absmax[b]] * nested.absmax[b // 256] + nested.offset``
  (two roundings, mul then add, as bnb's ``dequantize_blockwise`` followed by ``absmax += offset``).

The Triton kernel gives each program BLOCK packed bytes (2*BLOCK outputs), looks both nibbles up in the 16-entry
codebook (a 64-byte table that stays in L1) and stores them. Its nested-scale path is launched with
``enable_fp_fusion=False`` so the compiler cannot contract ``code * absmax2 + offset`` into one FMA, which would
differ from bnb in the last bit. The shared ``@triton.jit`` helpers here are also used by ``nf4_matmul``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

import torch

from fastllava.kernels.dispatch import HAS_TRITON, use_triton

# bitsandbytes.functional.get_4bit_type("nf4"): quantiles of N(0, 1) normalised to [-1, 1], index = 4-bit code.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# bitsandbytes' fp4 (1 sign, 2 exponent, 1 mantissa bit; bias 2) in code order, divided by its max (12).
FP4_CODE = tuple(
    v / 12.0 for v in (0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
)
QUANT_TYPES = ("nf4", "fp4")

_CODEBOOKS: dict[tuple[str, torch.device], torch.Tensor] = {}


def codebook(quant_type: str = "nf4", device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16-entry fp32 codebook of ``quant_type`` (``"nf4"`` or ``"fp4"``) on ``device`` (cached)."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"unknown 4-bit quant_type {quant_type!r}: expected one of {QUANT_TYPES}")
    key = (quant_type, torch.device(device))
    if key not in _CODEBOOKS:
        values = NF4_CODE if quant_type == "nf4" else FP4_CODE
        _CODEBOOKS[key] = torch.tensor(values, dtype=torch.float32, device=device)
    return _CODEBOOKS[key]


@dataclass
class NestedAbsmax:
    """Second-level state of double quantization: the absmax of the absmax, 8-bit dynamic map, offset."""

    absmax: torch.Tensor  # fp32 [ceil(n_blocks / blocksize)]: scale of each block of 8-bit absmax codes
    code: torch.Tensor  # fp32 [256]: bnb's signed dynamic map (create_dynamic_map())
    offset: torch.Tensor  # fp32 scalar: mean of the first-level absmax, subtracted before quantizing
    blocksize: int = 256

    def to(self, device: torch.device | str) -> NestedAbsmax:
        return NestedAbsmax(self.absmax.to(device), self.code.to(device), self.offset.to(device), self.blocksize)


# Kernels exist only where triton is installed; the reference at the bottom works everywhere.
if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, blk, mask, NESTED: tl.constexpr, NBS: tl.constexpr):
        """fp32 scale of 4-bit block ``blk`` (any shape); with NESTED, dequantize the 8-bit absmax on the fly."""
        if NESTED:
            qa = tl.load(absmax_ptr + blk, mask=mask, other=0).to(tl.int32)
            a2 = tl.load(nabs_ptr + blk // NBS, mask=mask, other=0.0)
            scale = tl.load(ncode_ptr + qa) * a2 + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + blk, mask=mask, other=0.0)
        return scale

    @triton.jit
    def _nf4_dequantize_kernel(
        q_ptr,
        absmax_ptr,
        code_ptr,
        nabs_ptr,
        ncode_ptr,
        offset_ptr,
        out_ptr,
        n_elements,
        BLOCKSIZE: tl.constexpr,
        NESTED: tl.constexpr,
        NBS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        byte = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        e0 = 2 * byte  # flat index of the high-nibble element; e0 + 1 is the low nibble (same 4-bit block)
        mask = e0 < n_elements
        q = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        scale = block_scale(absmax_ptr, nabs_ptr, ncode_ptr, offset_ptr, e0 // BLOCKSIZE, mask, NESTED, NBS)
        hi = tl.load(code_ptr + (q >> 4)) * scale
        lo = tl.load(code_ptr + (q & 15)) * scale
        tl.store(out_ptr + e0, hi.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_ptr + e0 + 1, lo.to(out_ptr.dtype.element_ty), mask=(e0 + 1) < n_elements)


def nested_args(absmax: torch.Tensor, nested: NestedAbsmax | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nested absmax, nested code, offset) pointers for a launch; ``absmax`` stands in when not nested."""
    if nested is None:
        return absmax, absmax, absmax
    return nested.absmax.float().contiguous(), nested.code.float().contiguous(), nested.offset.float().reshape(1)


def nf4_dequantize_fwd(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    dtype: torch.dtype,
    nested: NestedAbsmax | None,
    quant_type: str = "nf4",
    BLOCK: int = 1024,
) -> torch.Tensor:
    n = prod(shape)
    q = qweight.contiguous().view(torch.uint8).reshape(-1)
    absmax = absmax.contiguous()
    out = torch.empty(shape, dtype=dtype, device=qweight.device)
    nabs, ncode, offset = nested_args(absmax, nested)
    grid = (triton.cdiv(triton.cdiv(n, 2), BLOCK),)
    _nf4_dequantize_kernel[grid](
        q,
        absmax,
        codebook(quant_type, qweight.device),
        nabs,
        ncode,
        offset,
        out,
        n,
        BLOCKSIZE=blocksize,
        NESTED=nested is not None,
        NBS=nested.blocksize if nested is not None else 1,
        BLOCK=BLOCK,
        enable_fp_fusion=False,  # bit-identical to bnb: mul and add of the nested scale round separately
    )
    return out


def nf4_dequantize(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    nested: NestedAbsmax | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Dequantize bnb-packed 4-bit ``qweight`` to a ``shape`` tensor of ``dtype`` (bit-identical to bnb in fp32)."""
    shape = tuple(shape)
    _check(qweight, absmax, shape, blocksize, nested)
    if use_triton(qweight, absmax):
        return nf4_dequantize_fwd(qweight, absmax, shape, blocksize, dtype, nested, quant_type)
    return nf4_dequantize_ref(qweight, absmax, shape, blocksize, dtype, nested, quant_type)


def _check(qweight, absmax, shape, blocksize, nested) -> None:
    n = prod(shape)
    if qweight.numel() * qweight.element_size() < (n + 1) // 2:
        raise ValueError(
            f"qweight holds {qweight.numel() * qweight.element_size()} bytes; {shape} needs {(n + 1) // 2}"
        )
    if blocksize % 2 or blocksize <= 0:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    if absmax.numel() != -(-n // blocksize):
        raise ValueError(
            f"absmax has {absmax.numel()} entries; {shape} in blocks of {blocksize} needs {-(-n // blocksize)}"
        )
    if (nested is None) != (absmax.dtype != torch.uint8):
        raise ValueError("absmax must be uint8 exactly when a NestedAbsmax (double quantization) is given")


def dequantize_absmax_ref(absmax: torch.Tensor, nested: NestedAbsmax | None) -> torch.Tensor:
    """First-level fp32 absmax; undoes double quantization as bnb does (``code[q] * absmax2``, then ``+ offset``)."""
    if nested is None:
        return absmax.float()
    blk = torch.arange(absmax.numel(), device=absmax.device) // nested.blocksize
    scale = nested.code.float()[absmax.long().reshape(-1)] * nested.absmax.float()[blk]
    return scale + nested.offset.float()


def nf4_dequantize_ref(
    qweight: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    blocksize: int = 64,
    dtype: torch.dtype = torch.float32,
    nested: NestedAbsmax | None = None,
    quant_type: str = "nf4",
) -> torch.Tensor:
    """Plain-torch reference of `nf4_dequantize` (bnb's ``_dequantize_4bit_compute`` in its rounding order)."""
    shape = tuple(shape)
    n = prod(shape)
    q = qweight.reshape(-1).view(torch.uint8)
    idx = torch.stack([q >> 4, q & 15], dim=-1).reshape(-1)[:n].long()  # high nibble first
    scale = dequantize_absmax_ref(absmax, nested)
    values = codebook(quant_type, q.device)[idx] * scale[torch.arange(n, device=q.device) // blocksize]
    return values.reshape(shape).to(dtype)
