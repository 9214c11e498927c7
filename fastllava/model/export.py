"""Writing checkpoints that LLaVA users' tools read: llava-hf layout (loadable by transformers'
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``) and original-LLaVA layout
(``llava_llama`` config + ``mm_vision_tower`` folder). Always safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastllava.config import LlavaConfig
from fastllava.model import weights
from fastllava.model.llava import LlavaModel


def hf_config_dict(cfg: LlavaConfig) -> dict:
    """A llava-hf ``config.json`` for ``cfg``."""
    is_next = cfg.is_anyres
    d = {
        "architectures": ["LlavaNextForConditionalGeneration" if is_next else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if is_next else "llava",
        "text_config": cfg.text.to_hf_dict(),
        "vision_config": cfg.vision.to_hf_dict(),
        "image_token_index": cfg.image_token_index,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": cfg.projector_bias,
        "vision_feature_layer": cfg.vision_feature_layer,
        "vision_feature_select_strategy": cfg.vision_feature_select_strategy,
        "image_seq_length": cfg.tokens_per_tile,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    if is_next:
        d["image_grid_pinpoints"] = [list(p) for p in cfg.image_grid_pinpoints]  # (H, W), transformers' order
    return d


def hf_state_dict(model: LlavaModel, layout: str = "legacy") -> dict[str, torch.Tensor]:
    """fastllava names -> llava-hf names. ``legacy``: ``language_model.model.*`` (< 4.52, and what
    transformers 5 writes); ``new``: ``model.language_model.*`` (transformers >= 4.52 in memory)."""
    if model.config.projector_type != "mlp2x_gelu":
        raise ValueError("llava-hf checkpoints hold an mlp2x_gelu projector only; save in the original layout")
    if layout not in ("legacy", "new"):
        raise ValueError(f"layout must be 'legacy' or 'new', not {layout!r}")
    return weights.to_layout(_saved_state(model), f"hf_{layout}")


def _saved_state(model: LlavaModel) -> dict[str, torch.Tensor]:
    """The model's state dict as a checkpoint holds it: a tied LM head is not stored."""
    tied = model.config.text.tie_word_embeddings
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "language_model.lm_head.weight")}


def save_llava_hf(
    model: LlavaModel, out_dir: str | Path, tokenizer=None, image_processor=None, layout: str = "legacy"
) -> Path:
    """Write a llava-hf checkpoint folder (config, safetensors weights, tokenizer, image processor)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model.config.image_token_index is None:
        raise ValueError("a llava-hf checkpoint needs config.image_token_index (the <image> token id)")
    save_file(hf_state_dict(model, layout), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config_dict(model.config), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if image_processor is not None:
        proc = image_processor
        if model.config.is_anyres:
            proc.image_processor_type = "LlavaNextImageProcessor"
            proc.image_grid_pinpoints = [list(p) for p in model.config.image_grid_pinpoints]
        proc.save_pretrained(str(out))
        # what transformers' LlavaProcessor needs to expand <image> into its tokens
        (out / "processor_config.json").write_text(
            json.dumps(
                {
                    "processor_class": "LlavaNextProcessor" if model.config.is_anyres else "LlavaProcessor",
                    "patch_size": model.config.vision.patch_size,
                    "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
                    "num_additional_image_tokens": 0 if model.config.vision.is_siglip else 1,
                    "image_token": "<image>",
                },
                indent=2,
            )
        )
    return out


def save_llava_original(
    model: LlavaModel, out_dir: str | Path, tokenizer=None, image_processor=None, vision_dir: str | Path | None = None
) -> Path:
    """Write an original-LLaVA checkpoint (``llava_llama`` et al.) and its vision tower folder.

    The tower goes to ``vision_dir`` (default ``<out_dir>/vision_tower``) as a ``CLIPVisionModel`` /
    ``SiglipVisionModel`` folder; ``mm_vision_tower`` in config.json points at it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vdir = Path(vision_dir) if vision_dir is not None else out / "vision_tower"
    vdir.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = _saved_state(model)
    tower = {k: v for k, v in state.items() if k.startswith("vision_tower.")}
    lm = {k: v for k, v in state.items() if k not in tower}
    tower, lm = weights.to_layout(tower, weights.VISION), weights.to_layout(lm, weights.LLAVA, cfg.projector_type)
    save_file(lm, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(tower, str(vdir / "model.safetensors"), metadata={"format": "pt"})
    vtype = "SiglipVisionModel" if cfg.vision.is_siglip else "CLIPVisionModel"
    (vdir / "config.json").write_text(json.dumps({"architectures": [vtype], **cfg.vision.to_hf_dict()}, indent=2))
    text = cfg.text.to_hf_dict()
    llava_type = {"llama": "llava_llama", "mistral": "llava_mistral", "qwen2": "llava_qwen"}[cfg.text.model_type]
    arch = {"llama": "LlavaLlamaForCausalLM", "mistral": "LlavaMistralForCausalLM", "qwen2": "LlavaQwenForCausalLM"}
    config = {
        **text,
        "architectures": [arch[cfg.text.model_type]],
        "model_type": llava_type,
        "mm_vision_tower": str(vdir.resolve()),
        "mm_projector_type": cfg.projector_type,
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "cls_patch" if cfg.keeps_cls else "patch",
        "mm_use_im_start_end": cfg.mm_use_im_start_end,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": cfg.image_aspect_ratio,
        "mm_patch_merge_type": cfg.mm_patch_merge_type,
        "tokenizer_padding_side": cfg.tokenizer_padding_side,
    }
    if cfg.image_grid_pinpoints:
        config["image_grid_pinpoints"] = [[w, h] for h, w in cfg.image_grid_pinpoints]  # LLaVA reads (W, H)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if image_processor is not None:
        image_processor.save_pretrained(str(vdir))
    return out
