"""The LLaVA model: vision tower -> projector -> language model, over packed batches.

``forward_packed(batch)`` is the real forward (training, serving prefill and eval all use it):
  1. all image tiles of the batch go through the vision tower at once, then the projector;
  2. a gather lays each image's features out as LLaVA does (anyres grid, unpad, newlines);
  3. one varlen scatter writes them into the embedding stream at their slots;
  4. the language model runs on the flat stream with varlen attention.

``forward(input_ids, attention_mask, images, image_sizes, labels)`` is the LLaVA-style padded API: a thin
adapter that packs, runs and unpacks. ``model.generate(...)`` is the padded API over the engine; it lives in
``fastllava/generation.py`` (the engine sits above the model, which never imports it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastllava.config import LlavaConfig
from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.kernels import scatter_image_tokens
from fastllava.losses import linear_cross_entropy
from fastllava.model.language import AttnMetadata, KVCache, LanguageModel
from fastllava.model.llava_compat import LlavaCompatMixin
from fastllava.model.projector import Projector
from fastllava.model.vision import VisionTower
from fastllava.packing import ImageInput, PackedBatch, image_token_count, pack, shifted_targets


@dataclass
class PaddedRows:
    """A padded batch split into its sequences: token ids, images, and each kept token's column."""

    ids: list[list[int]]
    images: list[list[ImageInput]]
    positions: list[list[int]]
    labels: list[list[int]] | None = None


@dataclass
class LlavaOutput:
    logits: torch.Tensor | None = None  # (B, L, V) padded API; (T, V) or (B, V) packed
    loss: torch.Tensor | None = None


class LlavaModel(LlavaCompatMixin, nn.Module):
    """LLaVA over packed batches; LLaVA's own model methods (``get_vision_tower()``, ``get_model()``,
    ``prepare_inputs_labels_for_multimodal`` ...) come from ``LlavaCompatMixin``."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTower(config.vision)
        in_dim = config.vision.hidden_size * (
            len(config.vision_feature_layer) if isinstance(config.vision_feature_layer, list) else 1
        )
        self.multi_modal_projector = Projector(
            config.projector_type, in_dim, config.text.hidden_size, config.projector_bias
        )
        if config.use_image_newline:
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))
        self.language_model = LanguageModel(config.text)
        self.attn_implementation = "auto"

    # ----------------------------------------------------------------------------------- setup

    def set_attn_implementation(self, name: str | None) -> None:
        """Select the attention backend (``fastllava.attention`` registry name, or ``auto``) everywhere."""
        name = name or "auto"
        self.attn_implementation = name
        self.vision_tower.set_attn_implementation(name)
        self.language_model.set_attn_implementation(name)

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed_tokens

    # ------------------------------------------------------------------------------ the forward

    def select_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles ``[N, 3, h, w]`` -> the vision features LLaVA selects ``[N, L, C]`` (layer, CLS or not)."""
        feats = self.vision_tower(pixel_values, self.config.vision_feature_layer)  # (N, L', C)
        if not self.config.keeps_cls and not self.config.vision.is_siglip:
            feats = feats[:, 1:]  # LLaVA's "patch" features: drop CLS
        return feats

    def encode_images(self, pixel_values: torch.Tensor, feature_index: torch.Tensor | None = None) -> torch.Tensor:
        """Tiles ``[N, 3, h, w]`` -> image tokens ``[sum(counts), D]`` in stream order (``feature_index`` from
        the packed batch); without an index, LLaVA's ``encode_images(images)``: ``[N, L, D]`` per tile."""
        feats = self.select_features(pixel_values)
        N = feats.shape[0]
        # a tower moved to another dtype on its own (LLaVA's builder does `vision_tower.to(float16)`)
        feats = self.multi_modal_projector(feats.flatten(0, 1).to(self.dtype))  # (N * L, D)
        if feature_index is None:
            return feats.view(N, -1, feats.shape[-1])
        if self.config.use_image_newline:
            feats = torch.cat([feats, self.image_newline[None].to(feats.dtype)])
        return feats[feature_index]

    def embed(self, batch: PackedBatch, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings ``[T, D]`` with image features scattered into their slots."""
        embeds = self.language_model.embed_tokens(batch.input_ids)
        if batch.image_offsets is None:
            return embeds
        if image_features is None:
            image_features = self.encode_images(batch.pixel_values, batch.feature_index).flatten(0, -2)
        return scatter_image_tokens(embeds, image_features.to(embeds.dtype), batch.image_offsets, batch.image_counts)

    def forward_packed(
        self,
        batch: PackedBatch,
        meta: AttnMetadata | None = None,
        cache: KVCache | None = None,
        image_features: torch.Tensor | None = None,
        max_position: int | None = None,
    ) -> torch.Tensor:
        """Final hidden states ``[T, D]`` of a packed batch."""
        if meta is None:
            meta = AttnMetadata(cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        embeds = self.embed(batch, image_features)
        return self.language_model(embeds, batch.position_ids, meta, cache, max_position or batch.max_seqlen)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.lm_head(hidden)

    def loss(
        self, hidden: torch.Tensor, targets: torch.Tensor, chunk_size: int = 1024, impl: str = "auto"
    ) -> torch.Tensor:
        """Summed next-token cross-entropy of hidden rows ``[N, D]`` against their targets ``[N]`` (fp32 scalar).

        The one loss of the model, training and the padded API: the LM head fused with the cross-entropy
        (``fastllava.losses.linear_cross_entropy``: Liger's kernel on CUDA when installed, else chunked torch),
        so the ``[N, vocab]`` logits are never materialised."""
        head = self.language_model.lm_head
        return linear_cross_entropy(hidden, head.weight, targets, bias=head.bias, chunk_size=chunk_size, impl=impl)

    def packed_loss(self, batch: PackedBatch, hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Sum of next-token cross-entropy over the batch's target tokens, and their count."""
        if hidden is None:
            hidden = self.forward_packed(batch)
        targets = shifted_targets(batch.labels, batch.cu_seqlens)
        keep = targets != IGNORE_INDEX  # boolean indexing syncs once; the alternative is [T, V] logits
        return self.loss(hidden[keep], targets[keep]), int(keep.sum())

    # -------------------------------------------------------------------- LLaVA-style padded API

    def images_to_inputs(self, images, image_sizes, sizes_order: str = "wh") -> list[ImageInput]:
        """LLaVA/transformers ``images`` + ``image_sizes`` -> one ``ImageInput`` per image.

        ``sizes_order`` says what ``image_sizes`` holds: ``"wh"`` for LLaVA's ``images=`` (``PIL.Image.size``,
        whatever the checkpoint layout), ``"hw"`` for transformers' ``pixel_values=``. A transformers NeXT
        batch pads ``pixel_values`` to the most tiles of any image; ``pack`` keeps the tiles each one needs.
        """
        if images is None:
            return []
        if isinstance(images, torch.Tensor):
            images = list(images) if images.dim() in (4, 5) else [images]
        out = []
        tile = self.config.vision.image_size
        for i, px in enumerate(images):
            if image_sizes is not None:
                a, b = (int(v) for v in image_sizes[i])
                size_hw = (a, b) if sizes_order == "hw" else (b, a)
            else:
                size_hw = (tile, tile)
            px = px if px.dim() == 4 else px.unsqueeze(0)
            out.append(ImageInput(px.to(self.device), size_hw))
        return out

    def split_padded(
        self, input_ids, attention_mask=None, images=None, image_sizes=None, labels=None, pixel_values=None
    ) -> PaddedRows:
        """Split a padded ``[B, L]`` batch into its sequences (masked columns dropped) and give each row its images,
        in order: one per ``IMAGE_TOKEN_INDEX`` placeholder, or per image-token run in llava-hf prompts.

        ``images`` is LLaVA's argument (``image_sizes`` as (W, H)), ``pixel_values`` transformers' ((H, W)).
        """
        if images is not None and pixel_values is not None:
            raise ValueError("pass images= (LLaVA, image_sizes as (W, H)) or pixel_values= (transformers), not both")
        ids_host = input_ids.tolist()
        mask_host = attention_mask.bool().tolist() if attention_mask is not None else None
        lab_host = labels.tolist() if labels is not None else None
        if pixel_values is not None:
            img_inputs = self.images_to_inputs(pixel_values, image_sizes, sizes_order="hw")
        else:
            img_inputs = self.images_to_inputs(images, image_sizes, sizes_order="wh")
        rows = PaddedRows([], [], [], [] if labels is not None else None)
        img = 0
        hf_token = self.config.image_token_index
        counts_cache: dict[tuple[int, int], int] = {}
        for b, row in enumerate(ids_host):
            keep = [j for j in range(len(row)) if mask_host is None or mask_host[b][j]]
            ids = [row[j] for j in keep]
            n_placeholders = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
            if hf_token is not None and n_placeholders == 0:
                # llava-hf prompts carry expanded image tokens: count images by their token runs
                n_tokens = sum(1 for t in ids if t == hf_token)
                n_imgs = 0
                while n_tokens > 0 and img + n_imgs < len(img_inputs):
                    size = img_inputs[img + n_imgs].size_hw
                    if size not in counts_cache:
                        counts_cache[size] = image_token_count(self.config, size)
                    n_tokens -= counts_cache[size]
                    n_imgs += 1
            else:
                n_imgs = n_placeholders
            rows.ids.append(ids)
            rows.images.append(img_inputs[img : img + n_imgs])
            img += n_imgs
            if lab_host is not None:
                rows.labels.append([lab_host[b][j] for j in keep])
            rows.positions.append(keep)
        if img != len(img_inputs):
            raise ValueError(f"{len(img_inputs)} images given but the prompts use {img}")
        return rows

    def pack_padded(
        self, input_ids, attention_mask=None, images=None, image_sizes=None, labels=None, pixel_values=None
    ) -> tuple[PackedBatch, list[list[int]]]:
        """A padded batch (see ``split_padded``) packed on the model's device, and each kept token's column."""
        rows = self.split_padded(input_ids, attention_mask, images, image_sizes, labels, pixel_values)
        batch = pack(rows.ids, rows.images, self.config, labels=rows.labels)
        return batch.to(self.device), rows.positions

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        images=None,
        image_sizes=None,
        labels: torch.Tensor | None = None,
        pixel_values=None,
        **unused,
    ) -> LlavaOutput:
        """LLaVA's forward: logits ``[B, L', V]`` over each sequence with its image slots expanded
        (LLaVA-style ``IMAGE_TOKEN_INDEX`` prompts) or at the input positions (llava-hf prompts, whose image
        tokens are already expanded); ``loss`` when ``labels`` are given (mean over target tokens).

        ``images=`` + ``image_sizes`` as ``PIL.Image.size`` (W, H) is LLaVA's call; ``pixel_values=`` +
        ``image_sizes`` as (H, W) is transformers' call (its processor's output, unpacked with ``**``)."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch, positions = self.pack_padded(input_ids, attention_mask, images, image_sizes, labels, pixel_values)
        hidden = self.forward_packed(batch)
        logits = self.logits(hidden)  # (T, V)
        expanded = bool((input_ids == IMAGE_TOKEN_INDEX).any())
        B, L = input_ids.shape
        out_len = max(batch.seq_lens) if expanded else L
        out = logits.new_zeros(B, out_len, logits.shape[-1])
        starts = batch.cu_seqlens.tolist()
        for b in range(B):
            seg = logits[starts[b] : starts[b + 1]]
            if expanded:
                if self.config.tokenizer_padding_side == "left":
                    out[b, out_len - seg.shape[0] :] = seg
                else:
                    out[b, : seg.shape[0]] = seg
            else:
                out[b, positions[b]] = seg
        loss = None
        if labels is not None:  # mean over the target tokens
            loss_sum, n_targets = self.packed_loss(batch, hidden)
            loss = loss_sum / n_targets
        return LlavaOutput(logits=out, loss=loss)
