"""Triton kernels, one op per file, each with its plain-torch reference `<op>_ref`.

Import as `fastllava.kernels` (installed under the fastllava namespace; see setup.py). Each op file imports triton
and defines its kernels only when triton is installed (`dispatch.HAS_TRITON`), so this package imports without it.
`triton.jit` picks the CPU interpreter when a kernel is *defined*: set TRITON_INTERPRET=1 before importing fastllava.
"""

from fastllava.kernels.dispatch import get_kernels, set_kernels, use_triton
from fastllava.kernels.nf4_dequantize import NestedAbsmax, nf4_dequantize, nf4_dequantize_ref
from fastllava.kernels.nf4_matmul import nf4_matmul, nf4_matmul_ref
from fastllava.kernels.projector_mlp import projector_mlp, projector_mlp_ref
from fastllava.kernels.rms_norm import rms_norm, rms_norm_ref
from fastllava.kernels.rotary import apply_rotary, apply_rotary_, apply_rotary_ref, rotary_cos_sin
from fastllava.kernels.scatter_image_tokens import (
    image_token_destinations,
    scatter_image_tokens,
    scatter_image_tokens_,
    scatter_image_tokens_ref,
)

__all__ = [
    "get_kernels",
    "set_kernels",
    "use_triton",
    "NestedAbsmax",
    "nf4_dequantize",
    "nf4_dequantize_ref",
    "nf4_matmul",
    "nf4_matmul_ref",
    "projector_mlp",
    "projector_mlp_ref",
    "rms_norm",
    "rms_norm_ref",
    "apply_rotary",
    "apply_rotary_",
    "apply_rotary_ref",
    "rotary_cos_sin",
    "scatter_image_tokens",
    "scatter_image_tokens_",
    "scatter_image_tokens_ref",
    "image_token_destinations",
]
