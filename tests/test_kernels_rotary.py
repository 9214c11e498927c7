"""Fused rotary embedding (kernels/rotary.py): Triton vs the torch reference vs float64, forward and gradients.

Without a GPU the kernels run in the Triton interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports triton. Shared helpers (skip mark, accuracy check) are in tests/kernel_testing.py.
"""

import pytest
import torch
from kernel_testing import CUDA, DEVICE, assert_matches, requires_triton

from fastllava.kernels import apply_rotary, apply_rotary_, apply_rotary_ref, rotary_cos_sin

pytestmark = requires_triton

# Triton vs the reference in the same dtype (bf16 is checked against float64 only; see `assert_matches`).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}

# (sequence lengths packed into one stream, Hq, Hk, head_dim)
CASES = [
    ([5, 1, 3], 4, 2, 64),  # packed batch with a 1-token sequence, GQA
    ([1], 3, 1, 128),  # one token, odd head count
    ([7, 2], 6, 6, 48),  # head_dim / 2 not a power of two
]


def rotary_f64(q, k, cos, sin, position_ids):
    """Independent oracle: explicit complex-free rotation of each (i, i + D/2) pair, in float64."""
    c, s = cos.double()[position_ids][:, None, :], sin.double()[position_ids][:, None, :]
    half = q.shape[-1] // 2

    def rotate(x):
        x = x.double()
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * c[..., :half] - x2 * s[..., :half], x2 * c[..., half:] + x1 * s[..., half:]), -1)

    return rotate(q), rotate(k)


def packed_positions(lengths):
    return torch.cat([torch.arange(n) for n in lengths]).to(DEVICE)


def make_case(lengths, hq, hk, d, dtype, seed=0):
    torch.manual_seed(seed)
    t = sum(lengths)
    # positions past the first few rows of the table too: offset every sequence by a random start
    position_ids = packed_positions(lengths) + torch.randint(0, 50, (t,), device=DEVICE) * (t > 1)
    cos, sin = rotary_cos_sin(d, 64, device=DEVICE)
    q = torch.randn(t, hq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(t, hk, d, device=DEVICE, dtype=dtype)
    return q, k, cos, sin, position_ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{sum(c[0])}-Hq{c[1]}-Hk{c[2]}-D{c[3]}")
def test_rotary(triton_kernels, case, dtype):
    run_case(*case, dtype)


def run_case(lengths, hq, hk, d, dtype):
    q, k, cos, sin, position_ids = make_case(lengths, hq, hk, d, dtype)
    dq = torch.randn_like(q)
    dk = torch.randn_like(k)
    results = {}
    for name, fn in (("triton", apply_rotary), ("torch", apply_rotary_ref), ("f64", rotary_f64)):
        cast = torch.float64 if name == "f64" else dtype
        qq = q.detach().to(cast).requires_grad_()
        kk = k.detach().to(cast).requires_grad_()
        q_out, k_out = fn(qq, kk, cos, sin, position_ids)
        torch.autograd.backward((q_out, k_out), (dq.to(cast), dk.to(cast)))
        results[name] = (q_out, k_out, qq.grad, kk.grad)
    for i, name in enumerate(["q_rot", "k_rot", "dq", "dk"]):
        assert_matches(results["triton"][i], results["torch"][i], results["f64"][i], name, TOL)


def test_rotary_inplace_on_fused_qkv_views(triton_kernels):
    """`apply_rotary_` rotates strided views of a fused qkv buffer where they are and leaves v alone."""
    lengths, hq, hk, d = [4, 1, 2], 4, 2, 32
    q, k, cos, sin, position_ids = make_case(lengths, hq, hk, d, torch.float32, seed=3)
    t = q.shape[0]
    qkv = torch.cat((q.reshape(t, -1), k.reshape(t, -1), torch.randn(t, hk * d, device=DEVICE)), dim=1)
    v_before = qkv[:, (hq + hk) * d :].clone()
    q_view = qkv[:, : hq * d].view(t, hq, d)
    k_view = qkv[:, hq * d : (hq + hk) * d].view(t, hk, d)
    expected_q, expected_k = apply_rotary_ref(q, k, cos, sin, position_ids)
    out_q, out_k = apply_rotary_(q_view, k_view, cos, sin, position_ids)
    assert out_q is q_view and out_k is k_view
    torch.testing.assert_close(q_view, expected_q, **TOL[torch.float32])
    torch.testing.assert_close(k_view, expected_k, **TOL[torch.float32])
    assert torch.equal(qkv[:, (hq + hk) * d :], v_before)


def test_rotary_out_of_place_leaves_inputs(triton_kernels):
    q, k, cos, sin, position_ids = make_case([3, 2], 2, 1, 16, torch.float32, seed=4)
    q0, k0 = q.clone(), k.clone()
    q_out, k_out = apply_rotary(q, k, cos, sin, position_ids)
    assert torch.equal(q, q0) and torch.equal(k, k0)
    assert not torch.allclose(q_out, q0)  # positions > 0 rotate


def test_rotary_position_zero_is_identity(triton_kernels):
    q, k, cos, sin, _ = make_case([5], 2, 2, 32, torch.float32, seed=5)
    zeros = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    q_out, k_out = apply_rotary(q, k, cos, sin, zeros)
    assert torch.equal(q_out, q) and torch.equal(k_out, k)


def _hf_tables(head_dim, max_positions, base, scaling):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", **(scaling or {}), "rope_theta": base}
    config = LlamaConfig(
        hidden_size=head_dim * 2,
        num_attention_heads=2,
        max_position_embeddings=max_positions,
        rope_parameters=rope,
    )
    emb = LlamaRotaryEmbedding(config)
    cos, sin = emb(torch.zeros(1), torch.arange(max_positions)[None])
    return cos[0], sin[0]


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ],
    ids=["default", "linear", "llama3"],
)
def test_rotary_cos_sin_matches_transformers(scaling):
    base = 500000.0 if scaling and scaling["rope_type"] == "llama3" else 10000.0
    cos, sin = rotary_cos_sin(64, 128, base, scaling=scaling)
    hf_cos, hf_sin = _hf_tables(64, 128, base, scaling)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_rotary_ref_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k, cos, sin, position_ids = make_case([6, 3], 4, 2, 32, torch.float32, seed=6)
    # transformers' layout: [B, H, T, D] with cos/sin [B, T, D]
    hf_q, hf_k = apply_rotary_pos_emb(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[position_ids][None], sin[position_ids][None]
    )
    ref_q, ref_k = apply_rotary_ref(q, k, cos, sin, position_ids)
    torch.testing.assert_close(ref_q, hf_q[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref_k, hf_k[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("case", CASES + [([4096, 1, 2047], 32, 8, 128)], ids=lambda c: f"T{sum(c[0])}")
def test_rotary_bf16_gpu(triton_kernels, case):
    run_case(*case, torch.bfloat16)
