"""Attention registry and our Triton attention kernels, against SDPA and a float64 per-sequence loop.

    pytest tests/test_attention.py          # CPU: the Triton kernels run through TRITON_INTERPRET=1

Every backend present here (sdpa, flex, triton) is checked forward and backward (dq, dk, dv) on packed batches
with random lengths (1 included), GQA, causal and not, head dims 64/80 (96/128 forward), keys with their own
lengths (bottom-right causal) and a sliding window; a perturbation test shows no token sees another sequence.
Paged decode (sdpa reference and the Triton kernel) is checked on shuffled block tables and against the last
row of varlen attention over the same cache. bf16 and flash-attn/xformers run only on CUDA (marked gpu).
"""

import os

import pytest
import torch
import torch.nn.functional as F
from kernel_testing import assert_matches

from fastllava import attention as A
from fastllava.kernels import set_kernels
from fastllava.kernels.dispatch import HAS_TRITON

CPU_BACKENDS = [b for b in ("sdpa", "sdpa_padded", "flex", "triton") if b in A.available_backends("cpu")]
TRITON_CPU = "triton" in CPU_BACKENDS
needs_triton = pytest.mark.skipif(not TRITON_CPU, reason="needs triton with TRITON_INTERPRET=1")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (atol, rtol) against the float64 loop and against sdpa in the same dtype
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


# ------------------------------------------------------------------------------------------- helpers


def cu(lengths: list[int], device="cpu") -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def random_lengths(n: int, hi: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, hi + 1, (n,), generator=g).tolist()
    lengths[seed % n] = 1  # always one single-token sequence
    return lengths


def oracle(q, k, v, cu_q, cu_k, causal, window=None, scale=None):
    """Float64 loop over sequences: plain matmul, mask, softmax, matmul (GQA by repeating K/V heads)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    outs = []
    for b in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        Lq, Lk = qe - qs, ke - ks
        qb = q[qs:qe].transpose(0, 1)  # (Hq, Lq, D)
        kb = k[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)  # (Hq, Lk, D)
        vb = v[ks:ke].repeat_interleave(group, dim=1).transpose(0, 1)
        s = qb @ kb.transpose(1, 2) * scale
        i = torch.arange(Lq)[:, None] + (Lk - Lq)  # bottom-right: the last query sits at the last key
        j = torch.arange(Lk)[None, :]
        allowed = torch.ones(Lq, Lk, dtype=torch.bool)
        if causal:
            allowed &= j <= i
        if window is not None:
            allowed &= i - j < window
        p = torch.softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        outs.append((p @ vb).transpose(0, 1))
    return torch.cat(outs)


def make_qkv(len_q, len_k, hq, hk, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(len_q), hq, d, generator=g).to(device, dtype)
    k = torch.randn(sum(len_k), hk, d, generator=g).to(device, dtype)
    v = torch.randn(sum(len_k), hk, d, generator=g).to(device, dtype)
    do = torch.randn(sum(len_q), hq, d, generator=g).to(device, dtype)
    return q, k, v, do


def run(backend, q, k, v, do, len_q, len_k, causal, window=None):
    """(out, dq, dk, dv) of one backend on the packed batch."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    same = len_k is len_q
    out = A.varlen_attention(
        q,
        k,
        v,
        cu(len_q, q.device),
        max(len_q),
        causal=causal,
        backend=backend,
        window=window,
        cu_seqlens_k=None if same else cu(len_k, q.device),
        max_seqlen_k=None if same else max(len_k),
    )
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


def run_oracle(q, k, v, do, len_q, len_k, causal, window=None):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    out = oracle(q, k, v, cu(len_q), cu(len_k), causal, window)
    out.backward(do.double())
    return out.detach(), q.grad, k.grad, v.grad


def assert_all_close(got, want, dtype, what):
    atol, rtol = TOL[dtype]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g.double().cpu(), w.double().cpu(), atol=atol, rtol=rtol, msg=f"{what}: {name}")


def check_backend(backend, len_q, len_k, hq, hk, d, dtype, causal, window=None, seed=0):
    q, k, v, do = make_qkv(len_q, len_k, hq, hk, d, dtype, seed)
    got = run(backend, q, k, v, do, len_q, len_k, causal, window)
    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert_all_close(got, run_oracle(q, k, v, do, len_q, len_k, causal, window), dtype, f"{backend} vs float64")
    if backend != "sdpa":
        assert_all_close(got, run("sdpa", q, k, v, do, len_q, len_k, causal, window), dtype, f"{backend} vs sdpa")


# ------------------------------------------------------------------------------------ varlen backends

# (dtype, head_dim, Hq, Hk, causal, seed)
CASES = [
    (torch.float32, 64, 4, 4, True, 0),
    (torch.float32, 80, 6, 2, True, 1),
    (torch.float32, 64, 4, 1, False, 2),
    (torch.float32, 80, 2, 2, False, 3),
    (torch.float16, 64, 4, 2, True, 4),
    (torch.float16, 80, 4, 4, False, 5),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype,d,hq,hk,causal,seed", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_varlen_matches_sdpa_and_float64(backend, dtype, d, hq, hk, causal, seed):
    lengths = random_lengths(5, 40, seed)
    check_backend(backend, lengths, lengths, hq, hk, d, dtype, causal, seed=seed)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("d", [96, 128])
def test_varlen_wide_heads(backend, d):
    lengths = [7, 1, 19]
    check_backend(backend, lengths, lengths, 4, 2, d, torch.float32, True, seed=d)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("window", [None, 6])
def test_cached_prefix_is_bottom_right_causal(backend, window):
    # chunked prefill: each sequence's new queries attend its cached prefix plus themselves
    len_q = [3, 1, 17, 5, 1]
    len_k = [10, 1, 40, 5, 9]
    check_backend(backend, len_q, len_k, 4, 2, 64, torch.float32, True, window, seed=7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_sliding_window(backend, causal):
    lengths = [30, 1, 9, 33]
    check_backend(backend, lengths, lengths, 4, 2, 64, torch.float32, causal, window=5, seed=11)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_token_attends_across_sequences(backend):
    lengths = [9, 20, 1, 14]
    starts = cu(lengths).tolist()
    q, k, v, do = make_qkv(lengths, lengths, 4, 2, 64, torch.float32, seed=3)
    base = run(backend, q, k, v, do, lengths, lengths, causal=False)
    s, e = starts[1], starts[2]  # perturb the second sequence only, by a lot
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[s:e] = 50 * torch.randn_like(x[s:e])
    moved = run(backend, q2, k2, v2, do, lengths, lengths, causal=False)
    others = torch.ones(q.shape[0], dtype=torch.bool)
    others[s:e] = False
    for name, a, b in zip(("out", "dq", "dk", "dv"), base, moved, strict=True):
        assert torch.equal(a[others], b[others]), f"{backend}: {name} of other sequences moved"
        assert not torch.equal(a[~others], b[~others])  # the perturbation did reach its own sequence


@pytest.mark.skipif("flex" not in CPU_BACKENDS, reason="needs torch flex_attention")
def test_flex_block_mask_cache_follows_cu_seqlens_edits():
    q, k, v, _ = make_qkv([10, 6], [10, 6], 2, 2, 32, torch.float32, seed=6)
    c = cu([10, 6])
    with torch.no_grad():
        first = A.varlen_attention(q, k, v, c, 10, backend="flex")
        assert torch.equal(first, A.varlen_attention(q, k, v, c, 10, backend="flex"))  # cache hit
        c[1] = 3  # same tensor, new lengths [3, 13]: the cached mask must not be reused
        got = A.varlen_attention(q, k, v, c, 13, backend="flex")
    torch.testing.assert_close(got.double(), oracle(q, k, v, c, c, True), atol=1e-5, rtol=1e-5)


def test_kernel_reference_matches_float64():
    from fastllava.kernels.flash_attention import flash_attn_varlen_ref

    len_q, len_k = [4, 1, 12], [9, 1, 12]
    q, k, v, _ = make_qkv(len_q, len_k, 4, 2, 32, torch.float32, seed=5)
    for causal, window in [(True, None), (False, None), (True, 3), (False, 3)]:
        got = flash_attn_varlen_ref(q, k, v, cu(len_q), cu(len_k), 12, 12, causal, None, window)
        want = oracle(q, k, v, cu(len_q), cu(len_k), causal, window)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_flash_attn_varlen_op_follows_the_kernel_switch():
    from fastllava.kernels import flash_attention as fa

    lengths = [5, 1, 18]
    q, k, v, _ = make_qkv(lengths, lengths, 4, 2, 64, torch.float32, seed=9)
    c = cu(lengths)
    want = oracle(q, k, v, c, c, True)
    previous = set_kernels("triton")
    try:
        got_triton = fa.flash_attn_varlen(q, k, v, c, c, 18, 18, True)
        set_kernels("torch")
        got_torch = fa.flash_attn_varlen(q, k, v, c, c, 18, 18, True)
    finally:
        set_kernels(previous)
    torch.testing.assert_close(got_triton.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_torch.double(), want, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_kernel_grid_has_programs_past_short_sequences():
    # max_seqlen larger than any sequence: the extra query/key blocks must exit without writing
    lengths = [3, 1, 5]
    q, k, v, do = make_qkv(lengths, lengths, 2, 2, 64, torch.float32, seed=4)
    from fastllava.kernels.flash_attention import flash_attn_varlen_triton

    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    out = flash_attn_varlen_triton(q, k, v, cu(lengths), cu(lengths), 64, 64, True)
    out.backward(do)
    want = run_oracle(q, k, v, do, lengths, lengths, True)
    assert_all_close((out.detach(), q.grad, k.grad, v.grad), want, torch.float32, "oversized grid")


# ------------------------------------------------------------------------------------ registry


def test_available_backends_contents():
    names = A.available_backends()
    assert "sdpa" in names and names == sorted(names, key=lambda n: -A._BACKENDS[n].priority)
    assert ("flex" in names) == A.HAS_FLEX
    cpu = A.available_backends("cpu")
    assert "flash" not in cpu and "xformers" not in cpu  # CUDA-only even when installed
    assert ("triton" in cpu) == (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1")
    assert ("flash" in A.available_backends("cuda")) == A.HAS_FLASH_ATTN
    assert ("xformers" in A.available_backends("cuda")) == A.HAS_XFORMERS


def test_auto_never_picks_the_interpreter_on_cpu():
    # the padded batch (O(B L^2)), not the interpreter nor the reference's T x T mask
    assert A.resolve_backend("auto", "cpu") == "sdpa_padded"
    assert A.resolve_backend(None, torch.device("cpu")) == "sdpa_padded"
    if torch.cuda.is_available():
        assert A.resolve_backend("auto", "cuda") != "sdpa_padded"


def test_triton_needs_the_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "triton" not in A.available_backends("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        A.resolve_backend("triton", "cpu")


def test_aliases_and_unknown_backend():
    assert A.resolve_backend("eager", "cpu") == "sdpa"
    if A.HAS_FLEX:
        assert A.resolve_backend("flex_attention", "cpu") == "flex"
    q = torch.randn(4, 2, 16)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        A.varlen_attention(q, q, q, cu([4]), 4, backend="nope")


def test_window_on_a_backend_without_window_support():
    A.register_backend("no_window", A.sdpa_varlen, priority=-1, supports_window=False)
    try:
        q = torch.randn(4, 2, 16)
        with pytest.raises(ValueError, match="does not support a sliding window"):
            A.varlen_attention(q, q, q, cu([4]), 4, backend="no_window", window=2)
    finally:
        del A._BACKENDS["no_window"]


@pytest.mark.skipif(A.HAS_FLASH_ATTN, reason="flash-attn is installed")
def test_flash_missing_names_the_package():
    q = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        A.varlen_attention(q, q, q, cu([4]), 4, backend="flash")
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        A.resolve_backend("flash_attention_2")
    with pytest.raises(RuntimeError, match="pip install flash-attn"):
        A.flash_varlen(q, q, q, cu([4]), 4, True, 0.25)


@pytest.mark.skipif(A.HAS_XFORMERS, reason="xformers is installed")
def test_xformers_missing_names_the_package():
    q = torch.randn(4, 2, 16)
    with pytest.raises(RuntimeError, match="pip install xformers"):
        A.varlen_attention(q, q, q, cu([4]), 4, backend="xformers")
    with pytest.raises(RuntimeError, match="pip install xformers"):
        A.xformers_varlen(q, q, q, cu([4]), 4, True, 0.25)


# ------------------------------------------------------------------------------------ paged decode


def fill_paged_cache(k, v, lengths, block_size, num_blocks, seed):
    """Scatter packed K/V [T, Hk, D] into a paged cache with shuffled physical blocks."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lengths) + 1  # one spare column: never read
    perm = torch.randperm(num_blocks, generator=g)
    assert len(lengths) * max_blocks <= num_blocks
    tables = perm[: len(lengths) * max_blocks].view(len(lengths), max_blocks).to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, *k.shape[1:], generator=g).to(k.dtype)  # garbage elsewhere
    v_cache = torch.randn(num_blocks, block_size, *v.shape[1:], generator=g).to(v.dtype)
    start = 0
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        blocks = tables[b, pos // block_size].long()
        k_cache[blocks, pos % block_size] = k[start : start + n]
        v_cache[blocks, pos % block_size] = v[start : start + n]
        start += n
    return k_cache, v_cache, tables


def paged_oracle(q, k_cache, v_cache, tables, lens, window=None):
    """Float64 loop: gather each sequence's keys block by block, then softmax attention."""
    B, Hq, D = q.shape
    group = Hq // k_cache.shape[2]
    bs = k_cache.shape[1]
    out = torch.empty(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        pos = torch.arange(n)
        keys = k_cache[tables[b, pos // bs].long(), pos % bs].double().repeat_interleave(group, 1)  # (n, Hq, D)
        vals = v_cache[tables[b, pos // bs].long(), pos % bs].double().repeat_interleave(group, 1)
        s = torch.einsum("hd,nhd->hn", q[b].double(), keys) / D**0.5
        if window is not None:
            s[:, : max(0, n - window)] = float("-inf")
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, -1), vals)
    return out


PAGED_BACKENDS = ["sdpa"] + (["triton"] if TRITON_CPU else [])


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize(
    "dtype,d,hq,hk,block_size,window",
    [
        (torch.float32, 64, 8, 2, 16, None),
        (torch.float32, 80, 4, 4, 16, 10),
        (torch.float16, 64, 4, 1, 16, None),
        (torch.float32, 64, 6, 3, 12, 7),  # block size that is not a power of two
    ],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_paged_matches_reference(backend, dtype, d, hq, hk, block_size, window):
    lengths = [1, block_size, 2 * block_size, 37, 5, 3 * block_size - 1]  # 1 and exact block multiples
    g = torch.Generator().manual_seed(d + hq)
    k = torch.randn(sum(lengths), hk, d, generator=g).to(dtype)
    v = torch.randn(sum(lengths), hk, d, generator=g).to(dtype)
    q = torch.randn(len(lengths), hq, d, generator=g).to(dtype)
    k_cache, v_cache, tables = fill_paged_cache(k, v, lengths, block_size, num_blocks=40, seed=d)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = A.paged_attention(q, k_cache, v_cache, tables, lens, backend=backend, window=window)
    atol, rtol = TOL[dtype]
    assert got.dtype == dtype
    torch.testing.assert_close(
        got.double(), paged_oracle(q, k_cache, v_cache, tables, lens, window), atol=atol, rtol=rtol
    )
    want = A.paged_attention_ref(q, k_cache, v_cache, tables, lens, window=window)
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("num_splits", [2, 5])
def test_paged_triton_split_k(num_splits):
    from fastllava.kernels.paged_attention import paged_attention_decode_triton

    lengths = [1, 16, 64, 45]
    g = torch.Generator().manual_seed(num_splits)
    k = torch.randn(sum(lengths), 2, 64, generator=g)
    v = torch.randn(sum(lengths), 2, 64, generator=g)
    q = torch.randn(len(lengths), 8, 64, generator=g)
    k_cache, v_cache, tables = fill_paged_cache(k, v, lengths, 16, num_blocks=30, seed=1)
    lens = torch.tensor(lengths, dtype=torch.int32)
    for window in (None, 20):
        got = paged_attention_decode_triton(q, k_cache, v_cache, tables, lens, window=window, num_splits=num_splits)
        want = paged_oracle(q, k_cache, v_cache, tables, lens, window)
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
def test_paged_decode_equals_last_row_of_packed_prefill(backend):
    # prefill writes K/V into the cache; decoding the last token again must equal varlen's last row
    lengths = [5, 1, 16, 23]
    q, k, v, _ = make_qkv(lengths, lengths, 8, 2, 64, torch.float32, seed=21)
    c = cu(lengths)
    prefill = A.varlen_attention(q, k, v, c, max(lengths), causal=True, backend="sdpa")
    k_cache, v_cache, tables = fill_paged_cache(k, v, lengths, 8, num_blocks=24, seed=2)
    last = (c[1:] - 1).long()
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = A.paged_attention(q[last], k_cache, v_cache, tables, lens, backend=backend)
    torch.testing.assert_close(got, prefill[last], atol=1e-5, rtol=1e-5)


def test_paged_auto_uses_the_reference_on_cpu(monkeypatch):
    calls = []
    fn = A.get_backend("sdpa").paged
    monkeypatch.setattr(A.get_backend("sdpa"), "paged", lambda *a: calls.append(1) or fn(*a))
    q = torch.randn(1, 2, 16)
    cache = torch.randn(2, 4, 2, 16)
    A.paged_attention(q, cache, cache, torch.tensor([[1]], dtype=torch.int32), torch.tensor([3]))
    assert calls == [1]


def test_every_backend_declares_its_decode_path():
    for name, b in A._BACKENDS.items():
        assert (b.paged is None) != (b.decode_with is None), name
    assert A.get_backend("sdpa").paged is A.paged_attention_ref
    assert A.get_backend("triton").paged is A.triton_paged
    for name in ("flash", "flex", "xformers", "sdpa_padded"):
        assert A.get_backend(name).decode_with == "sdpa"


def test_paged_backend_resolution(caplog):
    assert A.resolve_paged_backend("auto", "cpu") == "sdpa"  # never the interpreter, never a redirect
    assert A.resolve_paged_backend("sdpa", "cpu") == "sdpa"
    if TRITON_CPU:
        assert A.resolve_paged_backend("triton", "cpu") == "triton"
    A._decode_redirects_logged.discard("sdpa_padded")
    with caplog.at_level("WARNING", logger="fastllava.attention"):
        assert A.resolve_paged_backend("sdpa_padded", "cpu") == "sdpa"
        assert A.resolve_paged_backend("sdpa_padded", "cpu") == "sdpa"
    notes = [r.getMessage() for r in caplog.records if "no paged decode path" in r.getMessage()]
    assert notes == ["attention backend 'sdpa_padded' has no paged decode path: decode runs the 'sdpa' backend's"]
    with pytest.raises(RuntimeError, match="pip install flash-attn" if not A.HAS_FLASH_ATTN else "cuda"):
        A.resolve_paged_backend("flash_attention_2", "cpu")  # the varlen checks apply at decode too
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        A.resolve_paged_backend("nope", "cpu")


def test_decode_with_a_backend_without_paged_path(monkeypatch):
    lengths = [3, 9]
    q, k, v, _ = make_qkv(lengths, lengths, 4, 2, 16, torch.float32, seed=5)
    k_cache, v_cache, tables = fill_paged_cache(k, v, lengths, 4, num_blocks=8, seed=5)
    lens = torch.tensor(lengths, dtype=torch.int32)
    last = (cu(lengths)[1:] - 1).long()
    monkeypatch.setitem(A._BACKENDS, "varlen_only", A.Backend("varlen_only", A.sdpa_varlen, lambda d=None: True, ""))
    with pytest.raises(ValueError, match="'varlen_only' has no paged \\(decode\\) path"):
        A.paged_attention(q[last], k_cache, v_cache, tables, lens, backend="varlen_only")
    calls = []
    A.register_backend("own_paged", A.sdpa_varlen, paged=lambda *a: calls.append(1) or A.paged_attention_ref(*a))
    try:
        got = A.paged_attention(q[last], k_cache, v_cache, tables, lens, backend="own_paged")
    finally:
        del A._BACKENDS["own_paged"]
    assert calls == [1]
    torch.testing.assert_close(got, A.paged_attention_ref(q[last], k_cache, v_cache, tables, lens))
    with pytest.raises(ValueError, match="not both"):
        A.register_backend("both", A.sdpa_varlen, paged=A.paged_attention_ref, decode_with="sdpa")


# ------------------------------------------------------------------------------------ GPU (bf16)


@gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["triton", "flex", "flash", "xformers"])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 64)])
def test_gpu_bf16_matches_sdpa(backend, causal, window):
    if backend not in A.available_backends("cuda"):
        pytest.skip(f"{backend} not installed")
    lengths = [1, 300, 77, 1024, 129]
    q, k, v, do = make_qkv(lengths, lengths, 16, 4, 128, torch.bfloat16, seed=0, device="cuda")
    got = run(backend, q, k, v, do, lengths, lengths, causal, window)
    ref = run("sdpa", q, k, v, do, lengths, lengths, causal, window)
    exact = run_oracle(*(x.cpu() for x in (q, k, v, do)), lengths, lengths, causal, window)
    # two bf16 implementations' errors add up: judge each against float64, no worse than 2x SDPA's error
    for name, g, r, e in zip(("out", "dq", "dk", "dv"), got, ref, exact, strict=True):
        assert_matches(g.cpu(), r.cpu(), e, f"{backend} bf16 {name}", tol={})


@gpu
@needs_cuda
@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_gpu_triton_cached_prefix_bf16(d):
    len_q, len_k = [100, 1, 513], [700, 1, 600]
    q, k, v, do = make_qkv(len_q, len_k, 8, 2, d, torch.bfloat16, seed=d, device="cuda")
    got = run("triton", q, k, v, do, len_q, len_k, True)
    want = run_oracle(*(x.cpu() for x in (q, k, v, do)), len_q, len_k, True)
    assert_all_close(got, want, torch.bfloat16, "triton cached prefix bf16")


@gpu
@needs_cuda
def test_gpu_paged_triton_bf16():
    lengths = [1, 16, 4096, 333, 2048]
    g = torch.Generator().manual_seed(0)
    k = torch.randn(sum(lengths), 8, 128, generator=g).bfloat16()
    v = torch.randn(sum(lengths), 8, 128, generator=g).bfloat16()
    q = torch.randn(len(lengths), 32, 128, generator=g).bfloat16()
    k_cache, v_cache, tables = fill_paged_cache(k, v, lengths, 16, num_blocks=1300, seed=0)
    lens = torch.tensor(lengths, dtype=torch.int32)
    got = A.paged_attention(q.cuda(), k_cache.cuda(), v_cache.cuda(), tables.cuda(), lens.cuda(), backend="triton")
    want = paged_oracle(q, k_cache, v_cache, tables, lens)
    torch.testing.assert_close(got.double().cpu(), want, atol=2e-2, rtol=2e-2)


def test_sdpa_reference_matches_float64_without_grad():
    # the oracle itself against a second formulation: dense SDPA with the registry's mask
    lengths = [6, 1, 11]
    q, k, v, _ = make_qkv(lengths, lengths, 2, 2, 16, torch.float64, seed=8)
    c = cu(lengths)
    mask = A.varlen_mask(c, q.shape[0], True)
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask)
    torch.testing.assert_close(dense.transpose(0, 1), oracle(q, k, v, c, c, True))
