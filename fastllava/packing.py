"""The one representation: packed batches.

Every sequence is laid end to end in one flat token stream with no padding. Each ``<image>`` placeholder
(``IMAGE_TOKEN_INDEX`` in LLaVA-tokenized prompts, or a run of the checkpoint's image token in llava-hf
prompts) becomes exactly as many slots as its image yields, so lengths are known before the forward.
Everything here runs on the host at tokenization time; the model then needs no per-sample Python loop.

    batch = pack([ids_a, ids_b], images=[[img_a], []], cfg=model.config)
    hidden = model.forward_packed(batch)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from fastllava.anyres import get_anyres_image_grid_shape
from fastllava.config import LlavaConfig
from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclass
class ImageInput:
    """One image as the model consumes it: its preprocessed tiles and its original size (H, W)."""

    pixel_values: torch.Tensor  # (tiles, 3, h, w); tiles = 1 unless anyres
    size_hw: tuple[int, int]


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # (T,) image slots hold 0
    position_ids: torch.Tensor  # (T,) restart at 0 per sequence
    cu_seqlens: torch.Tensor  # (B+1,) int32
    max_seqlen: int
    seq_lens: list[int]  # host copy of the lengths
    labels: torch.Tensor | None = None  # (T,) IGNORE_INDEX where no loss
    image_offsets: torch.Tensor | None = None  # (N,) first slot of each image in the stream
    image_counts: torch.Tensor | None = None  # (N,) slots per image
    pixel_values: torch.Tensor | None = None  # (total_tiles, 3, h, w)
    feature_index: torch.Tensor | None = None  # (sum counts,) gather into tile features (+ newline row)
    image_counts_host: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            k: (v.to(device) if isinstance(v, torch.Tensor) else v)
            for k, v in self.__dict__.items()
            if k not in ("seq_lens", "max_seqlen", "image_counts_host")
        }
        return replace(self, **moved)

    def last_token_index(self) -> torch.Tensor:
        """(B,) index of each sequence's last token in the stream."""
        return (self.cu_seqlens[1:] - 1).long()


# ------------------------------------------------------------------------------ image token geometry


def image_tiles(cfg: LlavaConfig, size_hw: tuple[int, int]) -> int:
    """How many vision-tower tiles an image of ``size_hw`` is cut into (1 + grid for anyres)."""
    if not cfg.is_anyres:
        return 1
    rows, cols = get_anyres_image_grid_shape(size_hw, cfg.image_grid_pinpoints, cfg.vision.image_size)
    return 1 + rows * cols


def _unpad_bounds(cfg: LlavaConfig, size_hw: tuple[int, int], height: int, width: int) -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of the (height x width) grid feature map that hold the image,
    as LLaVA's / transformers' ``unpad_image`` computes them (they round the scaled side differently)."""
    orig_h, orig_w = size_hw
    if orig_w / orig_h > width / height:
        scaled = orig_h * (width / orig_w)
        new_h = int(round(scaled, 7)) if cfg.image_size_order == "hw" else int(scaled)
        pad = (height - new_h) // 2
        return pad, height - pad, 0, width
    scaled = orig_w * (height / orig_h)
    new_w = int(round(scaled, 7)) if cfg.image_size_order == "hw" else int(scaled)
    pad = (width - new_w) // 2
    return 0, height, pad, width - pad


def image_feature_index(cfg: LlavaConfig, size_hw: tuple[int, int]) -> torch.Tensor:
    """Gather index that turns one image's projected tile features ``[tiles * L, D]`` (with the newline
    embedding appended as row ``tiles * L``) into the token sequence LLaVA feeds the language model.

    Non-anyres: the identity over L. Anyres: the base tile's L tokens, then the tiles' grid laid out as one
    feature map, cropped to the image (spatial_unpad) with a newline after every row.
    """
    L = cfg.tokens_per_tile
    if not cfg.is_anyres:
        return torch.arange(L)
    side = cfg.vision.image_size // cfg.vision.patch_size
    if L != side * side:
        raise ValueError("anyres needs vision_feature_select_strategy='default' (patch features only)")
    rows, cols = get_anyres_image_grid_shape(size_hw, cfg.image_grid_pinpoints, cfg.vision.image_size)
    tiles = 1 + rows * cols
    newline = tiles * L
    base = torch.arange(L)
    y = torch.arange(rows * side)[:, None]  # feature-map row
    x = torch.arange(cols * side)[None, :]  # feature-map column
    tile = 1 + (y // side) * cols + (x // side)
    grid = tile * L + (y % side) * side + (x % side)  # (rows*side, cols*side)
    if "unpad" not in cfg.mm_patch_merge_type:
        return torch.cat([base, grid.flatten()])
    r0, r1, c0, c1 = _unpad_bounds(cfg, size_hw, rows * side, cols * side)
    grid = grid[r0:r1, c0:c1]
    if cfg.use_image_newline:
        grid = torch.cat([grid, torch.full((grid.shape[0], 1), newline)], dim=1)
    return torch.cat([base, grid.flatten()])


def used_tiles(cfg: LlavaConfig, pixel_values: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """The tiles ``[image_tiles, 3, h, w]`` an image of ``size_hw`` uses (a transformers NeXT batch pads every
    image's ``pixel_values`` to the most tiles of any); an error when it has fewer."""
    pv = pixel_values if pixel_values.dim() == 4 else pixel_values.unsqueeze(0)
    want = image_tiles(cfg, size_hw)
    if pv.shape[0] < want:
        raise ValueError(f"image of size {size_hw} needs {want} tiles, got {pv.shape[0]}")
    return pv[:want]


def batch_feature_index(
    cfg: LlavaConfig,
    sizes_hw: list[tuple[int, int]],
    index_of: Callable[[tuple[int, int]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The gather index of several images whose tiles are encoded together, laid end to end: each image's
    ``image_feature_index`` shifted to its tiles' rows of the batch's tile features ``[sum(tiles) * L, D]``, its
    newline entries pointing at the one newline row appended after them (row ``sum(tiles) * L``).
    ``index_of(size_hw)``: a cache of ``image_feature_index`` (default: computed)."""
    L = cfg.tokens_per_tile
    parts, base = [], 0  # base: tiles before this image
    for size_hw in sizes_hw:
        tiles = image_tiles(cfg, size_hw)
        idx = index_of(size_hw) if index_of is not None else image_feature_index(cfg, size_hw)
        parts.append(torch.where(idx == tiles * L, -1, idx + base * L))  # -1: newline, fixed below
        base += tiles
    index = torch.cat(parts)
    return torch.where(index < 0, base * L, index)


def image_token_count(cfg: LlavaConfig, size_hw: tuple[int, int]) -> int:
    """Slots one image takes in the token stream (576 for a 336 px CLIP-L/14 LLaVA-1.5 image)."""
    if not cfg.is_anyres:
        return cfg.tokens_per_tile
    return int(image_feature_index(cfg, size_hw).numel())


# ---------------------------------------------------------------------------------------- packing


def expand_image_tokens(
    ids: list[int], counts: list[int], image_token_index: int | None
) -> tuple[list[int], list[int]]:
    """Expand image placeholders in one sequence. Returns (ids with image slots = 0, slot offsets).

    ``IMAGE_TOKEN_INDEX`` entries expand to ``counts[i]`` slots each; runs of ``image_token_index``
    (llava-hf prompts, already expanded) are consumed ``counts[i]`` tokens per image.
    """
    out: list[int] = []
    offsets: list[int] = []
    img = 0
    i = 0
    while i < len(ids):
        tok = ids[i]
        if tok == IMAGE_TOKEN_INDEX or (image_token_index is not None and tok == image_token_index):
            if img >= len(counts):
                raise ValueError(f"the prompt has more image tokens than the {len(counts)} image(s) given")
            n = counts[img]
            if tok == IMAGE_TOKEN_INDEX:
                i += 1
            else:
                run = ids[i : i + n]
                if len(run) < n or any(t != image_token_index for t in run):
                    raise ValueError(
                        f"image {img} needs {n} consecutive image tokens (id {image_token_index}) in the prompt; "
                        "was it processed for another image size or checkpoint?"
                    )
                i += n
            offsets.append(len(out))
            out.extend([0] * n)
            img += 1
        else:
            out.append(tok)
            i += 1
    if img != len(counts):
        raise ValueError(f"{len(counts)} image(s) given but the prompt has {img} image placeholder(s)")
    return out, offsets


def pack(
    sequences: list[list[int]],
    images: list[list[ImageInput]] | None,
    cfg: LlavaConfig,
    labels: list[list[int]] | None = None,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack token-id lists (with image placeholders) and their images into one ``PackedBatch``.

    ``labels`` (optional) are aligned with ``sequences`` before expansion; image slots get IGNORE_INDEX.
    Labels stay *unshifted*: position t's label is the token at t (the loss shifts within each sequence).
    """
    images = images or [[] for _ in sequences]
    if len(images) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but image lists for {len(images)}")
    all_ids: list[int] = []
    all_labels: list[int] = []
    seq_lens: list[int] = []
    offsets: list[int] = []
    counts: list[int] = []
    tiles: list[torch.Tensor] = []
    sizes: list[tuple[int, int]] = []
    for s, (ids, imgs) in enumerate(zip(sequences, images, strict=True)):
        n_img = [image_token_count(cfg, im.size_hw) for im in imgs]
        expanded, offs = expand_image_tokens(list(ids), n_img, cfg.image_token_index)
        if labels is not None:
            if len(labels[s]) != len(ids):
                raise ValueError(f"sequence {s}: {len(labels[s])} labels for {len(ids)} tokens")
            all_labels.extend(_expand_labels(list(ids), list(labels[s]), n_img, cfg.image_token_index))
        start = len(all_ids)
        offsets.extend(start + o for o in offs)
        counts.extend(n_img)
        for im in imgs:
            tiles.append(used_tiles(cfg, im.pixel_values, im.size_hw))
            sizes.append(im.size_hw)
        all_ids.extend(expanded)
        seq_lens.append(len(expanded))
    if any(n == 0 for n in seq_lens):
        raise ValueError("empty sequence in batch")
    cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(seq_lens), 0)
    position_ids = torch.cat([torch.arange(n) for n in seq_lens])
    batch = PackedBatch(
        input_ids=torch.tensor(all_ids, dtype=torch.long),
        position_ids=position_ids,
        cu_seqlens=cu,
        max_seqlen=max(seq_lens),
        seq_lens=seq_lens,
        labels=torch.tensor(all_labels, dtype=torch.long) if labels is not None else None,
        image_counts_host=counts,
    )
    if counts:
        batch.feature_index = batch_feature_index(cfg, sizes)
        batch.image_offsets = torch.tensor(offsets, dtype=torch.long)
        batch.image_counts = torch.tensor(counts, dtype=torch.long)
        batch.pixel_values = torch.cat(tiles)
    return batch.to(device)


def _expand_labels(ids: list[int], labels: list[int], counts: list[int], image_token_index: int | None) -> list[int]:
    """Labels aligned with ``ids`` -> aligned with the expanded ids (image slots IGNORE_INDEX)."""
    out: list[int] = []
    img = 0
    i = 0
    while i < len(ids):
        if ids[i] == IMAGE_TOKEN_INDEX:
            out.extend([IGNORE_INDEX] * counts[img])
            img += 1
            i += 1
        elif image_token_index is not None and ids[i] == image_token_index:
            out.extend([IGNORE_INDEX] * counts[img])
            i += counts[img]
            img += 1
        else:
            out.append(labels[i])
            i += 1
    return out


def shifted_targets(labels: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(T,) next-token targets within each sequence: target[t] = labels[t+1], IGNORE_INDEX at sequence ends."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:-1] = labels[1:]
    ends = (cu_seqlens[1:] - 1).long()
    targets[ends] = IGNORE_INDEX
    return targets
