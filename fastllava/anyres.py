"""LLaVA-NeXT "anyres" geometry: which grid an image is cut into and how many image tokens it yields.

One convention inside fastllava: sizes are `(height, width)` and pinpoints are a list of `(height, width)`.
The two upstreams disagree on the order, so convert at the boundary:

- original LLaVA (`llava/mm_utils.py`) passes `image.size` (W, H) and reads `image_grid_pinpoints` from the
  model's config.json as (W, H) pairs  -> `pinpoints_from_llava`;
- transformers (`LlavaNextImageProcessor`, llava-hf checkpoints) uses (H, W) for both  -> `pinpoints_from_hf`.

The default LLaVA-1.6 pinpoints are symmetric under the swap, which is why the difference rarely shows; it
does for non-square sets such as `[[336, 672], [336, 1008]]`.

The token count of one image (LLaVA `mm_patch_merge_type="spatial_unpad"`, transformers `LlavaNext`):

    base crop  (crop/patch)^2 [+1 CLS with strategy "full"]
  + grid features after removing the letterbox padding (`unpadded_feature_shape`)
  + one `image_newline` per remaining feature row
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence

__all__ = [
    "select_best_resolution",
    "get_anyres_image_grid_shape",
    "resize_for_patching_hw",
    "unpadded_feature_shape",
    "anyres_num_features",
    "pinpoints_from_llava",
    "pinpoints_from_hf",
]

HW = tuple[int, int]


def select_best_resolution(image_hw: Sequence[int], pinpoints_hw: Sequence[Sequence[int]]) -> HW:
    """The pinpoint that keeps the most of the image's pixels, ties broken by the least padding.

    Same rule (and float arithmetic) as LLaVA's and transformers' `select_best_resolution`; only the
    (H, W) order is ours.
    """
    orig_h, orig_w = int(image_hw[0]), int(image_hw[1])
    best: HW | None = None
    max_effective = 0
    min_wasted = float("inf")
    for pin_h, pin_w in pinpoints_hw:
        scale = min(pin_w / orig_w, pin_h / orig_h)
        down_w, down_h = int(orig_w * scale), int(orig_h * scale)
        effective = min(down_w * down_h, orig_w * orig_h)
        wasted = pin_w * pin_h - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best = (int(pin_h), int(pin_w))
    if best is None:
        raise ValueError(f"no usable pinpoint in {list(pinpoints_hw)!r} for an image of (H, W) {tuple(image_hw)}")
    return best


def resize_for_patching_hw(image_hw: Sequence[int], target_hw: Sequence[int]) -> HW:
    """Size an image is resized to before being letterboxed into `target_hw` (aspect kept, capped).

    LLaVA's `resize_and_pad_image` and transformers' `get_patch_output_size` agree on this, including the
    `math.ceil` of the float product.
    """
    orig_h, orig_w = image_hw
    target_h, target_w = target_hw
    scale_w = target_w / orig_w
    scale_h = target_h / orig_h
    if scale_w < scale_h:
        return min(math.ceil(orig_h * scale_w), target_h), target_w
    return target_h, min(math.ceil(orig_w * scale_h), target_w)


def get_anyres_image_grid_shape(image_hw: Sequence[int], pinpoints_hw: Sequence[Sequence[int]], patch_size: int) -> HW:
    """`(rows, cols)` of crops the image is cut into. `patch_size` is the crop size (336 for CLIP-L/336),
    as in LLaVA, where the vision tower's `image_size` is passed, not its ViT patch size."""
    best_h, best_w = select_best_resolution(image_hw, pinpoints_hw)
    return best_h // patch_size, best_w // patch_size


def unpadded_feature_shape(image_hw: Sequence[int], grid_h: int, grid_w: int, *, convention: str = "hf") -> HW:
    """Feature-map `(h, w)` left after cropping away the letterbox padding (LLaVA/transformers `unpad_image`).

    `grid_h`, `grid_w`: the padded feature map in feature cells (`rows * crop//patch`, `cols * crop//patch`).
    The padding removed is `(current - new) // 2` on *both* sides, so the result keeps the parity of
    `current` and may be one larger than the content. The two upstreams differ in one rounding:

    - `convention="llava"`: `int(orig * scale)` (LLaVA `llava_arch.unpad_image`), which truncates float
      products such as 29.999999999999996 to 29;
    - `convention="hf"`: `int(round(orig * scale, 7))` (transformers `unpad_image` and the processor's
      `_get_unpadded_features`), which gives 30.

    When the truncation changes the parity of `current - new`, LLaVA keeps two more rows (or columns).
    """
    if convention not in ("llava", "hf"):
        raise ValueError(f"convention must be 'llava' or 'hf', got {convention!r}")
    orig_h, orig_w = int(image_hw[0]), int(image_hw[1])
    cur_h, cur_w = int(grid_h), int(grid_w)

    def to_int(x: float) -> int:
        return int(x) if convention == "llava" else int(round(x, 7))

    if orig_w / orig_h > cur_w / cur_h:  # wider than the grid: padding above and below
        new_h = to_int(orig_h * (cur_w / orig_w))
        pad = (cur_h - new_h) // 2
        return cur_h - 2 * pad, cur_w
    new_w = to_int(orig_w * (cur_h / orig_h))
    pad = (cur_w - new_w) // 2
    return cur_h, cur_w - 2 * pad


def anyres_num_features(
    image_hw: Sequence[int],
    pinpoints_hw: Sequence[Sequence[int]],
    crop_size: int,
    patch_size: int,
    image_newline: bool = True,
    strategy: str = "default",
    *,
    num_additional_image_tokens: int = 1,
    convention: str = "hf",
) -> int:
    """Number of image tokens LLaVA-NeXT produces for one image of size `image_hw` (= slots for its `<image>`).

    `crop_size`: the vision tower's input size (336); `patch_size`: its ViT patch (14).
    `strategy`: `vision_feature_select_strategy`; "default" drops the CLS token, "full" keeps the
    `num_additional_image_tokens` extra tokens (1 for CLIP's CLS, 0 for SigLIP) of the base crop.
    `image_newline`: count one newline embedding per unpadded feature row (LLaVA "spatial_unpad").
    """
    if strategy not in ("default", "full"):
        raise ValueError(f"strategy must be 'default' or 'full', got {strategy!r}")
    side = crop_size // patch_size
    base = side * side + (num_additional_image_tokens if strategy == "full" else 0)
    rows, cols = get_anyres_image_grid_shape(image_hw, pinpoints_hw, crop_size)
    h, w = unpadded_feature_shape(image_hw, rows * side, cols * side, convention=convention)
    return base + h * w + (h if image_newline else 0)


def _pairs(value) -> list[HW]:
    if isinstance(value, str):
        value = ast.literal_eval(value.strip())
    pairs = [(int(a), int(b)) for a, b in value]
    if not pairs:
        raise ValueError("image_grid_pinpoints is empty")
    return pairs


_RANGE_ITEM = re.compile(r"\((\d+)x(\d+)\)")


def pinpoints_from_llava(value, patch_size: int | None = None) -> list[HW]:
    """LLaVA's `image_grid_pinpoints` ((W, H) pairs) -> our (H, W) list.

    Accepts a list of pairs, its string form `"[(336, 672), ...]"` (LLaVA reads strings with
    `ast.literal_eval`), and LLaVA-NeXT's range form `"(1x1),...,(3x3)"`, which spans every (i, j) from
    the first to the last item, scaled by `patch_size` (the crop size, e.g. 384).
    """
    if isinstance(value, str) and "x" in value:
        matches = _RANGE_ITEM.findall(value)
        if not matches:
            raise ValueError(f"cannot parse image_grid_pinpoints {value!r}")
        if patch_size is None:
            raise ValueError(f"image_grid_pinpoints {value!r} is in grid units; pass patch_size (the crop size)")
        (w0, h0), (w1, h1) = (tuple(map(int, m)) for m in (matches[0], matches[-1]))
        return [(j * patch_size, i * patch_size) for i in range(w0, w1 + 1) for j in range(h0, h1 + 1)]
    return [(h, w) for w, h in _pairs(value)]


def pinpoints_from_hf(value) -> list[HW]:
    """transformers' `image_grid_pinpoints` ((H, W) pairs, list or its string form) -> our (H, W) list."""
    return _pairs(value)
