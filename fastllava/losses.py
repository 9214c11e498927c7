"""Fused linear + cross-entropy: the loss over the vocabulary without materialising ``[N, vocab]`` logits.

    loss_sum = linear_cross_entropy(hidden, lm_head.weight, targets)     # sum over rows, fp32 scalar

``hidden`` holds only the rows that have a target (``[N, D]``). The rows are processed ``chunk_size`` at a
time; for each chunk the logits are formed, the loss and its gradient ``softmax - onehot`` computed, and the
gradients of ``hidden`` and ``weight`` accumulated right there, in the forward (Liger-Kernel's
``FusedLinearCrossEntropy`` method). Peak extra memory is one ``[chunk, vocab]`` block instead of ``[N, vocab]``
logits plus their gradient. Backward just scales the stored gradients by the incoming scalar.

On CUDA with liger-kernel installed, ``impl="auto"`` runs Liger's Triton version; ``impl="chunked"`` (ours) runs
everywhere and is the reference ``impl="eager"`` is checked against in the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastllava.optional import HAS_LIGER


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum_i CE(hidden_i @ weight.T + bias, target_i), gradients computed chunk by chunk in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, ignore_index: int, grad_enabled: bool):
        N = hidden.shape[0]
        # grad mode is off inside forward, and requires_grad stays set under no_grad: the caller says
        need_h, need_w = grad_enabled and hidden.requires_grad, grad_enabled and weight.requires_grad
        need_b = grad_enabled and bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32  # softmax / accumulation dtype
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for s in range(0, N, chunk_size):
            h = hidden[s : s + chunk_size]  # (C, D)
            t = targets[s : s + chunk_size]
            logits = (h @ weight.T).to(acc)  # (C, V)
            if bias is not None:
                logits = logits + bias.to(acc)
            valid = t != ignore_index
            t_safe = torch.where(valid, t, torch.zeros_like(t))
            lse = torch.logsumexp(logits, dim=-1)  # (C,)
            picked = logits.gather(1, t_safe[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            if need_h or need_w or need_b:
                g = torch.softmax(logits, dim=-1)  # d loss / d logits = softmax - onehot
                g.scatter_add_(1, t_safe[:, None], -torch.ones_like(picked)[:, None])
                g *= valid[:, None]
                if need_h:
                    grad_h[s : s + chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += g.T @ h.to(acc)
                if need_b:
                    grad_b += g.sum(0)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(w_dtype) if grad_w is not None else None
        gb = (grad_b * grad_out).to(b_dtype) if grad_b is not None else None
        return gh, gw, gb, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    impl: str = "auto",
) -> torch.Tensor:
    """Summed cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``targets [N]`` (fp32 scalar).

    ``impl``: ``auto`` (Liger on CUDA when installed, else ``chunked``), ``chunked``, ``liger``, ``eager``
    (plain logits + ``F.cross_entropy``; the test oracle).
    """
    if impl not in ("auto", "chunked", "liger", "eager"):
        raise ValueError(f"unknown impl {impl!r}: auto | chunked | liger | eager")
    if hidden.shape[0] == 0:  # no target here (a rank's idle micro-batch): a zero that still reaches the weights
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float()
    if impl == "auto":
        impl = "liger" if HAS_LIGER and hidden.is_cuda else "chunked"
    if impl == "eager":
        logits = F.linear(hidden, weight, bias).float()
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    if impl == "liger":
        if not HAS_LIGER:
            raise RuntimeError("impl='liger' needs liger-kernel: pip install liger-kernel")
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        out = LigerFusedLinearCrossEntropyFunction.apply(
            hidden, weight, targets, bias, None, ignore_index, 0.0, 0.0, "sum"
        )
        return (out[0] if isinstance(out, tuple) else out).float()
    return LinearCrossEntropyFunction.apply(
        hidden, weight, bias, targets, chunk_size, ignore_index, torch.is_grad_enabled()
    )
