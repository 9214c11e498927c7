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
from fastllava.model.llava import LlavaModel


def _text_dict(cfg: LlavaConfig) -> dict:
    t = cfg.text
    d = {
        "model_type": t.model_type,
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "head_dim": t.head_dim,
        "max_position_embeddings": t.max_position_embeddings,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "hidden_act": t.hidden_act,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }
    if t.rope_scaling is not None:
        d["rope_scaling"] = t.rope_scaling
    if t.model_type == "llama":
        d.update(attention_bias=t.attention_bias, mlp_bias=t.mlp_bias)
    if t.model_type == "mistral":
        d["sliding_window"] = t.sliding_window
    if t.model_type == "qwen2":
        d.update(sliding_window=t.sliding_window, use_sliding_window=t.sliding_window is not None)
    return d


def _vision_dict(cfg: LlavaConfig) -> dict:
    v = cfg.vision
    return {
        "model_type": v.model_type,
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "hidden_act": v.hidden_act,
        "layer_norm_eps": v.layer_norm_eps,
    }


def hf_config_dict(cfg: LlavaConfig) -> dict:
    """A llava-hf ``config.json`` for ``cfg``."""
    is_next = cfg.is_anyres
    d = {
        "architectures": ["LlavaNextForConditionalGeneration" if is_next else "LlavaForConditionalGeneration"],
        "model_type": "llava_next" if is_next else "llava",
        "text_config": _text_dict(cfg),
        "vision_config": _vision_dict(cfg),
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
    out = {}
    for k, v in model.state_dict().items():
        if k == "language_model.lm_head.weight" and model.config.text.tie_word_embeddings:
            continue
        if k.startswith("language_model.lm_head."):
            name = k if layout == "legacy" else k[len("language_model.") :]
        elif k.startswith("language_model."):
            rest = k[len("language_model.") :]
            name = f"language_model.model.{rest}" if layout == "legacy" else f"model.language_model.{rest}"
        elif k.startswith("vision_tower."):
            rest = k[len("vision_tower.") :]
            name = (
                f"vision_tower.vision_model.{rest}" if layout == "legacy" else f"model.vision_tower.vision_model.{rest}"
            )
        else:  # multi_modal_projector.*, image_newline
            name = k if layout == "legacy" else f"model.{k}"
        out[name] = v.detach().contiguous().cpu()
    return out


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
    lm, tower = {}, {}
    for k, v in model.state_dict().items():
        v = v.detach().contiguous().cpu()
        if k.startswith("language_model.lm_head."):
            if not cfg.text.tie_word_embeddings:
                lm[k[len("language_model.") :]] = v
        elif k.startswith("language_model."):
            lm["model." + k[len("language_model.") :]] = v
        elif k.startswith("multi_modal_projector.linear_"):
            idx, param = k[len("multi_modal_projector.linear_") :].split(".")
            name = "model.mm_projector." + (
                f"{param}" if cfg.projector_type == "linear" else f"{2 * (int(idx) - 1)}.{param}"
            )
            lm[name] = v
        elif k == "image_newline":
            lm["model.image_newline"] = v
        elif k.startswith("vision_tower."):
            tower["vision_model." + k[len("vision_tower.") :]] = v
    save_file(lm, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(tower, str(vdir / "model.safetensors"), metadata={"format": "pt"})
    vtype = "SiglipVisionModel" if cfg.vision.is_siglip else "CLIPVisionModel"
    (vdir / "config.json").write_text(json.dumps({"architectures": [vtype], **_vision_dict(cfg)}, indent=2))
    text = _text_dict(cfg)
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
