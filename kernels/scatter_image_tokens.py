"""Varlen image-token scatter: write every image's projected features into its slots of the packed token stream.

    merged = scatter_image_tokens(embeds, features, offsets, counts)   # embeds [T, D], features [F, D]
    scatter_image_tokens_(embeds, features, offsets, counts)           # in place (marks embeds dirty)

Image i owns feature rows ``features[sum(counts[:i]) : sum(counts[:i+1])]`` and stream rows
``embeds[offsets[i] : offsets[i] + counts[i]]``; counts differ per image (anyres), F = sum(counts).

No host synchronisation: the grid is over feature rows (F is ``features.shape[0]``, known on the host), and
each program finds the image of its rows by a binary search in ``cumsum(counts)`` on the device, so nothing is
ever read back. The caller guarantees ``sum(counts) == F`` and slots inside ``[0, T)`` (the tokenizer expanded
each `<image>` into exactly that many slots); checking it would cost a sync. The backward is the same walk in
reverse: gather ``d_features`` from the slots and zero those rows of the passthrough ``d_embeds``, in one launch.

Run the tests on CPU with `TRITON_INTERPRET=1 pytest tests/test_kernels_scatter_image_tokens.py`.
"""

from __future__ import annotations

import torch

from fastllava.kernels.dispatch import HAS_TRITON, use_triton
from fastllava.kernels.launch import unit_last_stride

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _image_token_destinations(offsets_ptr, counts_ptr, cu_ptr, rows, row_mask, n_images, n_search_steps):
        """Stream row of each feature row in ``rows`` (int64 [BLOCK_F])."""
        # image of feature row f = number of inclusive prefix sums <= f   (searchsorted(cu, f, right=True))
        lo = tl.zeros_like(rows)
        hi = tl.zeros_like(rows) + n_images
        for _ in range(n_search_steps):
            active = (lo < hi) & row_mask
            mid = (lo + hi) // 2
            c = tl.load(cu_ptr + mid, mask=active, other=0)
            right = c <= rows
            lo = tl.where(active & right, mid + 1, lo)
            hi = tl.where(active & (~right), mid, hi)
        end = tl.load(cu_ptr + lo, mask=row_mask, other=0)
        count = tl.load(counts_ptr + lo, mask=row_mask, other=0).to(tl.int64)
        offset = tl.load(offsets_ptr + lo, mask=row_mask, other=0).to(tl.int64)
        return offset + rows - (end - count)

    @triton.jit
    def _scatter_image_tokens_fwd_kernel(
        feat_ptr,
        out_ptr,
        offsets_ptr,
        counts_ptr,
        cu_ptr,
        n_feat,
        n_images,
        n_search_steps,
        n_cols,
        feat_stride,
        out_stride,
        BLOCK_F: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_mask = rows < n_feat
        dest = _image_token_destinations(offsets_ptr, counts_ptr, cu_ptr, rows, row_mask, n_images, n_search_steps)
        for d0 in range(0, n_cols, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            x = tl.load(feat_ptr + rows[:, None] * feat_stride + cols[None, :], mask=mask)
            tl.store(out_ptr + dest[:, None] * out_stride + cols[None, :], x.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scatter_image_tokens_bwd_kernel(
        d_out_ptr,
        d_embeds_ptr,
        d_feat_ptr,
        offsets_ptr,
        counts_ptr,
        cu_ptr,
        n_feat,
        n_images,
        n_search_steps,
        n_cols,
        d_out_stride,
        d_embeds_stride,
        d_feat_stride,
        BLOCK_F: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_F + tl.arange(0, BLOCK_F)
        row_mask = rows < n_feat
        dest = _image_token_destinations(offsets_ptr, counts_ptr, cu_ptr, rows, row_mask, n_images, n_search_steps)
        for d0 in range(0, n_cols, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols[None, :] < n_cols)
            g = tl.load(d_out_ptr + dest[:, None] * d_out_stride + cols[None, :], mask=mask)
            d_feat = d_feat_ptr + rows[:, None] * d_feat_stride + cols[None, :]
            tl.store(d_feat, g.to(d_feat_ptr.dtype.element_ty), mask=mask)
            # image slots were overwritten in the forward: no gradient reaches the original embeddings there
            zeros = tl.zeros([BLOCK_F, BLOCK_D], dtype=d_embeds_ptr.dtype.element_ty)
            tl.store(d_embeds_ptr + dest[:, None] * d_embeds_stride + cols[None, :], zeros, mask=mask)


def _launch_args(n_feat: int, n_cols: int, offsets: torch.Tensor, counts: torch.Tensor):
    """Device-side prefix sum, search depth and block sizes; shapes only, nothing is read back."""
    n_images = offsets.shape[0]
    cu = torch.cumsum(counts, 0, dtype=torch.int64)  # (N,) inclusive ends of each image's feature rows
    n_search_steps = max(1, n_images.bit_length())  # ceil(log2(N + 1)) halvings of [0, N]
    block_d = min(triton.next_power_of_2(max(n_cols, 1)), 1024)
    block_f = max(1, min(16, 4096 // block_d))
    grid = (triton.cdiv(n_feat, block_f),)
    return cu, n_images, n_search_steps, block_f, block_d, grid


def scatter_image_tokens_fwd(
    out: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Launch the scatter into ``out`` [T, D] (in place); returns ``out``."""
    features = unit_last_stride(features)
    n_feat, n_cols = features.shape
    cu, n_images, steps, block_f, block_d, grid = _launch_args(n_feat, n_cols, offsets, counts)
    if n_feat > 0 and n_cols > 0:
        _scatter_image_tokens_fwd_kernel[grid](
            features, out, offsets, counts, cu, n_feat, n_images, steps, n_cols,
            features.stride(0), out.stride(0),
            BLOCK_F=block_f, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def scatter_image_tokens_bwd(
    d_out: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, n_feat: int, features_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward for ``n_feat`` feature rows: returns ``(d_embeds, d_features)``."""
    d_out = unit_last_stride(d_out)
    d_embeds = d_out.clone(memory_format=torch.contiguous_format)
    n_cols = d_out.shape[1]
    d_feat = torch.empty((n_feat, n_cols), dtype=features_dtype, device=d_out.device)
    cu, n_images, steps, block_f, block_d, grid = _launch_args(n_feat, n_cols, offsets, counts)
    if n_feat > 0 and n_cols > 0:
        _scatter_image_tokens_bwd_kernel[grid](
            d_out, d_embeds, d_feat, offsets, counts, cu, n_feat, n_images, steps, n_cols,
            d_out.stride(0), d_embeds.stride(0), d_feat.stride(0),
            BLOCK_F=block_f, BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return d_embeds, d_feat


class ScatterImageTokensFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embeds, features, offsets, counts, inplace):
        if inplace:
            out = embeds
            ctx.mark_dirty(embeds)
        else:
            out = embeds.clone(memory_format=torch.contiguous_format)
        scatter_image_tokens_fwd(out, features, offsets, counts)
        ctx.features_meta = (features.shape[0], features.dtype)
        ctx.save_for_backward(offsets, counts)
        return out

    @staticmethod
    def backward(ctx, d_out):
        offsets, counts = ctx.saved_tensors
        d_embeds, d_feat = scatter_image_tokens_bwd(d_out, offsets, counts, *ctx.features_meta)
        return d_embeds, d_feat, None, None, None


def scatter_image_tokens(
    embeds: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Merged stream: ``embeds`` [T, D] with image i's ``counts[i]`` feature rows written at ``offsets[i]``.

    ``features`` [sum(counts), D] holds all images' rows back to back (any float dtype; cast to embeds'),
    ``offsets``/``counts`` [N] are integer tensors on the stream's device. Differentiable in embeds and features.
    """
    if use_triton(embeds, features, offsets, counts):
        return ScatterImageTokensFunction.apply(embeds, features, offsets, counts, False)
    return scatter_image_tokens_ref(embeds, features, offsets, counts)


def scatter_image_tokens_(
    embeds: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """In-place `scatter_image_tokens`: writes into ``embeds`` and returns it (autograd-aware, like `index_copy_`)."""
    if use_triton(embeds, features, offsets, counts):
        if embeds.stride(-1) == 1:
            return ScatterImageTokensFunction.apply(embeds, features, offsets, counts, True)
        return embeds.copy_(ScatterImageTokensFunction.apply(embeds, features, offsets, counts, False))
    return embeds.index_copy_(
        0, image_token_destinations(offsets, counts, features.shape[0]), features.to(embeds.dtype)
    )


def image_token_destinations(offsets: torch.Tensor, counts: torch.Tensor, n_features: int) -> torch.Tensor:
    """Stream row of every feature row, int64 [n_features], computed on the device without a sync."""
    cu = torch.cumsum(counts, 0, dtype=torch.int64)  # (N,)
    rows = torch.arange(n_features, device=counts.device)  # (F,)
    image = torch.searchsorted(cu, rows, right=True)  # (F,) image of each feature row
    return offsets.to(torch.int64)[image] + rows - (cu - counts.to(torch.int64))[image]


def scatter_image_tokens_ref(
    embeds: torch.Tensor, features: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Plain torch scatter (``index_copy``; autograd gives the gather/zero backward): the CPU path and oracle."""
    dest = image_token_destinations(offsets, counts, features.shape[0])
    return embeds.index_copy(0, dest, features.to(embeds.dtype))
