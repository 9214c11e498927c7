"""LLaVA's multimodal helpers (`llava/mm_utils.py`) under LLaVA's names, so ported code reads the same.

    ids = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")    # <image> -> IMAGE_TOKEN_INDEX
    pixels = process_images(images, image_processor, model_config)        # "pad" / "anyres" / default
    stop = StopStrings([conv.sep2], tokenizer); stop.check(new_ids); stop.trim(text)

Differences from LLaVA, on purpose:
- `model_config.image_grid_pinpoints` is in fastllava's (height, width) order (see `fastllava.anyres`);
  convert a LLaVA config.json value with `pinpoints_from_llava` and a llava-hf one with `pinpoints_from_hf`.
- anyres follows the processor's `convention`: "llava" runs LLaVA's `process_anyres_image`, "hf" runs
  transformers' `LlavaNextImageProcessor` (bit-identical to it).
- `StopStrings` is the stop-string check of our generate loop and engine; `KeywordsStoppingCriteria` (LLaVA's
  name and call, for `generate(stopping_criteria=[...])` here or in transformers) runs it on each row.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence

import torch
from PIL import Image, ImageColor

from fastllava.anyres import resize_for_patching_hw, select_best_resolution
from fastllava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from fastllava.image_io import ImageLoadError, load_image
from fastllava.image_processing import ImageProcessor

__all__ = [
    "tokenizer_image_token",
    "get_model_name_from_path",
    "load_image_from_base64",
    "expand2square",
    "resize_and_pad_image",
    "divide_to_patches",
    "process_anyres_image",
    "process_images",
    "as_image_processor",
    "StopStrings",
    "KeywordsStoppingCriteria",
]


def tokenizer_image_token(
    prompt: str, tokenizer, image_token_index: int = IMAGE_TOKEN_INDEX, return_tensors: str | None = None
):
    """Tokenize `prompt` with every `<image>` replaced by one `image_token_index`, exactly as LLaVA does.

    Each text chunk is tokenized on its own. If the first chunk starts with BOS, BOS is kept once and the
    first token of *every* chunk is dropped (LLaVA's `offset` trick: it assumes the tokenizer prepends BOS
    to each chunk, and drops whatever comes first either way).
    """
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split(DEFAULT_IMAGE_TOKEN)]
    input_ids: list[int] = []
    offset = 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        input_ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i > 0:
            input_ids.append(image_token_index)
        input_ids.extend(chunk[offset:])
    if return_tensors is None:
        return input_ids
    if return_tensors == "pt":
        return torch.tensor(input_ids, dtype=torch.long)
    raise ValueError(f"Unsupported tensor type: {return_tensors}")


def get_model_name_from_path(model_path: str) -> str:
    """Last path component; `<run>_checkpoint-N` for a `checkpoint-N` folder (LLaVA's naming)."""
    parts = model_path.strip("/").split("/")
    if parts[-1].startswith("checkpoint-") and len(parts) > 1:
        return parts[-2] + "_" + parts[-1]
    return parts[-1]


def load_image_from_base64(image: str, **kwargs) -> Image.Image:
    """LLaVA's helper, through the safe loader (`fastllava.image_io.load_image`); returns RGB."""
    if image.lstrip()[:5].lower() == "data:":
        return load_image(image, **kwargs)
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageLoadError(f"invalid base64 image: {exc}") from exc
    return load_image(data, **kwargs)


def expand2square(pil_img: Image.Image, background_color) -> Image.Image:
    """Pad to a square with `background_color` (an RGB tuple, or a value in the image's mode), the image
    centred (LLaVA "pad" aspect ratio)."""
    width, height = pil_img.size
    if width == height:
        return pil_img
    fill = background_color
    if isinstance(background_color, tuple) and len(background_color) == 3:
        # LLaVA passes the RGB tuple straight to Image.new, which raises for single-band modes ("L", "I", "F");
        # ImageColor converts it to the image's mode and gives LLaVA's exact value for RGB/RGBA/P.
        fill = ImageColor.getcolor("rgb({}, {}, {})".format(*background_color), pil_img.mode)
    side = max(width, height)
    result = Image.new(pil_img.mode, (side, side), fill)
    result.paste(pil_img, ((side - width) // 2, (side - height) // 2))
    return result


def resize_and_pad_image(image: Image.Image, target_hw: Sequence[int]) -> Image.Image:
    """LLaVA's letterbox: resize keeping aspect (PIL's default filter, BICUBIC), pad black, centred."""
    target_h, target_w = int(target_hw[0]), int(target_hw[1])
    new_h, new_w = resize_for_patching_hw((image.height, image.width), (target_h, target_w))
    resized = image.resize((new_w, new_h))  # no resample argument: LLaVA relies on PIL's default
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def divide_to_patches(image: Image.Image, patch_size: int) -> list[Image.Image]:
    """Row-major `patch_size` squares (crops past the edge are black-filled by PIL)."""
    return [
        image.crop((j, i, j + patch_size, i + patch_size))
        for i in range(0, image.height, patch_size)
        for j in range(0, image.width, patch_size)
    ]


def process_anyres_image(image: Image.Image, processor, grid_pinpoints_hw) -> torch.Tensor:
    """One image -> (1 + rows*cols, 3, H, W): the whole image first, then the grid crops, row-major.

    `processor.convention == "llava"` (LLaVA's `process_anyres_image`): the base image is squashed to
    (size, size) by PIL's default filter and the letterbox is done on the PIL image; every piece then goes
    through the processor. `"hf"`: transformers' `LlavaNextImageProcessor` (the processor's `resample`
    for every resize, RGB conversion composited on white before anything else).
    """
    pinpoints = [tuple(p) for p in grid_pinpoints_hw]
    processor = as_image_processor(processor)
    if processor.convention == "hf":
        return torch.from_numpy(processor.preprocess_anyres(image, pinpoints))
    if image.mode != "RGB":
        image = image.convert("RGB")  # LLaVA's loaders always hand it RGB
    best_hw = select_best_resolution((image.height, image.width), pinpoints)
    patches = divide_to_patches(resize_and_pad_image(image, best_hw), processor.crop_size["height"])
    size = processor.size
    base_wh = (size["shortest_edge"],) * 2 if size.get("shortest_edge") else (size["width"], size["height"])
    base = image.resize(base_wh)
    return torch.stack([torch.from_numpy(processor.preprocess_one(p)) for p in [base, *patches]])


def as_image_processor(image_processor) -> ImageProcessor:
    """Ours as is; a transformers image processor object (`CLIPImageProcessor`, `SiglipImageProcessor`, their
    Pil/Fast variants, `LlavaNextImageProcessor` ...) as ours with the same settings (`to_dict()`), so it
    preprocesses bit for bit as transformers does."""
    if isinstance(image_processor, ImageProcessor):
        return image_processor
    if not callable(getattr(image_processor, "to_dict", None)):
        raise TypeError(
            f"image_processor must be fastllava's ImageProcessor or a transformers image processor, "
            f"got {type(image_processor).__name__}"
        )
    return ImageProcessor.from_dict(image_processor.to_dict())


def process_images(images: Sequence[Image.Image], image_processor, model_config):
    """LLaVA's `process_images`: a (B, ...) tensor when all results share a shape, else a list.

    `image_processor`: ours (what `load_pretrained_model` returns) or a transformers one, as LLaVA users pass.
    `model_config`: anything with `image_aspect_ratio` ("pad", "anyres", else plain) and, for anyres,
    `image_grid_pinpoints` in (H, W) order (falls back to the processor's own pinpoints).
    """
    image_processor = as_image_processor(image_processor)
    aspect = getattr(model_config, "image_aspect_ratio", None)
    if aspect == "pad":
        background = tuple(int(x * 255) for x in image_processor.image_mean)
        out = [torch.from_numpy(image_processor.preprocess_one(expand2square(im, background))) for im in images]
    elif aspect == "anyres":
        pinpoints = getattr(model_config, "image_grid_pinpoints", None) or image_processor.image_grid_pinpoints
        if not pinpoints:
            raise ValueError("image_aspect_ratio='anyres' needs image_grid_pinpoints (model config or processor)")
        out = [process_anyres_image(im, image_processor, pinpoints) for im in images]
    else:
        out = [torch.from_numpy(image_processor.preprocess_one(im)) for im in images]
    if out and all(x.shape == out[0].shape for x in out):
        return torch.stack(out)
    return out


class StopStrings:
    """Stop-string detection for our own generate loop (LLaVA's `KeywordsStoppingCriteria`, minus transformers).

    `check(ids)` is called with the ids generated so far (prompt excluded) and is True once the output
    ends with a keyword's token ids or the decoded tail contains a keyword. `trim(text)` cuts the text at
    the first keyword, as LLaVA's CLI strips the stop string from what it prints.
    """

    def __init__(self, keywords: Sequence[str], tokenizer):
        self.keywords = [k for k in keywords if k]
        self.tokenizer = tokenizer
        self.keyword_ids: list[list[int]] = []
        for keyword in self.keywords:
            ids = list(tokenizer(keyword).input_ids)
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(ids)
        # Decode enough of the tail to see a keyword however it was tokenized (>= 1 char per token).
        self.window = max([len(ids) for ids in self.keyword_ids] + [len(k) for k in self.keywords] + [1])

    def check(self, new_token_ids: Sequence[int]) -> bool:
        ids = [int(i) for i in new_token_ids]
        if not ids or not self.keywords:
            return False
        for kw_ids in self.keyword_ids:
            if kw_ids and ids[-len(kw_ids) :] == kw_ids:
                return True
        tail = self.tokenizer.decode(ids[-self.window :], skip_special_tokens=True)
        return any(keyword in tail for keyword in self.keywords)

    __call__ = check

    def trim(self, text: str) -> str:
        cuts = [text.find(k) for k in self.keywords if k in text]
        return text[: min(cuts)] if cuts else text


class KeywordsStoppingCriteria:
    """LLaVA's stopping criterion: ``KeywordsStoppingCriteria(keywords, tokenizer, input_ids)``, called by
    ``generate`` with the prompt + generated ids ``[B, L + n]``; True once *every* row's generated part ends
    with a keyword's ids or its decoded tail holds a keyword (LLaVA's rule, through `StopStrings`).

    A plain callable, so it goes in ``stopping_criteria=[...]`` of our ``generate`` and of transformers'.
    """

    def __init__(self, keywords: Sequence[str], tokenizer, input_ids: torch.Tensor):
        self.keywords = list(keywords)
        self.tokenizer = tokenizer
        self.start_len = input_ids.shape[1]
        self.stops = StopStrings(self.keywords, tokenizer)

    def __call__(self, output_ids: torch.Tensor, scores: torch.Tensor | None = None, **kwargs) -> bool:
        return all(self.stops.check(row[self.start_len :].tolist()) for row in output_ids)
