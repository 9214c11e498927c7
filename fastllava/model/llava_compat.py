"""LLaVA's model internals on ``LlavaModel``, for code written against LLaVA's ``LlavaLlamaForCausalLM``.

LLaVA's own ``model_worker.py``, LLaVA-Med style tools and research scripts call::

    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded: vision_tower.load_model()
    image_processor = vision_tower.image_processor
    n = vision_tower.num_patches
    feats = model.encode_images(images)                              # (N, L, D)
    _, pos, mask, pkv, embeds, labels = model.prepare_inputs_labels_for_multimodal(
        input_ids, None, attention_mask, None, labels, images, image_sizes)
    model.get_model().mm_projector, model.get_model().embed_tokens

``LlavaCompatMixin`` gives ``LlavaModel`` that surface without branches in the model: the vision tower and
the inner model are *views* (plain objects, no parameters of their own) over our modules, so there is one set
of weights and one forward. ``encode_images`` lives on the model itself (``llava.py``) and ``generate`` in
``fastllava/generation.py`` (an adapter over the engine), with LLaVA's signatures.

Differences from LLaVA, on purpose: the tower is loaded with the model (``is_loaded`` is always True and
``load_model()`` does nothing); ``prepare_inputs_labels_for_multimodal`` runs our packed path (one tower call
for every image of the batch, the same embeddings as LLaVA's loop, checked by ``tests/test_llava_model.py``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fastllava.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_PATCH_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
)


class VisionTowerView:
    """LLaVA's ``CLIPVisionTower`` interface over the model's vision tower (``model.get_vision_tower()``)."""

    is_loaded = True

    def __init__(self, model) -> None:
        self._model = model

    @property
    def vision_tower(self) -> nn.Module:
        return self._model.vision_tower

    @property
    def image_processor(self):
        """The processor ``load_pretrained_model`` read with the checkpoint (or one for the tower's size)."""
        processor = getattr(self._model, "image_processor", None)
        if processor is None:
            from fastllava.tiny import tiny_image_processor  # CLIP/SigLIP defaults at the tower's resolution

            processor = tiny_image_processor(self._model.config)
        return processor

    def load_model(self, device_map=None) -> None:
        """No-op: the tower's weights are loaded with the model (LLaVA loads them lazily)."""

    @property
    def vision_tower_name(self) -> str | None:
        return getattr(self._model, "vision_tower_name", None)

    @property
    def select_layer(self):
        return self._model.config.vision_feature_layer

    @property
    def select_feature(self) -> str:
        return "cls_patch" if self._model.config.keeps_cls else "patch"

    @torch.no_grad()
    def forward(self, images):
        """LLaVA's tower forward: ``[N, 3, H, W]`` -> selected features ``[N, L, C]`` in the images' dtype;
        a list of images -> a list of ``[1, L, C]``."""
        if isinstance(images, list):
            return [self.forward(im.unsqueeze(0) if im.dim() == 3 else im) for im in images]
        feats = self._model.select_features(images.to(device=self.device, dtype=self.dtype))
        return feats.to(images.dtype)

    __call__ = forward

    def to(self, *args, **kwargs) -> VisionTowerView:
        """Moves the real tower (LLaVA's builder calls ``vision_tower.to(device=..., dtype=float16)``)."""
        self._model.vision_tower.to(*args, **kwargs)
        return self

    def requires_grad_(self, requires_grad: bool = True) -> VisionTowerView:
        self._model.vision_tower.requires_grad_(requires_grad)
        return self

    def parameters(self):
        return self._model.vision_tower.parameters()

    @property
    def dtype(self) -> torch.dtype:
        return self._model.vision_tower.embeddings.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self._model.vision_tower.embeddings.patch_embedding.weight.device

    @property
    def config(self):
        """The tower's config (``image_size``, ``patch_size``, ``hidden_size`` as in transformers')."""
        return self._model.config.vision

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)


class InnerModelView:
    """LLaVA's inner ``LlavaLlamaModel`` (``model.get_model()``): ``vision_tower``, ``mm_projector``,
    ``image_newline``, ``get_vision_tower()``; anything else (``embed_tokens``, ``layers``, ``norm``) is the
    language model's."""

    def __init__(self, model) -> None:
        self._model = model
        self.vision_tower = VisionTowerView(model)

    def get_vision_tower(self) -> VisionTowerView:
        return self.vision_tower

    @property
    def mm_projector(self) -> nn.Module:
        return self._model.multi_modal_projector

    @property
    def image_newline(self) -> nn.Parameter:
        return self._model.image_newline

    @property
    def config(self):
        return self._model.config

    def __getattr__(self, name: str):
        return getattr(self._model.language_model, name)


class LlavaCompatMixin:
    """LLaVA's ``LlavaMetaForCausalLM`` methods, over ``LlavaModel``'s own modules and packed forward."""

    image_processor = None  # set by load_pretrained_model; LLaVA reads it through get_vision_tower()

    def get_model(self) -> InnerModelView:
        return InnerModelView(self)

    def get_vision_tower(self) -> VisionTowerView:
        return VisionTowerView(self)

    def get_output_embeddings(self) -> nn.Linear:
        return self.language_model.lm_head

    def resize_token_embeddings(self, new_num_tokens: int) -> nn.Embedding:
        """Grow (or shrink) the token embeddings and LM head to ``new_num_tokens`` rows; new rows start at the
        mean of the old ones (transformers' ``mean_resizing`` without its noise)."""
        lm = self.language_model
        old = lm.embed_tokens.weight
        n_old = old.shape[0]
        keep = min(n_old, new_num_tokens)
        tied = lm.lm_head.weight is lm.embed_tokens.weight

        def grown(weight: torch.Tensor) -> torch.Tensor:
            w = weight.new_empty(new_num_tokens, weight.shape[1])
            w[:keep] = weight[:keep]
            w[keep:] = weight.mean(0, keepdim=True)
            return w

        with torch.no_grad():
            embed = nn.Embedding(new_num_tokens, old.shape[1], device=old.device, dtype=old.dtype)
            embed.weight.copy_(grown(old.data))
            lm.embed_tokens = embed
            if tied:
                lm.lm_head.weight = embed.weight
            else:
                head = lm.lm_head.weight
                new_head = nn.Linear(head.shape[1], new_num_tokens, bias=False, device=head.device, dtype=head.dtype)
                new_head.weight.copy_(grown(head.data))
                lm.lm_head = new_head
        self.config.text.vocab_size = new_num_tokens
        return lm.embed_tokens

    def initialize_vision_tokenizer(self, model_args, tokenizer) -> None:
        """LLaVA's: add ``<im_patch>`` / ``<im_start>`` ``<im_end>`` tokens as ``model_args`` asks, resize the
        embeddings, start the new rows at the mean of the old ones, and set which embeddings train."""
        if model_args.mm_use_im_patch_token:
            tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
        if model_args.mm_use_im_start_end:
            num_new = tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            self.resize_token_embeddings(len(tokenizer))
            inp, out = self.get_input_embeddings().weight.data, self.get_output_embeddings().weight.data
            if num_new > 0:
                inp[-num_new:] = inp[:-num_new].mean(dim=0, keepdim=True)
                out[-num_new:] = out[:-num_new].mean(dim=0, keepdim=True)
            if model_args.tune_mm_mlp_adapter:
                self.get_input_embeddings().requires_grad_(True)
                self.get_output_embeddings().requires_grad_(False)
            if model_args.pretrain_mm_mlp_adapter:
                from fastllava.model import checkpoint as ckpt

                weights = ckpt.read_weights([Path(model_args.pretrain_mm_mlp_adapter)], None)
                stored = weights["model.embed_tokens.weight"]
                if num_new != 2:
                    raise ValueError(f"expected 2 new tokens (<im_start>, <im_end>), added {num_new}")
                if stored.shape == inp.shape:
                    inp[-num_new:] = stored[-num_new:]
                elif stored.shape[0] == num_new:
                    inp[-num_new:] = stored
                else:
                    raise ValueError(
                        f"embed_tokens in {model_args.pretrain_mm_mlp_adapter} is {tuple(stored.shape)}; the model's "
                        f"is {tuple(inp.shape)} with {num_new} new tokens"
                    )
        elif model_args.mm_use_im_patch_token and model_args.tune_mm_mlp_adapter:
            self.get_input_embeddings().requires_grad_(False)
            self.get_output_embeddings().requires_grad_(False)

    def prepare_inputs_labels_for_multimodal(
        self, input_ids, position_ids, attention_mask, past_key_values, labels, images, image_sizes=None
    ):
        """LLaVA's: ``(None, position_ids, attention_mask, past_key_values, inputs_embeds, labels)`` with every
        ``IMAGE_TOKEN_INDEX`` replaced by its image features, padded on ``config.tokenizer_padding_side``.

        ``image_sizes`` are ``PIL.Image.size`` (W, H). As in LLaVA, a batch with one image per row gives a
        text-only row's image to nobody (LLaVA's training puts a dummy image beside text-only samples).
        """
        if images is None or input_ids.shape[1] == 1:
            return input_ids, position_ids, attention_mask, past_key_values, None, labels
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        per_row = [int((row[m] == IMAGE_TOKEN_INDEX).sum()) for row, m in zip(input_ids, mask, strict=True)]
        n_images = len(images)
        if sum(per_row) != n_images and n_images == len(per_row) and max(per_row) <= 1:
            used = [i for i, n in enumerate(per_row) if n == 1]
            images = [images[i] for i in used]
            image_sizes = [image_sizes[i] for i in used] if image_sizes is not None else None
        batch, _ = self.pack_padded(input_ids, mask, images, image_sizes, labels)
        embeds = self.embed(batch)  # (T, D)
        lens, starts = batch.seq_lens, batch.cu_seqlens.tolist()
        limit = getattr(self.config, "tokenizer_model_max_length", None)
        if limit is not None:
            lens = [min(n, limit) for n in lens]  # LLaVA truncates after the image features went in
        B, max_len = len(lens), max(lens)
        new_embeds = embeds.new_zeros(B, max_len, embeds.shape[-1])
        new_labels = torch.full((B, max_len), IGNORE_INDEX, dtype=torch.long, device=embeds.device)
        new_mask = torch.zeros(B, max_len, dtype=torch.bool, device=embeds.device)
        new_pos = torch.zeros(B, max_len, dtype=torch.long, device=embeds.device)
        left = self.config.tokenizer_padding_side == "left"
        for b, n in enumerate(lens):
            cols = slice(max_len - n, max_len) if left else slice(0, n)
            new_embeds[b, cols] = embeds[starts[b] : starts[b] + n]
            if batch.labels is not None:
                new_labels[b, cols] = batch.labels[starts[b] : starts[b] + n]
            new_mask[b, cols] = True
            new_pos[b, cols] = torch.arange(n, device=embeds.device)
        return (
            None,
            new_pos if position_ids is not None else None,
            new_mask.to(attention_mask.dtype) if attention_mask is not None else None,
            past_key_values,
            new_embeds,
            new_labels if labels is not None else None,
        )
