"""CLIP / SigLIP / LLaVA(-NeXT) image preprocessing in PIL + numpy, matching transformers bit for bit.

    proc = ImageProcessor.from_pretrained(checkpoint_dir)      # preprocessor_config.json or processor_config.json
    proc(images, return_tensors="pt")["pixel_values"]          # (B, 3, H, W) float32

transformers' image processors are the test oracle, not a dependency (docs/ARCHITECTURE.md: transformers only for
tokenizers and config parsing). The pipeline is the one of its PIL backend (`PilBackend._preprocess`):

    convert to RGB (alpha composited on white) -> resize (PIL, `resample`) -> center crop (zero-pad if
    smaller) -> rescale (float64 multiply, then float32) -> normalize (float32)

Every step is done with the same dtypes in the same order, so outputs are identical, not just close.
LLaVA code reads `processor.crop_size["height"]`, `processor.size["shortest_edge"]` and
`processor.image_mean`; those attributes exist under those names.

LLaVA-NeXT: a processor with `image_grid_pinpoints` and `convention="hf"` (a llava-hf checkpoint) runs
transformers' `LlavaNextImageProcessor` algorithm in `preprocess`; `fastllava.mm_utils.process_images` is
the LLaVA entry point and also covers the original-LLaVA anyres algorithm.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

from fastllava.anyres import pinpoints_from_hf, resize_for_patching_hw, select_best_resolution

__all__ = ["ImageProcessor", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "IMAGENET_STANDARD_MEAN", "IMAGENET_STANDARD_STD"]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGENET_STANDARD_MEAN = [0.5, 0.5, 0.5]
IMAGENET_STANDARD_STD = [0.5, 0.5, 0.5]

PREPROCESSOR_CONFIG = "preprocessor_config.json"  # what image processors (and LLaVA checkpoints) write
PROCESSOR_CONFIG = "processor_config.json"  # transformers 5 processors: {"image_processor": {...}, ...}

# Class defaults for keys a config file leaves out, per `image_processor_type` (transformers fills missing
# keys from the class attributes, so a SigLIP config without `do_center_crop` does not center-crop).
_TYPE_DEFAULTS: dict[str, dict[str, Any]] = {
    "CLIPImageProcessor": {},
    "LlavaImageProcessor": {},
    "LlavaNextImageProcessor": {
        "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    },
    "SiglipImageProcessor": {
        "size": {"height": 224, "width": 224},
        "crop_size": None,
        "do_center_crop": False,
        "image_mean": IMAGENET_STANDARD_MEAN,
        "image_std": IMAGENET_STANDARD_STD,
    },
}
# Types whose `do_pad` means "pad to a square with the mean colour before resizing" (LLaVA's expand2square).
_PAD_TO_SQUARE_TYPES = ("LlavaImageProcessor",)


@dataclass
class ImageProcessor:
    """Preprocessing settings, field for field those of a CLIP/SigLIP/LLaVA `preprocessor_config.json`."""

    size: dict[str, int] = field(default_factory=lambda: {"shortest_edge": 224})  # or {"height", "width"}
    crop_size: dict[str, int] | None = field(default_factory=lambda: {"height": 224, "width": 224})
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    resample: int = 3  # PIL.Image.Resampling: CLIP and SigLIP use BICUBIC (3)
    do_convert_rgb: bool = True
    image_grid_pinpoints: list[list[int]] | None = None  # LLaVA-NeXT, (H, W) pairs as transformers writes them
    # LlavaImageProcessor: pad to square before resizing; LlavaNextImageProcessor: pad the patch count of a
    # batch to its maximum (both as in transformers).
    do_pad: bool = False
    image_processor_type: str = "CLIPImageProcessor"
    # Whose LLaVA-NeXT anyres algorithm to follow: "llava" (original LLaVA checkpoints) or "hf" (llava-hf).
    convention: str = "llava"

    def __post_init__(self) -> None:
        self.size = _size_dict(self.size, key="shortest_edge")
        if self.crop_size is None:
            # LLaVA reads crop_size["height"] even for SigLIP towers, which have none: use the resize target.
            side = self.size.get("shortest_edge")
            self.crop_size = (
                {"height": side, "width": side}
                if side
                else {"height": self.size["height"], "width": self.size["width"]}
            )
        else:
            self.crop_size = _size_dict(self.crop_size, key="square")
        self.image_mean = [float(x) for x in self.image_mean]
        self.image_std = [float(x) for x in self.image_std]
        if self.image_grid_pinpoints is not None:
            self.image_grid_pinpoints = [list(p) for p in pinpoints_from_hf(self.image_grid_pinpoints)]
        if self.convention not in ("llava", "hf"):
            raise ValueError(f"convention must be 'llava' or 'hf', got {self.convention!r}")

    # ------------------------------------------------------------------ config files

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ImageProcessor:
        """Build from a config dict; unknown keys are ignored, missing ones take the type's defaults."""
        config = {**config, **overrides}
        type_name = config.get("image_processor_type") or _type_from_feature_extractor(config)
        type_name = type_name.removesuffix("Fast").removesuffix("Pil")
        kwargs: dict[str, Any] = dict(_TYPE_DEFAULTS.get(type_name, {}))
        names = {f.name for f in fields(cls)}
        kwargs.update({k: v for k, v in config.items() if k in names})
        kwargs["image_processor_type"] = type_name
        if "convention" not in config:
            # llava-hf checkpoints ship Llava(Next)ImageProcessor configs; original LLaVA ships the CLIP
            # tower's own config and keeps the pinpoints in the model's config.json.
            kwargs["convention"] = "hf" if type_name.startswith("Llava") else "llava"
        for key in ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb", "do_pad"):
            if key in kwargs and kwargs[key] is None:
                kwargs[key] = False
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ImageProcessor:
        """Read `preprocessor_config.json`, or the `image_processor` entry of transformers 5's
        `processor_config.json` (what `LlavaProcessor.save_pretrained` writes)."""
        path = os.fspath(path)
        pre = os.path.join(path, PREPROCESSOR_CONFIG)
        proc = os.path.join(path, PROCESSOR_CONFIG)
        if os.path.isfile(pre):
            with open(pre, encoding="utf-8") as f:
                return cls.from_dict(json.load(f), **overrides)
        if os.path.isfile(proc):
            with open(proc, encoding="utf-8") as f:
                config = json.load(f)
            if isinstance(config.get("image_processor"), dict):
                return cls.from_dict(config["image_processor"], **overrides)
        raise FileNotFoundError(f"no {PREPROCESSOR_CONFIG} (or {PROCESSOR_CONFIG} with an image_processor) in {path}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        del d["convention"]  # ours, not a transformers key; implied by image_processor_type on reload
        if d["image_grid_pinpoints"] is None:
            del d["image_grid_pinpoints"]
        return d

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Write `preprocessor_config.json` that transformers' image processors load unchanged."""
        os.makedirs(path, exist_ok=True)
        out = os.path.join(os.fspath(path), PREPROCESSOR_CONFIG)
        with open(out, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return out

    # ------------------------------------------------------------------ preprocessing

    def __call__(self, images, return_tensors: str | None = "pt") -> dict[str, Any]:
        return self.preprocess(images, return_tensors=return_tensors)

    def preprocess(self, images, return_tensors: str | None = "pt") -> dict[str, Any]:
        """`{"pixel_values": (B, 3, H, W) float32}` for a PIL image, an (H, W[, C]) uint8 array, or a list.

        A LLaVA-NeXT processor in the "hf" convention returns what `LlavaNextImageProcessor` does:
        `pixel_values` (B, max_patches, 3, H, W) (zero-padded on the patch axis when `do_pad`) and
        `image_sizes` (B, 2) as (H, W).
        """
        images = images if isinstance(images, (list, tuple)) else [images]
        if self.image_grid_pinpoints is not None and self.image_processor_type.startswith("LlavaNext"):
            if self.convention == "hf":
                patches = [self.preprocess_anyres(img) for img in images]
                sizes = [list(_to_rgb_array(img, self.do_convert_rgb).shape[:2]) for img in images]
                if self.do_pad:
                    n = max(p.shape[0] for p in patches)
                    patches = [np.pad(p, ((0, n - p.shape[0]), (0, 0), (0, 0), (0, 0))) for p in patches]
                return _as_tensors({"pixel_values": patches, "image_sizes": sizes}, return_tensors)
        return _as_tensors({"pixel_values": [self.preprocess_one(img) for img in images]}, return_tensors)

    def preprocess_one(self, image) -> np.ndarray:
        """One image -> (3, H, W) float32 array."""
        arr = _to_rgb_array(image, self.do_convert_rgb)  # (H, W, C) uint8
        if self.do_pad and self.image_processor_type in _PAD_TO_SQUARE_TYPES:
            arr = _pad_to_square(arr, tuple(int(x * 255) for x in self.image_mean))
        return self._transform(arr)

    def _transform(self, arr: np.ndarray) -> np.ndarray:
        """resize -> center crop -> rescale -> normalize on an (H, W, C) uint8 array; returns (C, H, W)."""
        if self.do_resize:
            arr = _resize(arr, self._output_size(arr.shape[:2]), self.resample)
        if self.do_center_crop:
            arr = _center_crop(arr, self.crop_size["height"], self.crop_size["width"])
        out = arr
        if self.do_rescale:
            # transformers upcasts to float64 for the multiply and stores float32.
            out = (out.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            out = out.astype(np.float32, copy=False)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            std = np.asarray(self.image_std, dtype=np.float32)
            out = (out - mean) / std
        return np.ascontiguousarray(out.astype(np.float32, copy=False).transpose(2, 0, 1))

    def _output_size(self, hw: tuple[int, int]) -> tuple[int, int]:
        """Resize target (H, W): `shortest_edge` keeps the aspect ratio (long side truncated), as
        transformers' `get_resize_output_image_size(default_to_square=False)`."""
        if self.size.get("shortest_edge"):
            short_side = self.size["shortest_edge"]
            h, w = hw
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(short_side * long / short)
            return (new_long, short_side) if w <= h else (short_side, new_long)
        return self.size["height"], self.size["width"]

    def preprocess_anyres(self, image, pinpoints_hw=None) -> np.ndarray:
        """transformers' `LlavaNextImageProcessor` on one image -> (1 + rows*cols, 3, H, W) float32.

        Base image: the whole image resized to (size, size), squashed; then the image is resized into the
        best pinpoint keeping its aspect ratio, zero-padded (centred) and cut into crop-size patches.
        Every piece then goes through the usual resize / crop / rescale / normalize.
        """
        pinpoints = pinpoints_from_hf(pinpoints_hw if pinpoints_hw is not None else self.image_grid_pinpoints)
        arr = _to_rgb_array(image, self.do_convert_rgb)
        best = select_best_resolution(arr.shape[:2], pinpoints)
        resized = _resize(arr, resize_for_patching_hw(arr.shape[:2], best), self.resample)
        padded = _pad_centered(resized, best)
        if self.size.get("height") and self.size.get("width"):
            base_hw = (self.size["height"], self.size["width"])
        else:
            base_hw = (self.size["shortest_edge"], self.size["shortest_edge"])
        if self.crop_size.get("height"):
            step = self.crop_size["height"]
        else:
            step = self.size.get("height") or self.size["shortest_edge"]
        pieces = [_resize(arr, base_hw, self.resample)]
        pieces += [padded[i : i + step, j : j + step] for i in range(0, best[0], step) for j in range(0, best[1], step)]
        return np.stack([self._transform(p) for p in pieces])


# ---------------------------------------------------------------------- helpers (arrays are (H, W, C) uint8)


def _size_dict(size, key: str) -> dict[str, int]:
    if isinstance(size, int):
        return {"shortest_edge": size} if key == "shortest_edge" else {"height": size, "width": size}
    if isinstance(size, (list, tuple)):
        return {"height": int(size[0]), "width": int(size[1])}
    size = {k: int(v) for k, v in dict(size).items() if v is not None}
    if "shortest_edge" not in size and not ("height" in size and "width" in size):
        raise ValueError(f"size must have 'shortest_edge' or 'height' and 'width', got {size}")
    return size


def _type_from_feature_extractor(config: dict[str, Any]) -> str:
    # Old configs (openai/clip-vit-large-patch14-336, used by LLaVA-1.5) name a feature extractor instead.
    name = config.get("feature_extractor_type") or "CLIPImageProcessor"
    return name.replace("FeatureExtractor", "ImageProcessor")


def _to_rgb_array(image, do_convert_rgb: bool) -> np.ndarray:
    """PIL image or array -> (H, W, C) uint8. RGB conversion composites transparency onto white, as
    transformers 5's `convert_to_rgb` (not a plain `.convert("RGB")`, which keeps the hidden colours)."""
    if isinstance(image, torch.Tensor):
        image = image.numpy()
    if isinstance(image, np.ndarray):
        arr = image if image.ndim == 3 else image[:, :, None]
        if arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.dtype != np.uint8:
            raise TypeError(f"array images must be uint8, got {arr.dtype}")
        if do_convert_rgb:
            if arr.shape[-1] == 1:
                arr = np.repeat(arr, 3, axis=-1)
            elif arr.shape[-1] == 4:
                alpha = arr[..., 3:4] / 255
                arr = np.round(alpha * arr[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return arr
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 array, got {type(image).__name__}")
    if do_convert_rgb:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba).convert("RGB")
        else:
            image = image.convert("RGB")
    arr = np.array(image)
    return arr if arr.ndim == 3 else arr[:, :, None]


def _resize(arr: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    squeeze = arr.shape[-1] == 1
    img = Image.fromarray(arr[..., 0] if squeeze else arr)
    out = np.array(img.resize((int(hw[1]), int(hw[0])), resample=resample))
    return out[:, :, None] if out.ndim == 2 else out


def _center_crop(arr: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """Centre crop; an image smaller than the crop is zero-padded first (transformers' `center_crop`)."""
    h, w = arr.shape[:2]
    top, left = (h - crop_h) // 2, (w - crop_w) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + crop_h, left : left + crop_w]
    new_h, new_w = max(crop_h, h), max(crop_w, w)
    canvas = np.zeros((new_h, new_w, arr.shape[2]), dtype=arr.dtype)
    top_pad, left_pad = -(-(new_h - h) // 2), -(-(new_w - w) // 2)  # ceil
    canvas[top_pad : top_pad + h, left_pad : left_pad + w] = arr
    top, left = top + top_pad, left + left_pad
    return canvas[max(0, top) : min(new_h, top + crop_h), max(0, left) : min(new_w, left + crop_w)]


def _pad_centered(arr: np.ndarray, target_hw: tuple[int, int]) -> np.ndarray:
    """Zero-pad to `target_hw`, content centred (the odd pixel goes after), as both upstreams do."""
    h, w = arr.shape[:2]
    top, left = (target_hw[0] - h) // 2, (target_hw[1] - w) // 2
    out = np.zeros((target_hw[0], target_hw[1], arr.shape[2]), dtype=arr.dtype)
    out[top : top + h, left : left + w] = arr
    return out


def _pad_to_square(arr: np.ndarray, color: tuple[int, ...]) -> np.ndarray:
    h, w = arr.shape[:2]
    if h == w:
        return arr
    side = max(h, w)
    out = np.empty((side, side, arr.shape[2]), dtype=arr.dtype)
    out[...] = np.asarray(color[: arr.shape[2]], dtype=arr.dtype)
    if w > h:
        out[(side - h) // 2 : (side - h) // 2 + h] = arr
    else:
        out[:, (side - w) // 2 : (side - w) // 2 + w] = arr
    return out


def _as_tensors(data: dict[str, list], return_tensors: str | None) -> dict[str, Any]:
    if return_tensors is None:
        return data
    if return_tensors == "np":
        return {k: np.stack([np.asarray(v) for v in vs]) for k, vs in data.items()}
    if return_tensors == "pt":
        out = {}
        for k, vs in data.items():
            shapes = {np.shape(v) for v in vs}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {k} of different shapes {sorted(shapes)}; use return_tensors=None")
            out[k] = torch.from_numpy(np.stack([np.asarray(v) for v in vs]))
        return out
    raise ValueError(f"unsupported return_tensors {return_tensors!r} (use 'pt', 'np' or None)")
