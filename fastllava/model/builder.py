"""``load_pretrained_model``: LLaVA's loader, for llava-hf and original LLaVA checkpoints, fully offline.

    tokenizer, model, image_processor, context_len = load_pretrained_model(
        "path/to/llava-v1.5-7b", model_base=None, device="cuda", load_4bit=False)

What is loaded, by what the folder holds:
  * ``config.json`` with ``model_type`` llava / llava_next: a llava-hf checkpoint (either key layout);
  * ``model_type`` llava_llama / llava_mistral / ...: an original LLaVA checkpoint; its vision tower comes from
    ``mm_vision_tower`` (a local folder); with ``model_base``, either a projector-only checkpoint
    (``mm_projector.safetensors``) or a LoRA checkpoint (``adapter_config.json`` + ``non_lora_trainables``),
    merged through peft.
Weights are safetensors; pickled ``.bin`` files load only with ``allow_pickle=True`` (then
``weights_only=True``). Nothing reaches a model hub: every path must be a local folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fastllava.config import LlavaConfig, VisionConfig, load_json
from fastllava.distributed.loading import RankShard
from fastllava.image_processing import ImageProcessor
from fastllava.model import checkpoint as ckpt
from fastllava.model import weights
from fastllava.model.llava import LlavaModel

log = logging.getLogger(__name__)

HF_TYPES = weights.HF_MODEL_TYPES  # llava-hf model types; any other is an original-LLaVA checkpoint


def _local_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ckpt.CheckpointError(
            f"{what} {str(path)!r} is not a local folder; fastllava never downloads from a model hub — "
            "download the checkpoint first (e.g. `huggingface-cli download ... --local-dir DIR`) and pass DIR"
        )
    return p


def load_tokenizer(path: str | os.PathLike):
    """The checkpoint's tokenizer, from the local folder only, never running a repository's code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)


def _default_dtype(device: str, dtype: torch.dtype | str | None) -> torch.dtype:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype is not None:
        return dtype
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def read_state(
    path: str | os.PathLike, allow_pickle: bool | None, *layouts, shard: RankShard | None = None, config=None
) -> dict[str, torch.Tensor]:
    """Every weight of the checkpoint folder ``path``, under our names (read in the first of ``layouts`` that
    knows each key, see ``fastllava.model.weights``). With a tensor-parallel ``shard`` (and the ``config``),
    only that rank's slices are read."""
    if shard is not None:
        return shard.read(path, allow_pickle, config, *layouts)
    files = ckpt.weight_files(path, allow_pickle)
    return weights.remap(ckpt.read_weights(files, allow_pickle), *layouts)


BNB_SUFFIX = ".weight.quant_state.bitsandbytes__"


def build_model(
    config: LlavaConfig, state: dict[str, torch.Tensor], device, dtype, shard: RankShard | None = None
) -> LlavaModel:
    """Instantiate on the meta device and assign the weights (no random init of a 7B model); with a
    tensor-parallel ``shard``, that rank's modules (``state`` then holds its slices).

    A pre-quantized bitsandbytes 4-bit checkpoint (``*.weight.quant_state.bitsandbytes__nf4`` entries) gets
    our ``Linear4bit`` at those linears, holding the packed weights as stored: no bitsandbytes needed.
    """
    with torch.device("meta"):
        model = LlavaModel(config)
    if shard is not None:
        shard.apply(model, config)
    quantized = sorted({k[: k.index(BNB_SUFFIX)] for k in state if BNB_SUFFIX in k})
    if quantized and shard is not None:
        raise ckpt.CheckpointError(
            "a pre-quantized 4-bit checkpoint cannot be split for tensor parallelism (its blocks span the "
            "shards' rows): load the full-precision checkpoint with load_4bit=True, which quantizes each shard"
        )
    if quantized:
        from fastllava.quantization import Linear4bit, load_bnb_4bit_state_dict_

        model.to_empty(device="cpu")
        load_bnb_4bit_state_dict_(model, state, strict=False, compute_dtype=dtype)
        state = {k: v for k, v in state.items() if not any(k.startswith(q + ".") for q in quantized)}
        four_bit = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    else:
        four_bit = set()
    expected = {k: v for k, v in model.state_dict().items() if not any(k.startswith(q + ".") for q in four_bit)}
    tied = config.text.tie_word_embeddings
    if tied:
        state.pop("language_model.lm_head.weight", None)
    missing = [k for k in expected if k not in state and not (tied and k == "language_model.lm_head.weight")]
    # post_layernorm is never used by LLaVA; checkpoints that drop it are fine
    missing_needed = [k for k in missing if "post_layernorm" not in k]
    if missing_needed:
        shown = ", ".join(missing_needed[:8]) + (" ..." if len(missing_needed) > 8 else "")
        raise ckpt.CheckpointError(f"checkpoint is missing {len(missing_needed)} weight(s): {shown}")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        log.warning("ignoring %d unexpected weight(s), e.g. %s", len(unexpected), unexpected[:4])
    for k in missing:
        if k != "language_model.lm_head.weight":
            state[k] = torch.ones(expected[k].shape) if k.endswith("weight") else torch.zeros(expected[k].shape)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items() if k in expected}
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.language_model.lm_head.weight = model.language_model.embed_tokens.weight
    # 4-bit modules keep their packed weights and fp32 statistics; only their device changes
    return model.to(device)


def _load_hf(path: Path, allow_pickle, shard: RankShard | None = None):
    raw = load_json(path / "config.json")
    config = LlavaConfig.from_hf_dict(raw)
    state = read_state(path, allow_pickle, *weights.layouts_for(raw), shard=shard, config=config)
    processor = ImageProcessor.from_pretrained(path, convention="hf")
    return config, state, processor, path


def _vision_tower(cfg: dict, model_path: Path) -> tuple[Path, dict]:
    name = cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not name:
        raise ckpt.CheckpointError(f"{model_path}/config.json names no mm_vision_tower")
    for candidate in (Path(name).expanduser(), model_path / name, model_path / "vision_tower"):
        if candidate.is_dir():
            return candidate, load_json(candidate / "config.json")
    raise ckpt.CheckpointError(
        f"vision tower {name!r} (mm_vision_tower) is not a local folder; download it and point "
        "mm_vision_tower in config.json at it"
    )


def _load_llava(model_path: Path, model_base: Path | None, allow_pickle, shard: RankShard | None = None):
    cfg = load_json(model_path / "config.json")
    tower_dir, tower_cfg = _vision_tower(cfg, model_path)
    config = LlavaConfig.from_llava_dict(cfg, VisionConfig.from_dict(tower_cfg))
    is_lora = (model_path / "adapter_config.json").is_file()
    if is_lora and shard is not None:
        raise ckpt.CheckpointError("tensor parallelism needs a merged checkpoint: merge the LoRA run first "
                                   "(python -m train.merge_lora), then serve the merged folder")  # fmt: skip
    if model_base is None:
        state = read_state(model_path, allow_pickle, weights.LLAVA, shard=shard, config=config)
        tokenizer_dir = model_path
    else:
        state = read_state(model_base, allow_pickle, weights.LLAVA, shard=shard, config=config)
        extra_stem = "non_lora_trainables" if is_lora else "mm_projector"
        extra = ckpt.read_optional(model_path, extra_stem, allow_pickle)
        if extra is None:
            raise ckpt.CheckpointError(f"{model_path} has no {extra_stem}.safetensors (or .bin) to put on the base")
        # LoRA runs save keys as base_model.model.model.X, projector-only runs as model.X
        state.update(weights.remap(extra, weights.LORA, weights.LLAVA))
        tokenizer_dir = model_path if (model_path / "tokenizer_config.json").is_file() else model_base
    if not any(k.startswith("vision_tower.") for k in state):
        state.update(read_state(tower_dir, allow_pickle, weights.VISION, shard=shard, config=config))
    processor = ImageProcessor.from_pretrained(tower_dir, convention="llava")
    return config, state, processor, tokenizer_dir, (model_path if is_lora else None)


def merge_lora_layers(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every peft LoRA layer under ``module`` into its base linear (peft's ``merge``) and put the base
    linear back in its place. In place; returns ``module``."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, child, layer.get_base_layer())
    return module


def merge_lora(model: LlavaModel, adapter_dir: Path) -> LlavaModel:
    """Merge a peft LoRA adapter (original LLaVA key names) into the language model through peft."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    cfg = load_json(adapter_dir / "adapter_config.json")
    adapter = ckpt.read_optional(adapter_dir, "adapter_model", None)
    if adapter is None:
        raise ckpt.CheckpointError(f"{adapter_dir} has no adapter_model.safetensors")
    renamed = weights.remap(adapter, weights.LORA)
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in renamed})
    lora_cfg = LoraConfig(
        r=cfg["r"],
        lora_alpha=cfg["lora_alpha"],
        target_modules=targets,
        use_rslora=cfg.get("use_rslora", False),
        lora_dropout=0.0,
    )
    inject_adapter_in_model(lora_cfg, model.language_model)
    set_peft_model_state_dict(model.language_model, {k.removeprefix("language_model."): v for k, v in renamed.items()})
    merge_lora_layers(model.language_model)
    return model


# what 4-/8-bit loading and QLoRA leave in full precision, as LLaVA does: only the language model's linears
QUANTIZE_SKIP = ("vision_tower", "multi_modal_projector", "lm_head")


def quantize_language_model(model: LlavaModel, bits: int) -> LlavaModel:
    """The language model's linears in NF4 (``bits=4``) or bitsandbytes int8 (``bits=8``), frozen; the vision
    tower, projector and LM head stay as they are (``QUANTIZE_SKIP``). In place."""
    from fastllava.quantization import quantize_model_, quantize_model_8bit_

    if bits == 4:
        quantize_model_(model, skip_modules=QUANTIZE_SKIP)
    elif bits == 8:
        quantize_model_8bit_(model, skip_modules=QUANTIZE_SKIP)
    else:
        raise ValueError(f"bits must be 4 or 8, not {bits!r}")
    return model


def load_rank_model(shard: RankShard | None, load: dict):
    """The model alone (no tokenizer), whole (``shard=None``) or one tensor-parallel rank's part of it;
    ``load``: ``load_pretrained_model``'s loading arguments (``model_path``, ``model_base``, ``device``,
    ``dtype``, ``load_4bit``, ``load_8bit``, ``attn_implementation``, ``allow_pickle``)."""
    model, _, _ = _load_model(shard=shard, **load)
    return model


def _load_model(
    model_path, model_base=None, device="cpu", dtype=None, load_4bit=False, load_8bit=False,
    attn_implementation=None, allow_pickle=None, shard: RankShard | None = None,
):  # fmt: skip
    path = _local_dir(model_path, "model_path")
    base = _local_dir(model_base, "model_base") if model_base is not None else None
    if not (path / "config.json").is_file():
        raise ckpt.CheckpointError(f"{path} has no config.json")
    if shard is not None and load_8bit:
        raise ValueError("load_8bit with tensor parallelism is not supported: use load_4bit (NF4) or neither")
    model_type = load_json(path / "config.json").get("model_type", "")
    adapter_dir = None
    if model_type in HF_TYPES:
        config, state, processor, tokenizer_dir = _load_hf(path, allow_pickle, shard)
    else:
        config, state, processor, tokenizer_dir, adapter_dir = _load_llava(path, base, allow_pickle, shard)
    model = build_model(config, state, device, _default_dtype(device, dtype), shard)
    if adapter_dir is not None:
        model = merge_lora(model, adapter_dir)
    if load_4bit or load_8bit:  # a shard quantizes its own slices: its 4-bit blocks never straddle two ranks
        quantize_language_model(model, 4 if load_4bit else 8)
    model.set_attn_implementation(attn_implementation)
    model.image_processor = processor  # what LLaVA code reads as model.get_vision_tower().image_processor
    model.eval()
    return model, processor, tokenizer_dir


def load_pretrained_model(
    model_path: str | os.PathLike,
    model_base: str | os.PathLike | None = None,
    model_name: str | None = None,
    load_8bit: bool = False,
    load_4bit: bool = False,
    device_map: str | None = "auto",
    device: str = "cuda",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    allow_pickle: bool | None = None,
    tensor_parallel_size: int = 1,
    **kwargs,
):
    """Load a LLaVA checkpoint: returns ``(tokenizer, model, image_processor, context_len)``.

    ``device_map`` is accepted for LLaVA compatibility; the model is placed whole on ``device``.
    ``load_4bit`` quantizes the language model's linears to NF4 (not the vision tower or projector, as
    LLaVA does); ``load_8bit`` uses bitsandbytes' int8 linears.
    ``tensor_parallel_size=N > 1`` shards the language model over N ranks (``fastllava.distributed``): this
    process is rank 0 (on ``device``; CUDA ranks take the next GPUs) and starts the other N-1; the model
    returned is rank 0's ``TensorParallelModel``, for the engine (``LLMEngine``), and ``model.close()``
    stops the other ranks.
    """
    if kwargs.get("use_flash_attn"):
        attn_implementation = attn_implementation or "flash"
    if kwargs.get("torch_dtype") is not None and dtype is None:
        dtype = kwargs["torch_dtype"]
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available; pass device='cpu'")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
    load = dict(
        model_path=str(model_path), model_base=None if model_base is None else str(model_base), device=str(device),
        dtype=str(dtype).removeprefix("torch.") if dtype is not None else None, load_4bit=load_4bit,
        load_8bit=load_8bit, attn_implementation=attn_implementation, allow_pickle=allow_pickle,
    )  # fmt: skip
    if tensor_parallel_size == 1:
        model, processor, tokenizer_dir = _load_model(**load)
    else:
        from fastllava.distributed import launch

        rank0 = {}

        def load_rank0(shard: RankShard):
            rank0["model"], rank0["processor"], rank0["tokenizer_dir"] = _load_model(shard=shard, **load)
            return rank0["model"]

        model = launch(tensor_parallel_size, load, load_rank0)
        processor, tokenizer_dir = rank0["processor"], rank0["tokenizer_dir"]
        model.image_processor = processor
    context_len = model.config.text.max_position_embeddings
    return load_tokenizer(tokenizer_dir), model, processor, context_len
