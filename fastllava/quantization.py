"""4-bit (NF4 / FP4) and 8-bit weight quantization, in bitsandbytes' own format, applied from outside the model.

    from fastllava.quantization import quantize_model_, load_bnb_4bit_state_dict_
    quantize_model_(model)                          # every nn.Linear but vision tower, projector, lm_head -> NF4
    load_bnb_4bit_state_dict_(model, state_dict)    # a transformers bnb-4bit checkpoint, bitsandbytes not needed

Format (bitsandbytes >= 0.43, what transformers writes for ``load_in_4bit`` models): per linear,

    <name>.weight                                 uint8 [out*in/2, 1], two codes a byte, high nibble first
    <name>.weight.absmax                          fp32 [n_blocks]  (uint8 codes when double-quantized)
    <name>.weight.quant_map                       fp32 [16]        the NF4 / FP4 codebook
    <name>.weight.nested_absmax                   fp32 [ceil(n_blocks/256)]   } double quantization only
    <name>.weight.nested_quant_map                fp32 [256]                  } (compress_statistics=True)
    <name>.weight.quant_state.bitsandbytes__nf4   uint8 JSON: quant_type, blocksize, dtype, shape,
                                                  nested_blocksize, nested_dtype, nested_offset

`quantize_nf4` reproduces bitsandbytes' CPU quantizer bit for bit (packed bytes, absmax, nested absmax and
offset; checked against bitsandbytes 0.50.2), and `dequantize_nf4` reproduces its dequantization bit for bit in
fp32. `Linear4bit` keeps the packed weight in buffers, writes/reads exactly these state-dict keys and runs
``x @ W.T`` through the fused NF4 kernels (`fastllava.kernels.nf4_matmul`, and the CUDA GEMV of
`fastllava.csrc.nf4` for decode). The weight is frozen; gradients flow to the input, so QLoRA adapters
(`peft`, see `lora_config_for_4bit`) train on top of it.
"""

from __future__ import annotations

import fnmatch
import functools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from fastllava.csrc.nf4 import CUDA_GEMV_MAX_ROWS, nf4_gemv
from fastllava.kernels.nf4_dequantize import NestedAbsmax, codebook, nf4_dequantize
from fastllava.kernels.nf4_matmul import nf4_matmul
from fastllava.optional import HAS_BITSANDBYTES

# LLaVA quantizes the language model only (llava/model/builder.py: llm_int8_skip_modules=["mm_projector"]; the
# CLIP tower is loaded separately in fp16): keep the vision tower, the projector and lm_head in full precision.
DEFAULT_SKIP_MODULES = ("vision_tower", "vision_model", "mm_projector", "multi_modal_projector", "lm_head")
NESTED_BLOCKSIZE = 256  # bnb quantizes the absmax in blocks of 256 with its 8-bit dynamic map
_VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_LUT_SIZE = 65536  # bitsandbytes' CPU 8-bit quantizer maps [-1, 1] onto 65536 bins, each bin to its nearest code


# ---------------------------------------------------------------------------------------------------------------
# format: quantize / dequantize / (un)pack, bit-compatible with bitsandbytes
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (``create_dynamic_map(True, 7, 8)``), fp32 [256], sorted."""
    data: list[float] = []
    max_exponent_bits, non_sign_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    # bnb's build_quantize_lut: bin i holds -1 + 2i/65535; its code is the first whose upper midpoint is >= it.
    code = dynamic_map()
    midpoints = 0.5 * (code[:-1] + code[1:])
    values = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / float(_LUT_SIZE - 1)
    return torch.searchsorted(midpoints, values, right=False).to(torch.uint8)


@dataclass
class QuantState:
    """What undoes a 4-bit quantization (bnb's ``QuantState``): per-block absmax, codebook, shape, dtype."""

    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 [n_blocks] codes when `nested` is set
    shape: torch.Size
    blocksize: int = 64
    quant_type: str = "nf4"
    dtype: torch.dtype = torch.float32  # dtype of the weight before quantization (bnb's `dtype`)
    code: torch.Tensor = field(default=None)  # fp32 [16] quant_map; the standard codebook when None
    nested: NestedAbsmax | None = None

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = codebook(self.quant_type, self.absmax.device).clone()

    def to(self, device: torch.device | str) -> QuantState:
        nested = self.nested.to(device) if self.nested is not None else None
        return QuantState(
            self.absmax.to(device),
            self.shape,
            self.blocksize,
            self.quant_type,
            self.dtype,
            self.code.to(device),
            nested,
        )

    def as_dict(self) -> dict[str, torch.Tensor]:
        """bnb's ``QuantState.as_dict(packed=True)``: tensors plus one uint8 tensor of JSON for the rest."""
        meta: dict = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.nested is not None:
            tensors["nested_absmax"] = self.nested.absmax
            tensors["nested_quant_map"] = self.nested.code.clone()
            meta.update(
                nested_blocksize=self.nested.blocksize,
                nested_dtype="float32",
                nested_offset=self.nested.offset.item(),
            )
        packed = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        return {**tensors, f"quant_state.bitsandbytes__{self.quant_type}": packed}

    @classmethod
    def from_dict(cls, parts: dict[str, torch.Tensor]) -> QuantState:
        """Inverse of `as_dict` (keys without the ``<name>.weight.`` prefix)."""
        meta_keys = [k for k in parts if k.startswith("quant_state.bitsandbytes__")]
        if len(meta_keys) != 1:
            raise ValueError(f"expected exactly one 'quant_state.bitsandbytes__<type>' entry, found {meta_keys}")
        meta = json.loads(bytes(parts[meta_keys[0]].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        nested = None
        if "nested_absmax" in parts:
            nested = NestedAbsmax(
                absmax=parts["nested_absmax"].float(),
                code=parts["nested_quant_map"].float(),
                offset=torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=parts["absmax"].device),
                blocksize=int(meta["nested_blocksize"]),
            )
        return cls(
            absmax=parts["absmax"],
            shape=torch.Size(meta["shape"]),
            blocksize=int(meta["blocksize"]),
            quant_type=meta["quant_type"],
            dtype=getattr(torch, meta["dtype"]),
            code=parts["quant_map"].float(),
            nested=nested,
        )


def _quantize_blockwise_8bit(x: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """bnb's CPU ``quantize_blockwise`` with the dynamic map: (uint8 codes, fp32 absmax per block)."""
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x.float().reshape(-1), (0, n_blocks * blocksize - n)).reshape(n_blocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    normed = torch.clamp(blocks * (1.0 / absmax)[:, None], -1.0, 1.0)
    bins = (((normed + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).to(torch.int64)  # same op order as bnb (no FMA)
    q = _dynamic_lut().to(x.device)[bins]
    q = torch.where((absmax == 0)[:, None], torch.zeros_like(q), q)  # an all-zero block stores code 0
    return q.reshape(-1)[:n], absmax


def quantize_nf4(
    w: torch.Tensor, blocksize: int = 64, compress_statistics: bool = False, quant_type: str = "nf4"
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``w`` to bnb 4-bit: (packed uint8 ``[ceil(numel/2), 1]``, `QuantState`), identical to bnb's bytes.

    ``compress_statistics`` double-quantizes the absmax (8-bit dynamic map, blocks of 256, offset = mean).
    """
    if blocksize not in _VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {_VALID_BLOCKSIZES}, got {blocksize}")
    if w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"4-bit quantization takes fp32/fp16/bf16 weights, got {w.dtype}")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    rem = n % blocksize
    full = flat[: n - rem].reshape(-1, blocksize)
    absmax = full.abs().amax(dim=1)
    # bnb: multiply by the reciprocal for whole blocks, divide for the tail block; clamp the scale away from 0
    scaled = torch.clamp(full * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)
    if rem:
        tail_max = flat[n - rem :].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, torch.clamp(flat[n - rem :] / tail_max, -1, 1)])
    if n % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    code = codebook(quant_type, w.device)
    order = torch.argsort(code)  # identity for nf4; fp4 codes are not sorted by value
    midpoints = (code[order[:-1]] + code[order[1:]]) / 2
    q = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    nested = None
    if compress_statistics:
        offset = absmax.mean()
        qabsmax, absmax2 = _quantize_blockwise_8bit(absmax - offset)
        nested = NestedAbsmax(absmax2, dynamic_map().to(w.device), offset, NESTED_BLOCKSIZE)
        absmax = qabsmax
    return packed, QuantState(absmax, w.shape, blocksize, quant_type, w.dtype, code.clone(), nested)


def dequantize_nf4(packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Undo `quantize_nf4` (or bnb's ``quantize_4bit``); bit-identical to bnb's ``dequantize_4bit`` in fp32."""
    return nf4_dequantize(
        packed, state.absmax, state.shape, state.blocksize, dtype or state.dtype, state.nested, state.quant_type
    )


def pack_bnb_state_dict(prefix: str, packed: torch.Tensor, state: QuantState) -> dict[str, torch.Tensor]:
    """State-dict entries of one bnb 4-bit weight, keyed under ``prefix`` (e.g. ``"layers.0.q_proj.weight"``)."""
    return {prefix: packed, **{f"{prefix}.{k}": v for k, v in state.as_dict().items()}}


def unpack_bnb_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> tuple[torch.Tensor, QuantState]:
    """(packed weight, `QuantState`) of the bnb 4-bit weight stored under ``prefix`` in ``state_dict``."""
    parts = {k[len(prefix) + 1 :]: v for k, v in state_dict.items() if k.startswith(prefix + ".")}
    return state_dict[prefix], QuantState.from_dict(parts)


# ---------------------------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------------------------

# bnb's suffixes under "<name>.weight." ; the buffers hold them as weight_<suffix> (buffer names cannot have dots)
_STATE_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


class Linear4bit(nn.Module):
    """A frozen 4-bit ``nn.Linear`` (bnb NF4/FP4 format); ``state_dict()`` keys match transformers' bnb-4bit files.

    ``y = x @ dequant(W).T + bias`` runs fused (`nf4_matmul`; the CUDA GEMV for <= 8 rows at inference), in
    ``compute_dtype`` (default: the input's dtype), and returns the input's dtype. Gradients reach ``x`` and
    ``bias``; the packed weight is a buffer and never trains.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        blocksize: int = 64,
        compress_statistics: bool = True,
        quant_type: str = "nf4",
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.quant_type, self.compute_dtype = blocksize, quant_type, compute_dtype
        self.weight_dtype = dtype or torch.float32  # the dtype bnb records as the weight's original dtype
        n = in_features * out_features
        n_blocks = -(-n // blocksize)
        self.register_buffer("weight", torch.zeros(((n + 1) // 2, 1), dtype=torch.uint8, device=device))
        absmax_dtype = torch.uint8 if compress_statistics else torch.float32
        self.register_buffer("weight_absmax", torch.zeros(n_blocks, dtype=absmax_dtype, device=device))
        self.register_buffer("weight_quant_map", codebook(quant_type, device or "cpu").clone())
        if compress_statistics:
            n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
            self.register_buffer("weight_nested_absmax", torch.zeros(n_nested, dtype=torch.float32, device=device))
            self.register_buffer("weight_nested_quant_map", dynamic_map().to(device))
            self.register_buffer("weight_nested_offset", torch.zeros((), dtype=torch.float32, device=device))
        self.nested_blocksize = NESTED_BLOCKSIZE
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device))
        else:
            self.register_parameter("bias", None)

    # --- the quantized weight ---

    @property
    def compress_statistics(self) -> bool:
        return hasattr(self, "weight_nested_absmax")

    @property
    def nested(self) -> NestedAbsmax | None:
        if not self.compress_statistics:
            return None
        return NestedAbsmax(
            self.weight_nested_absmax, self.weight_nested_quant_map, self.weight_nested_offset, self.nested_blocksize
        )

    @property
    def quant_state(self) -> QuantState:
        return QuantState(
            self.weight_absmax,
            (self.out_features, self.in_features),
            self.blocksize,
            self.quant_type,
            self.weight_dtype,
            self.weight_quant_map,
            self.nested,
        )

    def set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        """Install a packed weight and its state (shapes may differ from the current buffers)."""
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"quantized weight has shape {tuple(state.shape)}, module is {self.out_features}x{self.in_features}"
            )
        device = self.weight.device
        self.blocksize, self.quant_type, self.weight_dtype = state.blocksize, state.quant_type, state.dtype
        self.weight = packed.to(device=device, dtype=torch.uint8).reshape(-1, 1)
        self.weight_absmax = state.absmax.to(device)
        self.weight_quant_map = state.code.to(device=device, dtype=torch.float32)
        for name in ("weight_nested_absmax", "weight_nested_quant_map", "weight_nested_offset"):
            if hasattr(self, name):
                delattr(self, name)
        if state.nested is not None:
            self.register_buffer("weight_nested_absmax", state.nested.absmax.to(device=device, dtype=torch.float32))
            self.register_buffer("weight_nested_quant_map", state.nested.code.to(device=device, dtype=torch.float32))
            self.register_buffer("weight_nested_offset", state.nested.offset.to(device=device, dtype=torch.float32))
            self.nested_blocksize = state.nested.blocksize

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [out, in] weight in ``dtype`` (default: the dtype it was quantized from)."""
        return nf4_dequantize(
            self.weight,
            self.weight_absmax,
            (self.out_features, self.in_features),
            self.blocksize,
            dtype or self.weight_dtype,
            self.nested,
            self.quant_type,
        )

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        blocksize: int = 64,
        compress_statistics: bool = True,
        compute_dtype: torch.dtype | None = None,
        quant_type: str = "nf4",
    ) -> Linear4bit:
        """Quantize ``linear`` (on its device) into a new `Linear4bit`."""
        w = linear.weight.detach()
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            blocksize=blocksize,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            compute_dtype=compute_dtype,
            device=w.device,
            dtype=w.dtype,
        )
        module.set_quantized(*quantize_nf4(w, blocksize, compress_statistics, quant_type))
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return module

    # --- forward ---

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        x = x.to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        shape = (self.out_features, self.in_features)
        args = (self.weight, self.weight_absmax, shape, self.blocksize, bias, self.nested, self.quant_type)
        rows = x.numel() // max(1, self.in_features)
        if x.is_cuda and rows <= CUDA_GEMV_MAX_ROWS and not (torch.is_grad_enabled() and x.requires_grad):
            out = nf4_gemv(x, *args)  # decode: CUDA GEMV (falls back to the Triton GEMV)
        else:
            out = nf4_matmul(x, *args)
        return out.to(in_dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, compress_statistics={self.compress_statistics}"
        )

    # --- state dict in bnb's layout ---

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        weight = prefix + "weight"
        destination[weight] = self.weight if keep_vars else self.weight.detach()
        for key, value in self.quant_state.as_dict().items():
            destination[f"{weight}.{key}"] = value if keep_vars else value.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        weight = prefix + "weight"
        parts = {k[len(weight) + 1 :]: v for k, v in state_dict.items() if k.startswith(weight + ".")}
        if weight not in state_dict or not any(k.startswith("quant_state.") for k in parts):
            if weight in state_dict and state_dict[weight].is_floating_point():
                errors.append(f"{weight}: got an unquantized weight; quantize with Linear4bit.from_linear instead")
            missing_keys.extend(k for k in (weight, f"{weight}.absmax", f"{weight}.quant_state") if k not in state_dict)
        else:
            try:
                self.set_quantized(state_dict[weight], QuantState.from_dict(parts))
            except (ValueError, KeyError) as err:
                errors.append(f"{weight}: {err}")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            else:
                missing_keys.append(prefix + "bias")
        known = {weight, prefix + "bias"} | {f"{weight}.{k}" for k in _STATE_SUFFIXES}
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix) :] and key not in known:
                unexpected_keys.append(key)


# ---------------------------------------------------------------------------------------------------------------
# whole-model helpers (applied from outside: the model code never branches on quantization)
# ---------------------------------------------------------------------------------------------------------------


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    """Whether module ``name`` matches a pattern: a dotted component sequence (``"vision_tower"``,
    ``"model.mm_projector"``) anywhere in the name, or an fnmatch glob over the full name."""
    dotted = f".{name}."
    return any(f".{p}." in dotted or fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_model_(
    model: nn.Module,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_type: str = "nf4",
    compute_dtype: torch.dtype | None = None,
) -> nn.Module:
    """Swap every ``nn.Linear`` of ``model`` (in place) for a `Linear4bit`, except names matching ``skip_modules``."""
    skip = tuple(skip_modules)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    for name, linear in targets:
        _replace(model, name, Linear4bit.from_linear(linear, blocksize, compress_statistics, compute_dtype, quant_type))
    return model


def load_bnb_4bit_state_dict_(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True, compute_dtype: torch.dtype | None = None
):
    """Load a pre-quantized transformers/bitsandbytes 4-bit state dict into ``model`` (no bitsandbytes needed).

    Every ``nn.Linear`` whose ``<name>.weight.quant_state.bitsandbytes__*`` entry is present becomes a `Linear4bit`
    holding the packed weight as stored; everything else loads as usual. Returns ``load_state_dict``'s result.
    """
    suffix = ".weight.quant_state.bitsandbytes__"
    for key in [k for k in state_dict if suffix in k]:
        name = key[: key.index(suffix)]
        module = model.get_submodule(name)
        if isinstance(module, Linear4bit):
            continue
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name}: the checkpoint holds a 4-bit weight but the module is {type(module).__name__}")
        packed, state = unpack_bnb_state_dict(state_dict, f"{name}.weight")
        new = Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            blocksize=state.blocksize,
            compress_statistics=state.nested is not None,
            quant_type=state.quant_type,
            compute_dtype=compute_dtype,
            device=module.weight.device if module.weight.device.type != "meta" else "cpu",
            dtype=state.dtype,
        )
        _replace(model, name, new)
    return model.load_state_dict(state_dict, strict=strict)


def quantize_model_8bit_(
    model: nn.Module,
    skip_modules: Iterable[str] = DEFAULT_SKIP_MODULES,
    threshold: float = 6.0,
    has_fp16_weights: bool = False,
) -> nn.Module:
    """Swap every ``nn.Linear`` (except ``skip_modules``) for bitsandbytes' ``Linear8bitLt`` (LLM.int8()).

    The weights are quantized when the model moves to the GPU (bitsandbytes' own behaviour).
    """
    if not HAS_BITSANDBYTES:
        raise ImportError("8-bit quantization uses bitsandbytes' Linear8bitLt: pip install bitsandbytes")
    import bitsandbytes as bnb

    skip = tuple(skip_modules)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(n, skip)]
    for name, linear in targets:
        new = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            has_fp16_weights=has_fp16_weights,
            threshold=threshold,
            device=linear.weight.device,
        )
        new.weight = bnb.nn.Int8Params(
            linear.weight.detach().clone(), requires_grad=has_fp16_weights, has_fp16_weights=has_fp16_weights
        )
        if linear.bias is not None:
            new.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        _replace(model, name, new)
    return model


# ---------------------------------------------------------------------------------------------------------------
# QLoRA: peft LoRA on top of Linear4bit
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def lora_layer_class() -> type:
    """peft's LoRA ``Linear`` specialised for `Linear4bit` (merge = dequantize, add, requantize)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    class LoraLinear4bit(LoraLinear):
        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

        def _merge_delta(self, sign: float, adapter: str) -> None:
            base = self.get_base_layer()
            w = base.dequantize(torch.float32) + sign * self.get_delta_weight(adapter).float()
            base.set_quantized(
                *quantize_nf4(w.to(base.weight_dtype), base.blocksize, base.compress_statistics, base.quant_type)
            )
            if self.lora_bias[adapter]:
                with torch.no_grad():
                    base.bias.add_(sign * self.lora_B[adapter].bias)

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            for adapter in check_adapters_to_merge(self, adapter_names):
                if adapter in self.lora_A:
                    self._merge_delta(1.0, adapter)
                    self.merged_adapters.append(adapter)

        def unmerge(self) -> None:
            while self.merged_adapters:
                adapter = self.merged_adapters.pop()
                if adapter in self.lora_A:
                    self._merge_delta(-1.0, adapter)

    LoraLinear4bit.__qualname__ = "LoraLinear4bit"
    return LoraLinear4bit


def lora_config_for_4bit(config):
    """Register `Linear4bit` with a peft ``LoraConfig`` so ``get_peft_model`` wraps our 4-bit linears (QLoRA)."""
    config._register_custom_module({Linear4bit: lora_layer_class()})
    return config
