"""Chat with a LLaVA model in the terminal, like LLaVA's ``llava.serve.cli``.

    python -m serve.cli --model-path DIR --image-file cat.png              # interactive, multi-turn
    python -m serve.cli --model-path DIR --image-file cat.png --query "What is it?"   # one shot, for scripts

The conversation mode is guessed from the model name as LLaVA does (``--conv-mode`` overrides); llava-hf
checkpoints that carry a chat template use it. Answers stream token by token.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.conversation import conv_templates, guess_conv_mode
from fastllava.image_io import ImageLoadError, load_image
from fastllava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
from fastllava.prompting import render, template, template_stop, with_image


class TextStreamer:
    """Prints decoded text as tokens arrive (the ``put``/``end`` protocol of ``LlavaModel.generate``).

    Decodes the whole answer each time and prints the new suffix, holding back text that ends in an
    incomplete UTF-8 sequence, so multi-byte characters are never split.
    """

    def __init__(self, tokenizer, out=sys.stdout) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, ids: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(i) for i in ids.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", required=True)
    p.add_argument("--model-base", default=None)
    p.add_argument("--image-file", default=None, help="a local image (optional: text-only chat without it)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--conv-mode", default=None)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--load-8bit", action="store_true")
    p.add_argument("--load-4bit", action="store_true")
    p.add_argument("--attn-implementation", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--query", default=None, help="ask this once, print the answer and exit (non-interactive)")
    p.add_argument("--debug", action="store_true", help="print the prompt and the raw output")
    args = p.parse_args(argv)
    if args.max_new_tokens <= 0:
        p.error(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        p.error(f"--temperature must be >= 0, got {args.temperature}")
    return args


class Chat:
    """One conversation: history, prompt building, and a generate call per turn."""

    def __init__(self, tokenizer, model, image_processor, conv_mode: str, image=None, args=None) -> None:
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.conv = template(conv_mode)
        self.args = args
        self.image = image
        self.image_tensor = process_images([image], image_processor, model.config) if image is not None else None
        self.image_pending = image is not None

    def prompt_for(self, text: str) -> str:
        if self.image_pending:  # the image goes with the first question, as in LLaVA's CLI
            text = with_image(text, self.model.config.mm_use_im_start_end)
            self.image_pending = False
        self.conv.append_message(self.conv.roles[0], text)
        self.conv.append_message(self.conv.roles[1], None)
        return render(self.conv, self.tokenizer)

    def ask(self, text: str, streamer=None) -> str:
        prompt = self.prompt_for(text)
        ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
        images, sizes = None, None
        if self.image_tensor is not None:
            images = self.image_tensor
            sizes = [self.image.size]  # LLaVA's images= call: PIL's (W, H) for every checkpoint layout
        stop = template_stop(self.conv)
        a = self.args
        out = self.model.generate(
            ids.to(self.model.device),
            images=images,
            image_sizes=sizes,
            do_sample=a.temperature > 0,
            temperature=a.temperature,
            top_p=a.top_p,
            max_new_tokens=a.max_new_tokens,
            stop_strings=[stop] if stop else None,
            tokenizer=self.tokenizer,
            seed=a.seed,
            streamer=streamer,
        )
        answer = self.tokenizer.decode(out[0], skip_special_tokens=True)
        if stop and stop in answer:
            answer = answer[: answer.index(stop)]
        answer = answer.strip()
        self.conv.messages[-1][-1] = answer
        if a.debug:
            print({"prompt": prompt, "outputs": answer}, file=sys.stderr)
        return answer


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from fastllava.model.builder import load_pretrained_model

    image = None
    if args.image_file:
        try:
            image = load_image(args.image_file)
        except ImageLoadError as e:
            print(f"error: --image-file: {e}", file=sys.stderr)
            return 2
    model_name = get_model_name_from_path(args.model_path)
    tokenizer, model, image_processor, _ = load_pretrained_model(
        args.model_path,
        args.model_base,
        model_name,
        args.load_8bit,
        args.load_4bit,
        device=args.device,
        attn_implementation=args.attn_implementation,
    )
    conv_mode = guess_conv_mode(model_name)
    if args.conv_mode is not None and args.conv_mode != conv_mode:
        print(f"[WARNING] the auto inferred conversation mode is {conv_mode}, using --conv-mode {args.conv_mode}")
        conv_mode = args.conv_mode
    if conv_mode not in conv_templates:
        print(f"error: --conv-mode {conv_mode!r} is unknown; choose from {sorted(conv_templates)}", file=sys.stderr)
        return 2
    chat = Chat(tokenizer, model, image_processor, conv_mode, image, args)
    roles = chat.conv.roles
    if args.query is not None:
        print(chat.ask(args.query))
        return 0
    while True:
        try:
            text = input(f"{roles[0]}: ")
        except EOFError:
            text = ""
        if not text:
            print("exit...")
            return 0
        print(f"{roles[1]}: ", end="", flush=True)
        chat.ask(text, streamer=TextStreamer(tokenizer))


if __name__ == "__main__":
    sys.exit(main())
