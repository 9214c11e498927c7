"""Model configs: small dataclasses, one per component, parsed from llava-hf or original-LLaVA config.json.

Conventions kept inside fastllava whatever the checkpoint says:
  * image sizes are ``(height, width)``; anyres pinpoints are a list of ``(height, width)``
    (original LLaVA writes pinpoints as (W, H), transformers as (H, W): parsing converts);
  * ``image_size_order`` records whose anyres convention the checkpoint follows ("wh": original LLaVA, which
    writes sizes as (W, H) and rounds the unpadded side down; "hw": transformers, (H, W), rounding to nearest).
    It does not change what callers pass: ``images=`` takes ``image_sizes`` as ``PIL.Image.size`` (W, H) for
    every checkpoint, ``pixel_values=`` takes transformers' (H, W) (``LlavaModel.forward``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastllava.anyres import pinpoints_from_hf, pinpoints_from_llava


@dataclass
class VisionConfig:
    model_type: str = "clip_vision_model"  # or "siglip_vision_model"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"  # CLIP; SigLIP uses gelu_pytorch_tanh
    layer_norm_eps: float = 1e-5

    @property
    def is_siglip(self) -> bool:
        return "siglip" in self.model_type

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, d: dict) -> VisionConfig:
        """Parse a CLIP / SigLIP vision ``config.json`` (a ``CLIPVisionModel``'s, or a full ``CLIPModel``'s, which
        nests it under ``vision_config``) or a llava-hf ``vision_config``; unknown keys ignored."""
        d = dict(d.get("vision_config") or d)
        d.setdefault("model_type", "clip_vision_model")
        if "siglip" in d["model_type"]:
            d.setdefault("hidden_act", "gelu_pytorch_tanh")
            d.setdefault("layer_norm_eps", 1e-6)
        return cls(**_pick(cls, d))

    def to_hf_dict(self) -> dict:
        """The ``config.json`` fields transformers' ``CLIPVisionConfig`` / ``SiglipVisionConfig`` read."""
        return asdict(self)


@dataclass
class TextConfig:
    model_type: str = "llama"  # llama | mistral | qwen2
    vocab_size: int = 32064
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False  # Qwen2 has q/k/v bias (and no o_proj bias)
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.model_type == "qwen2":
            self.attention_bias = True

    @classmethod
    def from_dict(cls, d: dict) -> TextConfig:
        """Parse a Llama / Mistral / Qwen2 ``config.json`` (or a llava-hf ``text_config``); unknown keys ignored."""
        d = dict(d)
        d.setdefault("model_type", "llama")
        # transformers >= 5 nests rope settings under rope_parameters
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            d["rope_theta"] = rope["rope_theta"]
        if rope and rope.get("rope_type", "default") != "default":
            d["rope_scaling"] = rope
        elif d.get("rope_scaling") and d["rope_scaling"].get("rope_type", d["rope_scaling"].get("type")) == "default":
            d["rope_scaling"] = None
        if d["model_type"] == "qwen2" and not d.get("use_sliding_window", False):
            d["sliding_window"] = None
        if d["model_type"] == "llama":
            d["sliding_window"] = None
        return cls(**_pick(cls, d))

    def to_hf_dict(self) -> dict:
        """The ``config.json`` fields transformers' ``LlamaConfig`` / ``MistralConfig`` / ``Qwen2Config`` read
        (only those its model type has: ``sliding_window`` for Mistral and Qwen2, MLP bias for Llama)."""
        d = {
            k: getattr(self, k)
            for k in (
                "model_type",
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
                "rms_norm_eps",
                "rope_theta",
                "hidden_act",
                "tie_word_embeddings",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
            )
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        if self.model_type == "qwen2":
            d.update(sliding_window=self.sliding_window, use_sliding_window=self.sliding_window is not None)
        return d


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    projector_type: str = "mlp2x_gelu"  # linear | mlp{N}x_gelu | identity
    projector_bias: bool = True
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS ("patch"); "full" keeps ("cls_patch")
    image_token_index: int | None = None  # llava-hf: id of the (already expanded) image token
    image_aspect_ratio: str = "square"  # LLaVA: "pad" | "anyres" | anything else = plain preprocess
    image_grid_pinpoints: list[tuple[int, int]] | None = None  # (height, width)
    mm_patch_merge_type: str = "flat"  # "spatial_unpad" for LLaVA-NeXT
    use_image_newline: bool = False
    mm_use_im_start_end: bool = False
    image_size_order: str = "hw"  # anyres convention: "hw" (transformers) or "wh" (original LLaVA); see above
    architecture: str = "LlavaForConditionalGeneration"  # or LlavaNextForConditionalGeneration / llava_llama
    tokenizer_padding_side: str = "right"

    @property
    def is_anyres(self) -> bool:
        return self.image_aspect_ratio.startswith("anyres") and self.image_grid_pinpoints is not None

    @property
    def keeps_cls(self) -> bool:
        return self.vision_feature_select_strategy in ("full", "cls_patch")

    @property
    def tokens_per_tile(self) -> int:
        """Features one vision-tower tile yields (576 for CLIP-L/14 at 336 px)."""
        return self.vision.num_patches + (1 if self.keeps_cls and not self.vision.is_siglip else 0)

    # ---------------------------------------------------------------- (de)serialisation

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_grid_pinpoints"] = [list(p) for p in self.image_grid_pinpoints] if self.image_grid_pinpoints else None
        return d

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> LlavaConfig:
        """Parse a llava-hf ``config.json`` (model_type llava / llava_next)."""
        vision = VisionConfig.from_dict(cfg.get("vision_config") or {})
        text = TextConfig.from_dict(cfg.get("text_config") or {})
        is_next = cfg.get("model_type") == "llava_next" or "image_grid_pinpoints" in cfg
        act = cfg.get("projector_hidden_act", "gelu")
        if act not in ("gelu", "gelu_python"):
            raise ValueError(f"projector_hidden_act={act!r} is not supported (LLaVA uses exact 'gelu')")
        return cls(
            vision=vision,
            text=text,
            projector_type="mlp2x_gelu",
            projector_bias=cfg.get("multimodal_projector_bias", True),
            vision_feature_layer=cfg.get("vision_feature_layer", -2),
            vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
            image_token_index=cfg.get("image_token_index", cfg.get("image_token_id")),
            image_aspect_ratio="anyres" if is_next else "square",
            image_grid_pinpoints=pinpoints_from_hf(cfg["image_grid_pinpoints"]) if is_next else None,
            mm_patch_merge_type="spatial_unpad" if is_next else "flat",
            use_image_newline=is_next,
            image_size_order="hw",
            architecture=(cfg.get("architectures") or ["LlavaForConditionalGeneration"])[0],
        )

    @classmethod
    def from_llava_dict(cls, cfg: dict, vision: VisionConfig) -> LlavaConfig:
        """Parse an original LLaVA ``config.json`` (model_type llava_llama / llava_mistral / ...).

        The vision tower's own config comes from ``mm_vision_tower`` (a local CLIP/SigLIP folder).
        """
        text = TextConfig.from_dict({**cfg, "model_type": _llava_text_type(cfg.get("model_type", "llava_llama"))})
        select = cfg.get("mm_vision_select_feature", "patch")
        pinpoints = cfg.get("image_grid_pinpoints")
        merge = cfg.get("mm_patch_merge_type", "flat")
        return cls(
            vision=vision,
            text=text,
            projector_type=cfg.get("mm_projector_type", "linear"),
            projector_bias=True,
            vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
            vision_feature_select_strategy="full" if select == "cls_patch" else "default",
            image_token_index=None,
            image_aspect_ratio=cfg.get("image_aspect_ratio", "square") or "square",
            image_grid_pinpoints=pinpoints_from_llava(pinpoints) if pinpoints else None,
            mm_patch_merge_type=merge,
            use_image_newline="unpad" in merge,
            mm_use_im_start_end=cfg.get("mm_use_im_start_end", False),
            image_size_order="wh",
            architecture=(cfg.get("architectures") or ["LlavaLlamaForCausalLM"])[0],
            tokenizer_padding_side=cfg.get("tokenizer_padding_side", "right"),
        )


def _llava_text_type(model_type: str) -> str:
    for name in ("mistral", "qwen2", "llama"):
        if name in model_type:
            return name
    if "mpt" in model_type:
        raise ValueError("LLaVA-MPT checkpoints are not supported (MPT language model)")
    return "llama"


def _pick(dc, d: dict) -> dict:
    names = {f.name for f in fields(dc)}
    return {k: v for k, v in d.items() if k in names}


def load_json(path: str | Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
