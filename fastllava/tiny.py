"""Tiny LLaVA models for tests and examples, built locally (no hub): configs of every supported family, a
byte-level BPE tokenizer trained on the spot, random weights, saved in llava-hf or original-LLaVA layout.

    tok = build_tokenizer()
    model = build_tiny_llava(tiny_config("llama"), seed=0)
    save_llava_hf(model, "/tmp/tiny-llava", tok, tiny_image_processor(model.config))
"""

from __future__ import annotations

import torch
from torch import nn

from fastllava.config import LlavaConfig, TextConfig, VisionConfig
from fastllava.image_processing import ImageProcessor
from fastllava.model.llava import LlavaModel

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4
IMAGE_TOKEN = "<image>"

# A small corpus covering the conversation templates and the synthetic image questions, so common words
# are single tokens; any other text still tokenizes (byte-level BPE never produces <unk>).
_CORPUS = (
    """A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful,
detailed, and polite answers to the human's questions. USER: ASSISTANT: Human: Assistant: ###
What is shown in this image? Describe the image. What color is the shape? What shape is in the image?
How many shapes are there? Where is the circle? Is there a square? Answer with a single word.
red green blue yellow purple orange white black gray circle square triangle star cross
one two three four five six left right top bottom center middle small large big yes no
the a an of in on at is are there this that what which how many where color shape size position
[INST] [/INST] <<SYS>> <</SYS>> <|im_start|> <|im_end|> system user assistant
"""
    * 4
)


def build_tokenizer(vocab_size: int = 512, model_max_length: int = 2048):
    """A byte-level BPE tokenizer with Llama's special tokens (``<s>`` prepended) and ``<image>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        padding_side="right",
    )


def tiny_config(
    family: str = "llama",
    *,
    vision: str = "clip",
    anyres: bool = False,
    vocab_size: int = 512,
    image_size: int = 32,
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    projector_type: str = "mlp2x_gelu",
) -> LlavaConfig:
    """A LLaVA small enough for CPU tests: 2-layer tower and LM, 16 patches per image by default."""
    siglip = vision == "siglip"
    vcfg = VisionConfig(
        model_type="siglip_vision_model" if siglip else "clip_vision_model",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu_pytorch_tanh" if siglip else "quick_gelu",
        layer_norm_eps=1e-6 if siglip else 1e-5,
    )
    tcfg = TextConfig(
        model_type=family,
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        sliding_window=48 if family == "mistral" else None,
        tie_word_embeddings=family == "qwen2",
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    pinpoints = [(image_size, 2 * image_size), (2 * image_size, image_size), (2 * image_size, 2 * image_size)]
    return LlavaConfig(
        vision=vcfg,
        text=tcfg,
        projector_type=projector_type,
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if siglip else "default",
        image_token_index=SPECIAL_TOKENS.index(IMAGE_TOKEN),
        image_aspect_ratio="anyres" if anyres else "pad",
        image_grid_pinpoints=pinpoints if anyres else None,
        mm_patch_merge_type="spatial_unpad" if anyres else "flat",
        use_image_newline=anyres,
    )


def build_tiny_llava(config: LlavaConfig, seed: int = 0, std: float = 0.02) -> LlavaModel:
    """Random-weight LLaVA (normal(0, std) linears/embeddings, unit norms), deterministic from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    model = LlavaModel(config)
    for name, p in model.named_parameters():
        with torch.no_grad():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(
                    std * 5 * torch.randn(p.shape, generator=gen)
                    if p.dim() == 1
                    else std * torch.randn(p.shape, generator=gen)
                )
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            m.weight.data.mul_(25)  # give token identity enough weight to matter through 2 layers
    return model


def tiny_image_processor(config: LlavaConfig) -> ImageProcessor:
    """CLIP-style (or SigLIP-style) preprocessing at the tiny tower's resolution."""
    side = config.vision.image_size
    if config.vision.is_siglip:
        return ImageProcessor(
            size={"height": side, "width": side},
            crop_size=None,
            do_center_crop=False,
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            image_processor_type="SiglipImageProcessor",
        )
    return ImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
