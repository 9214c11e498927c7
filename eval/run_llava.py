"""LLaVA's ``run_llava.py``: one query about one or more images, answered once and printed, with LLaVA's
arguments and prompt building (``<image-placeholder>`` in the query places the images; otherwise they go first).

    python -m eval.run_llava --model-path DIR --image-file a.png,b.png --query "What differs?" [--conv-mode M]

Differences from LLaVA, on purpose: ``--device`` (LLaVA needs CUDA); images are read by the safe loader
(``fastllava.image_io``: local files and data URLs, pixel cap; LLaVA also downloads http(s) URLs); the
pixels keep the model's dtype (LLaVA casts them to float16); ``--seed`` for sampling.
"""

from __future__ import annotations

import argparse
import re

import torch

from fastllava import load_pretrained_model
from fastllava.constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from fastllava.conversation import conv_templates, guess_conv_mode
from fastllava.image_io import load_image
from fastllava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from fastllava.prompting import image_tag, with_image


def image_parser(args: argparse.Namespace) -> list[str]:
    return args.image_file.split(args.sep)


def load_images(image_files: list[str]) -> list:
    return [load_image(f) for f in image_files]


def build_query(query: str, mm_use_im_start_end: bool) -> str:
    """LLaVA's: the image tag(s) where ``<image-placeholder>`` stands, else one tag before the query."""
    if IMAGE_PLACEHOLDER in query:
        return re.sub(IMAGE_PLACEHOLDER, image_tag(mm_use_im_start_end), query)
    return with_image(query, mm_use_im_start_end)


def eval_model(args: argparse.Namespace) -> str:
    """Load, ask, print and return the answer."""
    model_name = get_model_name_from_path(args.model_path)
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, model, image_processor, _ = load_pretrained_model(args.model_path, args.model_base, model_name,
                                                                 device=device)  # fmt: skip
    qs = build_query(args.query, model.config.mm_use_im_start_end)
    conv_mode = guess_conv_mode(model_name)
    if args.conv_mode is not None and conv_mode != args.conv_mode:
        print(f"[WARNING] the auto inferred conversation mode is {conv_mode}, while `--conv-mode` is "
              f"{args.conv_mode}, using {args.conv_mode}")  # fmt: skip
    else:
        args.conv_mode = conv_mode
    conv = conv_templates[args.conv_mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    images = load_images(image_parser(args))
    images_tensor = process_images(images, image_processor, model.config)
    images_tensor = (
        [t.to(model.device, model.dtype) for t in images_tensor]
        if isinstance(images_tensor, list)
        else images_tensor.to(model.device, model.dtype)
    )
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    output_ids = model.generate(
        input_ids.to(model.device),
        images=images_tensor,
        image_sizes=[im.size for im in images],
        do_sample=args.temperature > 0,
        temperature=args.temperature,
        top_p=args.top_p,
        num_beams=args.num_beams,
        max_new_tokens=args.max_new_tokens,
        seed=getattr(args, "seed", None),
    )
    outputs = tokenizer.batch_decode(output_ids, skip_special_tokens=True)[0].strip()
    print(outputs)
    return outputs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--image-file", required=True, help="one path, or several joined by --sep")
    p.add_argument("--query", required=True)
    p.add_argument("--conv-mode", default=None)
    p.add_argument("--sep", default=",")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top_p", type=float, default=None)
    p.add_argument("--num_beams", type=int, default=1)
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--seed", type=int, default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    eval_model(parse_args())
