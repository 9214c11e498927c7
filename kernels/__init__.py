"""Triton kernels, one op per file, each with its plain-torch reference `<op>_ref`.

Import as `fastllava.kernels` (installed under the fastllava namespace; see setup.py). Triton itself is imported
lazily inside each op file, so importing this package is cheap and works without triton.
"""

from fastllava.kernels.dispatch import get_kernels, set_kernels, use_triton
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
