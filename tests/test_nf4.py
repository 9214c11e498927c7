"""NF4 in bitsandbytes' format: quantize/dequantize bit-identical to bitsandbytes (both directions), the fused
NF4 matmul (Triton through the interpreter) against x @ dequant(W).T, Linear4bit state dicts with transformers'
bnb-4bit key layout, whole-model quantization, QLoRA through peft, and the CUDA GEMV (GPU only).

    pytest tests/test_nf4.py
"""

import importlib.util
import io
import json
import os
import warnings

import pytest
import torch
import torch.nn as nn

from fastllava.kernels.dispatch import HAS_TRITON, set_kernels
from fastllava.kernels.nf4_dequantize import nf4_dequantize, nf4_dequantize_ref
from fastllava.kernels.nf4_matmul import nf4_gemv_fwd, nf4_matmul, nf4_matmul_ref
from fastllava.quantization import (
    Linear4bit,
    QuantState,
    dequantize_nf4,
    load_bnb_4bit_state_dict_,
    lora_config_for_4bit,
    pack_bnb_state_dict,
    quantize_model_,
    quantize_model_8bit_,
    quantize_nf4,
    unpack_bnb_state_dict,
)

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes not installed (pip install bitsandbytes)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
needs_interp = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="Triton on CPU needs TRITON_INTERPRET=1 before triton is imported",
)

# (shape, blocksize): rows a multiple of the blocksize, and odd row counts
ALIGNED = [((96, 192), 64), ((7, 192), 64), ((33, 640), 128), ((64, 64), 64), ((3, 256), 128)]
# blocks straddling rows, a partial last block, an odd element count
UNALIGNED = [((96, 200), 64), ((5, 13), 64), ((11, 100), 128)]


@pytest.fixture
def triton_mode():
    previous = set_kernels("triton")
    yield
    set_kernels(previous)


@pytest.fixture
def torch_mode():
    previous = set_kernels("torch")
    yield
    set_kernels(previous)


def _bnb():
    import bitsandbytes.functional as bnbf

    return bnbf


def _bnb_dequant_reference(packed, st):
    """bnb's pure-torch dequantization (its default backend). On AVX-512 CPUs bnb's native CPU kernel indexes
    absmax per row and is wrong when a quantization block straddles rows, so unaligned shapes compare here."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    fn = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile
    absmax = st.absmax
    if st.nested:
        absmax = _bnb().dequantize_blockwise(st.absmax, st.state2) + st.offset
    return fn(packed.reshape(-1), absmax.float(), st.code, st.blocksize, st.shape, torch.float32)


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (0.02 if seed % 2 else 1.0)


# ---------------------------------------------------------------------------------------------------------------
# format: bit-identical to bitsandbytes
# ---------------------------------------------------------------------------------------------------------------


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape,blocksize", ALIGNED + UNALIGNED)
def test_quantize_matches_bnb(shape, blocksize, compress, quant_type):
    for seed in range(3):
        w = _weights(shape, seed)
        packed_b, st_b = _bnb().quantize_4bit(
            w, blocksize=blocksize, compress_statistics=compress, quant_type=quant_type
        )
        packed, st = quantize_nf4(w, blocksize, compress, quant_type)
        assert packed.shape == packed_b.shape and packed.dtype == torch.uint8
        assert torch.equal(packed, packed_b)
        assert torch.equal(st.absmax, st_b.absmax)
        assert torch.equal(st.code, st_b.code)
        if compress:
            assert torch.equal(st.nested.absmax, st_b.state2.absmax)
            assert torch.equal(st.nested.code, st_b.state2.code)
            assert torch.equal(st.nested.offset, st_b.offset)
        # the serialized state: same keys, same tensors, same JSON
        ours, theirs = st.as_dict(), st_b.as_dict(packed=True)
        assert ours.keys() == theirs.keys()
        key = f"quant_state.bitsandbytes__{quant_type}"
        for k in ours:
            if k != key:
                assert torch.equal(ours[k], theirs[k]), k
        assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(theirs[key].tolist()))


@needs_bnb
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape,blocksize", ALIGNED)
def test_dequantize_bit_identical_both_directions(shape, blocksize, compress, torch_mode):
    bnbf = _bnb()
    w = _weights(shape, 1)
    # bnb quantizes -> we dequantize
    packed_b, st_b = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
    expected = bnbf.dequantize_4bit(packed_b, st_b)
    st = QuantState.from_dict({k: v for k, v in st_b.as_dict(packed=True).items()})
    assert torch.equal(dequantize_nf4(packed_b, st, torch.float32), expected)
    for dtype in (torch.float16, torch.bfloat16):
        exp = bnbf.dequantize_4bit(packed_b, st_b.__class__.from_dict(st_b.as_dict(packed=True), "cpu"))
        assert torch.equal(dequantize_nf4(packed_b, st, dtype), exp.to(dtype))
    # we quantize -> bnb dequantizes (loads our serialized state)
    packed, ours = quantize_nf4(w, blocksize, compress)
    st_from_ours = bnbf.QuantState.from_dict(dict(ours.as_dict()), torch.device("cpu"))
    assert torch.equal(bnbf.dequantize_4bit(packed, st_from_ours), dequantize_nf4(packed, ours, torch.float32))


@needs_bnb
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape,blocksize", UNALIGNED)
def test_dequantize_unaligned_matches_bnb_reference(shape, blocksize, compress, torch_mode):
    w = _weights(shape, 2)
    packed_b, st_b = _bnb().quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
    st = QuantState.from_dict(st_b.as_dict(packed=True))
    assert torch.equal(dequantize_nf4(packed_b, st, torch.float32), _bnb_dequant_reference(packed_b, st_b))


@needs_triton
@needs_interp
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape,blocksize", ALIGNED[:3] + UNALIGNED)
def test_triton_dequantize_matches_reference(shape, blocksize, compress, triton_mode):
    packed, st = quantize_nf4(_weights(shape, 3), blocksize, compress)
    for dtype in (torch.float32, torch.float16):
        ref = nf4_dequantize_ref(packed, st.absmax, shape, blocksize, dtype, st.nested)
        out = nf4_dequantize(packed, st.absmax, shape, blocksize, dtype, st.nested)
        assert torch.equal(out, ref)


@needs_bnb
@needs_triton
@needs_interp
def test_triton_dequantize_bit_identical_to_bnb(triton_mode):
    bnbf = _bnb()
    w = _weights((96, 192), 0)
    packed_b, st_b = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    st = QuantState.from_dict(st_b.as_dict(packed=True))
    assert torch.equal(dequantize_nf4(packed_b, st, torch.float32), bnbf.dequantize_4bit(packed_b, st_b))


def test_pack_unpack_round_trip():
    packed, st = quantize_nf4(_weights((40, 64), 4), 64, True)
    sd = pack_bnb_state_dict("layer.weight", packed, st)
    assert sorted(sd) == sorted(
        "layer.weight" + s
        for s in ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4")
    )
    packed2, st2 = unpack_bnb_state_dict(sd, "layer.weight")
    assert torch.equal(packed2, packed) and st2.shape == st.shape and st2.blocksize == 64
    assert torch.equal(dequantize_nf4(packed2, st2), dequantize_nf4(packed, st))


# ---------------------------------------------------------------------------------------------------------------
# fused matmul
# ---------------------------------------------------------------------------------------------------------------


@needs_triton
@needs_interp
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(96, 192), (200, 320)])
@pytest.mark.parametrize("rows", [1, 2, 7, 16, 17, 64])
def test_nf4_matmul_forward_backward(shape, rows, compress, triton_mode):
    N, K = shape
    packed, st = quantize_nf4(_weights(shape, rows), 64, compress)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, K, generator=g, requires_grad=True)
    bias = torch.randn(N, generator=g, requires_grad=True)
    w64 = nf4_dequantize_ref(packed, st.absmax, shape, 64, torch.float64, st.nested)

    y = nf4_matmul(x, packed, st.absmax, shape, 64, bias, st.nested)
    y_ref = nf4_matmul_ref(x.detach(), packed, st.absmax, shape, 64, bias.detach(), st.nested)
    y64 = x.detach().double() @ w64.T + bias.detach().double()
    assert y.shape == (rows, N) and y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)

    grad_out = torch.randn(rows, N, generator=g)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad.double(), grad_out.double() @ w64, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bias.grad, grad_out.sum(0))


@needs_triton
@needs_interp
def test_nf4_matmul_fp16_and_batched_input(triton_mode):
    shape = (96, 192)
    packed, st = quantize_nf4(_weights(shape, 5), 64, True)
    for rows in (3, 40):
        x = torch.randn(2, rows, 192).half()
        y = nf4_matmul(x, packed, st.absmax, shape, 64, None, st.nested)
        ref = nf4_matmul_ref(x.float(), packed, st.absmax, shape, 64, None, st.nested)
        assert y.shape == (2, rows, 96) and y.dtype == torch.float16
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@needs_triton
@needs_interp
@pytest.mark.parametrize("split_k", [2, 3])
def test_nf4_gemv_split_k(split_k, triton_mode):
    shape = (64, 1024)
    packed, st = quantize_nf4(_weights(shape, 6), 128, True)
    x = torch.randn(3, 1024)
    bias = torch.randn(64)
    y = nf4_gemv_fwd(x, packed, st.absmax, 64, 128, bias, st.nested, split_k=split_k)
    ref = nf4_matmul_ref(x, packed, st.absmax, shape, 128, bias, st.nested)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)


def test_nf4_matmul_torch_path_odd_k(torch_mode):
    shape = (8, 63)  # odd K: rows straddle bytes; the reference handles it
    packed, st = quantize_nf4(_weights(shape, 7), 64, False)
    x = torch.randn(4, 63)
    w = dequantize_nf4(packed, st)
    torch.testing.assert_close(nf4_matmul(x, packed, st.absmax, shape, 64), x @ w.T)


# ---------------------------------------------------------------------------------------------------------------
# Linear4bit and state dicts
# ---------------------------------------------------------------------------------------------------------------


def _bnb_linear4bit(linear: nn.Linear, compress: bool):
    import bitsandbytes as bnb

    m = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compress_statistics=compress,
        quant_type="nf4",
        compute_dtype=torch.float32,
    )
    m.weight = bnb.nn.Params4bit(
        linear.weight.data.clone(), requires_grad=False, compress_statistics=compress, quant_type="nf4"
    )
    if linear.bias is not None:
        m.bias = nn.Parameter(linear.bias.data.clone())
    return m.to("cpu")  # bnb quantizes on the move


def _tiny_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 96, bias=False), nn.GELU(), nn.Linear(96, 32))


@needs_bnb
@pytest.mark.parametrize("compress", [False, True])
def test_state_dict_matches_bitsandbytes(compress, torch_mode):
    """Same weights quantized by bnb's Linear4bit and by ours give the same state dict, key for key, bit for bit."""
    model = _tiny_mlp()
    bnb_model = _tiny_mlp()
    for i in (0, 2, 4):
        bnb_model[i] = _bnb_linear4bit(model[i], compress)
    quantize_model_(model, skip_modules=(), compress_statistics=compress)
    assert all(isinstance(model[i], Linear4bit) for i in (0, 2, 4))
    ours, theirs = model.state_dict(), bnb_model.state_dict()
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        if k.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[k].tolist())) == json.loads(bytes(v.tolist())), k
        else:
            assert ours[k].dtype == v.dtype and torch.equal(ours[k], v), k


@needs_bnb
def test_load_bnb_checkpoint_without_bnb_code(torch_mode):
    """A state dict written by bitsandbytes loads into a plain model; outputs equal bnb's dequantized weights'."""
    src = _tiny_mlp(1)
    for i in (0, 2, 4):
        src[i] = _bnb_linear4bit(src[i], True)
    sd = src.state_dict()
    model = _tiny_mlp(2)  # different random weights, plain nn.Linear
    result = load_bnb_4bit_state_dict_(model, sd)
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(5, 64)
    h = x
    for i, layer in enumerate(src):
        if i % 2 == 0:  # Linear(96, 32) has blocks straddling rows: bnb's pure-torch reference is the oracle
            w = _bnb_dequant_reference(layer.weight.data, layer.weight.quant_state)
            h = nn.functional.linear(h, w, layer.bias)
        else:
            h = layer(h)
    torch.testing.assert_close(model(x), h, rtol=1e-6, atol=1e-6)


def test_linear4bit_state_dict_round_trip(torch_mode):
    model = quantize_model_(_tiny_mlp(3), skip_modules=())
    x = torch.randn(7, 64)
    y = model(x)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    sd = torch.load(buffer, weights_only=True)
    fresh = _tiny_mlp(4)
    load_bnb_4bit_state_dict_(fresh, sd)
    assert torch.equal(fresh(x), y)
    # and into an already-quantized model (plain load_state_dict)
    other = quantize_model_(_tiny_mlp(5), skip_modules=())
    other.load_state_dict(sd)
    assert torch.equal(other(x), y)
    # safetensors (what transformers writes) takes the dict as is
    from safetensors.torch import load, save

    again = _tiny_mlp(6)
    load_bnb_4bit_state_dict_(again, load(save({k: v.contiguous() for k, v in sd.items()})))
    assert torch.equal(again(x), y)


def test_linear4bit_forward_and_grads(torch_mode):
    linear = nn.Linear(64, 48)
    q = Linear4bit.from_linear(linear, blocksize=64, compress_statistics=True)
    x = torch.randn(6, 64, requires_grad=True)
    w = q.dequantize(torch.float32)
    torch.testing.assert_close(q(x), nn.functional.linear(x, w, linear.bias))
    torch.testing.assert_close(w, linear.weight, atol=0.2 * linear.weight.abs().max().item(), rtol=0)
    q(x).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(6, -1))
    assert [n for n, p in q.named_parameters()] == ["bias"]  # the 4-bit weight is a buffer: it never trains
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (64 * 48 // 2, 1)
    # compute_dtype and input dtype
    q16 = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    assert q16(torch.randn(2, 64)).dtype == torch.float32


@needs_triton
@needs_interp
def test_linear4bit_triton_matches_torch():
    linear = nn.Linear(128, 64)
    q = Linear4bit.from_linear(linear)
    x = torch.randn(20, 128)
    previous = set_kernels("torch")
    try:
        ref = q(x)
        set_kernels("triton")
        out = q(x)
    finally:
        set_kernels(previous)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def test_quantize_model_tiny_llama(torch_mode):
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 11))
    with torch.no_grad():
        logits_fp = model(ids).logits
    quantize_model_(model)
    names = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert len(names) == 2 * 7 and "lm_head" not in names  # q,k,v,o,gate,up,down per layer; lm_head skipped
    with torch.no_grad():
        logits_q = model(ids).logits
    # the same model with the dequantized weights swapped back into plain linears
    for name in names:
        q = model.get_submodule(name)
        lin = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None)
        lin.weight.data = q.dequantize(torch.float32)
        if q.bias is not None:
            lin.bias.data = q.bias.data
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, lin)
    with torch.no_grad():
        logits_deq = model(ids).logits
    torch.testing.assert_close(logits_q, logits_deq, rtol=1e-5, atol=1e-5)
    assert (logits_q - logits_fp).abs().max() < 0.25 * logits_fp.abs().max()  # 4-bit is close, not equal


def test_skip_patterns():
    model = nn.ModuleDict(
        {
            "vision_tower": nn.Sequential(nn.Linear(64, 64)),
            "mm_projector": nn.Linear(64, 64),
            "language_model": nn.ModuleDict({"q_proj": nn.Linear(64, 64), "lm_head": nn.Linear(64, 64)}),
        }
    )
    quantize_model_(model)
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if n.count(".") <= 1 and n}
    assert kinds["vision_tower.0"] == "Linear" and kinds["mm_projector"] == "Linear"
    assert kinds["language_model.q_proj"] == "Linear4bit" and kinds["language_model.lm_head"] == "Linear"


def test_qlora_trains_adapters_only(torch_mode):
    from peft import LoraConfig, get_peft_model

    model = quantize_model_(_tiny_llama())
    config = lora_config_for_4bit(LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*Unsupported layer.*")
        peft_model = get_peft_model(model, config)
    layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer.get_base_layer(), Linear4bit)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    packed_before = layer.get_base_layer().weight.clone()
    ids = torch.randint(0, 128, (2, 9))
    opt = torch.optim.SGD(list(trainable.values()), lr=0.5)
    peft_model.train()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for n, p in trainable.items() if "lora_B" in n)
        assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)
        opt.step()
        losses.append(loss.item())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_A" in n)
    assert losses[-1] < losses[0]
    assert torch.equal(layer.get_base_layer().weight, packed_before)  # the 4-bit weight is untouched
    # merging folds the adapter into a requantized weight: outputs stay close
    peft_model.eval()
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
        layer.merge()
        layer.unmerge()
        after = peft_model(input_ids=ids).logits
    assert (after - before).abs().max() < 0.1 * before.abs().max()


@needs_bnb
def test_quantize_model_8bit_uses_bitsandbytes():
    import bitsandbytes as bnb

    model = quantize_model_8bit_(_tiny_mlp(), skip_modules=("4",))
    assert isinstance(model[0], bnb.nn.Linear8bitLt) and isinstance(model[2], bnb.nn.Linear8bitLt)
    assert type(model[4]) is nn.Linear


def test_quantize_model_8bit_without_bitsandbytes(monkeypatch):
    import fastllava.quantization as quantization

    monkeypatch.setattr(quantization, "HAS_BITSANDBYTES", False)
    with pytest.raises(ImportError, match="pip install bitsandbytes"):
        quantization.quantize_model_8bit_(_tiny_mlp())


# ---------------------------------------------------------------------------------------------------------------
# CUDA GEMV (GPU only; on CPU the shim falls back to the same result)
# ---------------------------------------------------------------------------------------------------------------


def test_cuda_gemv_shim_falls_back_on_cpu(torch_mode):
    from fastllava.csrc.nf4 import cuda_gemv_status, nf4_gemv

    packed, st = quantize_nf4(_weights((32, 64), 10), 64, True)
    x = torch.randn(2, 64)
    expected = nf4_matmul_ref(x, packed, st.absmax, (32, 64), 64, None, st.nested)
    assert torch.equal(nf4_gemv(x, packed, st.absmax, (32, 64), 64, None, st.nested), expected)
    if not torch.cuda.is_available():
        assert cuda_gemv_status() != "ok"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape,blocksize", [((4096, 4096), 64), ((1000, 2048), 128), ((96, 192), 64)])
def test_cuda_gemv_matches_reference(shape, blocksize, rows, compress, dtype):
    from fastllava.csrc.nf4 import cuda_gemv_available, cuda_gemv_status, nf4_gemv

    assert cuda_gemv_available(), cuda_gemv_status()
    N, K = shape
    packed, st = quantize_nf4(_weights(shape, 8).cuda(), blocksize, compress)
    x = torch.randn(rows, K, device="cuda", dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype)
    out = nf4_gemv(x, packed, st.absmax, shape, blocksize, bias, st.nested)
    ref = nf4_matmul_ref(x.float(), packed, st.absmax, shape, blocksize, bias.float(), st.nested)
    assert out.dtype == dtype and out.shape == (rows, N)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item() ** 0.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 16, 100])
def test_triton_nf4_matmul_cuda(rows, dtype):
    shape = (1024, 2048)
    packed, st = quantize_nf4(_weights(shape, 9).cuda(), 64, True)
    x = torch.randn(rows, 2048, device="cuda", dtype=dtype, requires_grad=True)
    y = nf4_matmul(x, packed, st.absmax, shape, 64, None, st.nested)
    w = dequantize_nf4(packed, st, dtype)
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ w.T
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=5e-2)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=2e-2, atol=5e-2)
