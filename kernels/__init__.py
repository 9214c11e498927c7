"""Triton kernels, one op per file, each with its plain-torch reference `<op>_ref`.

Import as `fastllava.kernels` (installed under the fastllava namespace; see setup.py). Each op file imports triton
and defines its kernels only when triton is installed (`dispatch.HAS_TRITON`), so this package imports without it.
`triton.jit` picks the CPU interpreter when a kernel is *defined*: set TRITON_INTERPRET=1 before importing fastllava.
"""

import sys as _sys


def _installed_kernels_spec():
    """The spec of a `kernels` module found anywhere on sys.path except this repository's root (None if none)."""
    import importlib.machinery
    import os

    root = os.path.realpath(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    elsewhere = [p for p in _sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", elsewhere)
    return spec if spec is not None and spec.loader is not None else None


# Found as a top-level `kernels`: the repository root is on sys.path (`python -m ...` from a checkout puts the
# working directory there), and that name belongs to HuggingFace's `kernels` distribution, which transformers and
# bitsandbytes import. When it is installed, hand the name over to it; otherwise stay this package.
if __name__ == "kernels" and (_spec := _installed_kernels_spec()) is not None:
    import importlib.util as _util

    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
    _spec.loader.exec_module(_module)
else:
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
