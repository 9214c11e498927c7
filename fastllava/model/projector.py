"""Multimodal projectors: ``linear``, ``mlp{N}x_gelu`` (exact erf GELU between linears) and ``identity``.

Linears are named ``linear_1 .. linear_N`` as in llava-hf; original LLaVA's ``mm_projector.{0,2,4..}`` (an
``nn.Sequential`` with GELUs at the odd indices) maps onto them at load time. ``mlp2x_gelu`` — LLaVA-1.5's
projector — runs as one fused op (``fastllava.kernels.projector_mlp``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from fastllava.kernels import projector_mlp


class Projector(nn.Module):
    def __init__(self, projector_type: str, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.projector_type = projector_type
        if projector_type == "identity":
            if in_dim != out_dim:
                raise ValueError(f"identity projector needs equal widths, got {in_dim} -> {out_dim}")
            depth = 0
        elif projector_type == "linear":
            depth = 1
        else:
            m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
            if not m:
                raise ValueError(f"unknown mm_projector_type {projector_type!r}: linear, mlp{{N}}x_gelu, identity")
            depth = int(m.group(1))
        self.depth = depth
        for i in range(depth):
            setattr(self, f"linear_{i + 1}", nn.Linear(in_dim if i == 0 else out_dim, out_dim, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.depth == 0:
            return x
        l1, l2 = getattr(self, "linear_1", None), getattr(self, "linear_2", None)
        # the fused op needs plain weights; swapped-in modules (4-bit, LoRA-wrapped) run one by one
        if self.depth == 2 and type(l1) is nn.Linear and type(l2) is nn.Linear:
            return projector_mlp(x, l1.weight, l1.bias, l2.weight, l2.bias)
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(F.gelu(x))
        return x
