"""Building the model to train, from LLaVA's arguments, and writing what a run produces.

Starting points (``--model_name_or_path``):
  * a llava-hf or original LLaVA checkpoint (stage 2 from a stage-1 output, or further fine-tuning);
  * a plain language model folder (Llama / Mistral / Qwen2 ``config.json`` + safetensors) with
    ``--vision_tower`` (a CLIP / SigLIP vision folder): as in LLaVA, ``<image>`` is added to the tokenizer
    (new embedding rows = the mean of the old ones) and the projector is freshly initialised
    (or read from ``--pretrain_mm_mlp_adapter``).

Then, applied from outside the model: freeze flags, LoRA (peft, on the language model's linears), QLoRA
(``fastllava.quantization`` NF4 base), gradient checkpointing, the attention backend.
Outputs: a llava-hf checkpoint (tokenizer and processor files included), ``mm_projector.safetensors`` (stage
1, LLaVA's key names), and for LoRA runs ``adapter/`` in peft's format with ``non_lora_trainables``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fastllava.config import LlavaConfig, TextConfig, VisionConfig, load_json
from fastllava.constants import DEFAULT_IMAGE_TOKEN
from fastllava.image_processing import ImageProcessor
from fastllava.model import builder, weights
from fastllava.model import checkpoint as ckpt
from fastllava.model.llava import LlavaModel

log = logging.getLogger(__name__)

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------ building


def _ensure_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token when missing (LLaVA-hf needs it in the vocabulary)."""
    ids = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if ids is None or ids == tokenizer.unk_token_id:
        tokenizer.add_special_tokens({"additional_special_tokens": [DEFAULT_IMAGE_TOKEN]})
        ids = tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN)
    if tokenizer.pad_token is None:  # LLaVA v1: pad = unk
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return int(ids)


def _resize_vocab(state: dict[str, torch.Tensor], new_size: int) -> None:
    """Grow the embedding and LM head to ``new_size`` rows, new rows = mean of the old (LLaVA's
    ``smart_tokenizer_and_embedding_resize``). In place."""
    for key in ("language_model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in state and state[key].shape[0] < new_size:
            w = state[key]
            extra = w.float().mean(0, keepdim=True).expand(new_size - w.shape[0], -1).to(w.dtype)
            state[key] = torch.cat([w, extra])


def build_from_lm_and_tower(model_args, train_args) -> tuple[object, LlavaModel, ImageProcessor]:
    """A LLaVA from a plain LM folder and a vision tower folder (projector freshly initialised)."""
    lm_dir, tower_dir = Path(model_args.model_name_or_path), Path(model_args.vision_tower)
    tokenizer = builder.load_tokenizer(lm_dir)
    tokenizer.model_max_length = train_args.model_max_length
    tokenizer.padding_side = "right"
    image_id = _ensure_image_token(tokenizer)
    text = TextConfig.from_dict(load_json(lm_dir / "config.json"))
    vision = VisionConfig.from_dict(load_json(tower_dir / "config.json"))
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    if text.pad_token_id is None:
        text.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision=vision,
        text=text,
        projector_type=model_args.mm_projector_type,
        vision_feature_layer=model_args.mm_vision_select_layer,
        vision_feature_select_strategy="full" if model_args.mm_vision_select_feature == "cls_patch" else "default",
        image_token_index=image_id,
        image_aspect_ratio=model_args_image_aspect(model_args),
        mm_patch_merge_type=model_args.mm_patch_merge_type,
        mm_use_im_start_end=model_args.mm_use_im_start_end,
    )
    torch.manual_seed(train_args.seed)  # the projector's init (nn.Linear default, as LLaVA's)
    model = LlavaModel(config)
    state = builder.read_state(lm_dir, None, weights.LLAVA)  # a plain LM folder: LLaVA's LM key names
    state.update(builder.read_state(tower_dir, None, weights.VISION))
    _resize_vocab(state, config.text.vocab_size)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("multi_modal_projector.") and k != "image_newline"]
    missing = [k for k in missing if not (config.text.tie_word_embeddings and k.endswith("lm_head.weight"))]
    if missing:
        raise ckpt.CheckpointError(f"{len(missing)} weight(s) missing from the LM / tower folders: {missing[:6]}")
    if unexpected:
        log.warning("ignoring %d unexpected weight(s): %s", len(unexpected), unexpected[:4])
    processor = ImageProcessor.from_pretrained(tower_dir, convention="hf")
    return tokenizer, model, processor


def model_args_image_aspect(model_args) -> str:
    return getattr(model_args, "image_aspect_ratio", "square") or "square"


def build_model(model_args, data_args, train_args) -> tuple[object, LlavaModel, ImageProcessor]:
    """(tokenizer, fp32 model on CPU, image processor) for ``--model_name_or_path`` (see module docstring)."""
    path = Path(model_args.model_name_or_path)
    model_args.image_aspect_ratio = data_args.image_aspect_ratio
    mtype = load_json(path / "config.json").get("model_type", "")
    if mtype in weights.HF_MODEL_TYPES or mtype.startswith("llava_"):
        tokenizer, model, processor, _ = builder.load_pretrained_model(str(path), device="cpu", dtype=torch.float32)
        tokenizer.model_max_length = train_args.model_max_length
        model.config.image_aspect_ratio = data_args.image_aspect_ratio if not model.config.is_anyres else "anyres"
        model.train()
    else:
        if not model_args.vision_tower:
            raise SystemExit(f"{path} is a plain language model ({mtype!r}): pass --vision_tower too")
        tokenizer, model, processor = build_from_lm_and_tower(model_args, train_args)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    model.set_attn_implementation(model_args.attn_implementation)
    return tokenizer, model, processor


def load_projector(model: LlavaModel, path: str | Path) -> None:
    """Projector weights from a stage-1 run: LLaVA's ``mm_projector.bin``/``.safetensors`` (``model.mm_projector.*``
    keys) or a llava-hf checkpoint folder (``multi_modal_projector.*``)."""
    p = Path(path)
    layouts = (weights.LORA, weights.HF_LEGACY, weights.HF_NEW, weights.LLAVA)  # whichever spells each key
    if p.is_dir():
        state = builder.read_state(p, None, *layouts)
    elif p.suffix == ".safetensors":
        state = weights.remap(load_file(str(p)), *layouts)
    else:
        state = weights.remap(torch.load(str(p), map_location="cpu", weights_only=True), *layouts)
    mapped = {k: v for k, v in state.items() if k.startswith("multi_modal_projector.")}
    if not mapped:
        raise ckpt.CheckpointError(f"{path} holds no projector weights (mm_projector / multi_modal_projector)")
    missing, _ = model.load_state_dict(mapped, strict=False)
    if any(k.startswith("multi_modal_projector.") for k in missing):
        raise ckpt.CheckpointError(f"{path}: projector weights incomplete: {[k for k in missing if 'projector' in k]}")


# ------------------------------------------------------------------------------------ what trains


def configure_trainable(model: LlavaModel, model_args, train_args) -> None:
    """LLaVA's freeze logic: stage 1 (``--tune_mm_mlp_adapter``) trains the projector only; ``--freeze_backbone``
    freezes the LM; the vision tower stays frozen unless ``--freeze_vision_tower False``; LoRA trains adapters
    plus the projector. Then LoRA / QLoRA and gradient checkpointing are applied."""
    for p in model.parameters():
        p.requires_grad_(True)
    model.vision_tower.requires_grad_(not model_args.freeze_vision_tower)
    if model_args.freeze_backbone or train_args.lora_enable:
        model.language_model.requires_grad_(False)
    if model_args.tune_mm_mlp_adapter:
        model.requires_grad_(False)
    model.multi_modal_projector.requires_grad_(not model_args.freeze_mm_mlp_adapter)
    if hasattr(model, "image_newline"):
        model.image_newline.requires_grad_(not model_args.freeze_mm_mlp_adapter)
    if train_args.bits in (4, 8):  # QLoRA's base: the LM's linears, frozen (LLaVA's skip list)
        builder.quantize_language_model(model, train_args.bits)
    if train_args.lora_enable:
        add_lora(model, train_args)
    if train_args.gradient_checkpointing:
        model.language_model.gradient_checkpointing = True
        model.vision_tower.gradient_checkpointing = not model_args.freeze_vision_tower


def add_lora(model: LlavaModel, train_args) -> None:
    """peft LoRA adapters on every linear of the language model but ``lm_head`` (LLaVA's
    ``find_all_linear_names``)."""
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(
        r=train_args.lora_r,
        lora_alpha=train_args.lora_alpha,
        lora_dropout=train_args.lora_dropout,
        target_modules=LORA_TARGETS,
        bias=train_args.lora_bias,
    )
    if train_args.bits == 4:  # QLoRA: peft needs to know how to wrap our 4-bit linears
        from fastllava.quantization import lora_config_for_4bit

        cfg = lora_config_for_4bit(cfg)
    inject_adapter_in_model(cfg, model.language_model)
    for name, p in model.language_model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


def lora_config(model: LlavaModel):
    """The ``LoraConfig`` that ``add_lora`` applied (peft keeps it on the module it injected into)."""
    configs = getattr(model.language_model, "peft_config", None)
    if not configs:
        raise ValueError("the model has no LoRA adapters (add_lora was not applied)")
    return configs["default"]


def is_projector_param(name: str) -> bool:
    return name.startswith("multi_modal_projector.") or name == "image_newline"


# ------------------------------------------------------------------------------------ outputs


def lora_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """Adapter weights under original LLaVA's peft key names (``base_model.model.model.layers.N....lora_A.weight``),
    the names ``fastllava.model.builder.merge_lora`` and LLaVA's own loader read."""
    state = {
        "language_model." + k.replace(".default", ""): v  # peft's saved names drop the adapter name
        for k, v in model.language_model.state_dict().items()
        if "lora_" in k
    }
    return weights.to_layout(state, weights.LORA, model.config.projector_type)


def merged_model(model: LlavaModel) -> LlavaModel:
    """Fold LoRA adapters into their base linears (peft's merge) and drop the wrappers. In place."""
    builder.merge_lora_layers(model.language_model)
    return model


def save_lora_adapter(model: LlavaModel, out_dir: Path, run_args: dict) -> None:
    """peft-format adapter (``adapter_config.json`` + ``adapter_model.safetensors``), the non-LoRA trainables
    (projector) and the arguments that rebuild the base (``base_model.json``, for ``python -m train.merge_lora``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = lora_config(model)
    adapter_cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": cfg.r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": sorted(cfg.target_modules),
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "base_model_name_or_path": run_args["model"].get("model_name_or_path"),
        "inference_mode": True,
        "fan_in_fan_out": False,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    save_file(lora_state_dict(model), str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    trainables = {name: p for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name}
    non_lora = weights.to_layout(trainables, weights.LORA, model.config.projector_type)
    save_file(non_lora, str(out_dir / "non_lora_trainables.safetensors"), metadata={"format": "pt"})
    (out_dir / "base_model.json").write_text(json.dumps(run_args, indent=2, default=str))


def save_projector(model: LlavaModel, path: Path) -> None:
    """Stage-1 output as LLaVA writes it (``mm_projector`` under LLaVA's key names), in safetensors."""
    state = {k: v for k, v in model.state_dict().items() if is_projector_param(k)}
    save_file(
        weights.to_layout(state, weights.LLAVA, model.config.projector_type), str(path), metadata={"format": "pt"}
    )


def save_final(model: LlavaModel, out_dir: Path, tokenizer, processor) -> Path:
    """The run's model as a llava-hf checkpoint (mlp2x_gelu projectors) or original-LLaVA layout (others)."""
    from fastllava.model.export import save_llava_hf, save_llava_original

    if model.config.projector_type == "mlp2x_gelu":
        return save_llava_hf(model, out_dir, tokenizer, processor)
    log.warning("projector %s has no llava-hf layout: writing the original LLaVA layout", model.config.projector_type)
    return save_llava_original(model, out_dir, tokenizer, processor)


def run_args_dict(model_args, data_args, train_args) -> dict:
    return {"model": asdict(model_args), "data": asdict(data_args), "train": asdict(train_args)}
