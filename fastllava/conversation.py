"""Conversation templates: LLaVA's prompt formats, byte for byte.

A drop-in for LLaVA 1.2.x's `llava/conversation.py` (the `llava-torch==1.2.2.post1` release): the same
`SeparatorStyle`, `Conversation`, `conv_templates` and `default_conversation`, so that a prompt built here is
exactly the string LLaVA builds, for every template and message shape, and so the same token ids reach the
model. Two LLaVA bugs are fixed (see `Conversation.get_prompt`); everything else is matched on purpose,
quirks included, because the checkpoints were trained on those strings.

    from fastllava.conversation import conv_templates, guess_conv_mode
    conv = conv_templates[guess_conv_mode("llava-v1.5-7b")].copy()
    conv.append_message(conv.roles[0], "<image>\\nWhat is shown in this image?")
    conv.append_message(conv.roles[1], None)  # None: the model answers next
    prompt = conv.get_prompt()

Messages are `str`, `None` (the turn the model is to generate), or the web UI's
`(text, PIL.Image, image_process_mode)` tuples. `apply_chat_template` renders a conversation through a
llava-hf checkpoint's own jinja `chat_template` instead.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Sequence
from enum import Enum, auto
from io import BytesIO
from typing import Any

from PIL import Image

from fastllava.mm_utils import expand2square

IMAGE_PLACEHOLDER = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN as it appears in prompt text


class SeparatorStyle(Enum):
    """How turns are joined into a prompt (LLaVA's members, in LLaVA's order).

    LLaVA 1.2.x has no CHATML style: its ChatML templates (`mpt`, `chatml_direct`) use MPT, whose roles
    already carry the `<|im_start|>` markers.
    """

    SINGLE = auto()  # "{system}###Human: {msg}###Assistant: {msg}###" (LLaVA v0)
    TWO = auto()  # "{system} USER: {msg} ASSISTANT: {msg}</s>" (Vicuna v1 / LLaVA v1.5)
    MPT = auto()  # "{system}<|im_end|>{role}{msg}<|im_end|>" (ChatML)
    PLAIN = auto()  # messages only, no roles (pretraining / projector alignment)
    LLAMA_2 = auto()  # "<s>[INST] <<SYS>>...<</SYS>>\n\n{msg} [/INST] {msg} </s>" (Llama-2, Mistral)


# Padding colour of the web UI's "Pad" mode: LLaVA's CLIP image mean, (0.48145466, 0.4578275, 0.40821073) * 255.
PAD_COLOR = (122, 116, 104)

# "Resize" squashes to the CLIP-L/14-336 input size, as LLaVA does.
RESIZE_TO = (336, 336)


def _message_text(message: Any) -> str:
    """The text of a message: a web-UI tuple `(text, image, mode)` contributes its text."""
    return message[0] if isinstance(message, tuple) else message


@dataclasses.dataclass
class Conversation:
    """A conversation under one prompt template: system prompt, roles, separators and the messages so far.

    Field names, defaults and semantics are LLaVA's. `messages` holds `[role, message]` pairs; a template's
    own `messages` is a tuple so that a template cannot be appended to by mistake: call `copy()` first.
    `offset` is how many leading messages are few-shot examples: they go into the prompt but not into
    `get_images` / `to_gradio_chatbot`.
    """

    system: str
    roles: Sequence[str]
    messages: Sequence[Sequence[Any]]
    offset: int
    sep_style: SeparatorStyle = SeparatorStyle.SINGLE
    sep: str = "###"
    sep2: str | None = None
    version: str = "Unknown"

    skip_next: bool = False  # set by the web UI when a turn should not be sent to the model

    # ----------------------------------------------------------------------------------------------- prompt

    def get_prompt(self) -> str:
        """The prompt text for the conversation so far, byte-identical to LLaVA's `get_prompt()`.

        A message that is `None` (or any falsy value, as in LLaVA) is the turn still to be generated: only
        its role header is written. Fixes over LLaVA, both noted where they happen:
        - PLAIN with a completed turn: LLaVA concatenates `sep2`, which is None, and raises TypeError.
        - LLAMA_2: LLaVA's `lstrip(sep)` strips a character set; only the `sep` prefix is removed here.
        """
        messages = self._messages_for_prompt()
        render = _RENDERERS.get(self.sep_style)
        if render is None:
            raise ValueError(f"Invalid style: {self.sep_style}")
        return render(self, messages)

    def _messages_for_prompt(self) -> list[tuple[str, str | None]]:
        """`(role, text or None)` pairs, with LLaVA's rewrite of a web-UI image turn at the start.

        When the first message is a `(text, image, mode)` tuple (the web UI's upload), LLaVA drops every
        `<image>` the user typed and puts exactly one where the model was trained to see it: first in the
        turn, or, for the `*_mmtag` templates, as a separate `<Image><image></Image>` exchange before it.
        Tuples later in the conversation keep their text as is (LLaVA sends one image per conversation).
        """
        pairs: list[tuple[str, Any]] = [(role, message) for role, message in self.messages]
        if pairs and isinstance(pairs[0][1], tuple):
            role, (text, *_) = pairs[0]
            text = text.replace(IMAGE_PLACEHOLDER, "").strip()
            if "mmtag" in self.version:
                pairs[0] = (role, text)
                pairs[0:0] = [(self.roles[0], "<Image><image></Image>"), (self.roles[1], "Received.")]
            else:
                pairs[0] = (role, IMAGE_PLACEHOLDER + "\n" + text)
        # LLaVA tests `if message:` on the message itself, so a tuple counts as present even with empty text,
        # while "" counts as a pending turn, like None.
        return [(role, _message_text(message) if message else None) for role, message in pairs]

    def _render_single(self, messages: list[tuple[str, str | None]]) -> str:
        ret = self.system + self.sep
        for role, text in messages:
            ret += f"{role}: {text}{self.sep}" if text is not None else f"{role}:"
        return ret

    def _render_two(self, messages: list[tuple[str, str | None]]) -> str:
        # Parity is by position, not role, as in LLaVA: user turns end in `sep`, assistant turns in `sep2`.
        seps = (self.sep, self.sep2)
        ret = self.system + seps[0]
        for i, (role, text) in enumerate(messages):
            ret += f"{role}: {text}{seps[i % 2]}" if text is not None else f"{role}:"
        return ret

    def _render_mpt(self, messages: list[tuple[str, str | None]]) -> str:
        # Roles carry their own "<|im_start|>role\n" header, so no ": " between role and text.
        ret = self.system + self.sep
        for role, text in messages:
            ret += f"{role}{text}{self.sep}" if text is not None else role
        return ret

    def _render_llama_2(self, messages: list[tuple[str, str | None]]) -> str:
        ret = ""
        for i, (role, text) in enumerate(messages):
            if i == 0:
                # LLaVA asserts these; a ValueError survives `python -O`.
                if text is None:
                    raise ValueError("first message should not be none")
                if role != self.roles[0]:
                    raise ValueError("first message should come from user")
            if text is None:
                continue
            if i == 0 and self.system:
                # An empty system prompt (mistral_instruct) gets no <<SYS>> block at all.
                text = f"<<SYS>>\n{self.system}\n<</SYS>>\n\n{text}"
            if i % 2 == 0:
                ret += f"{self.sep}[INST] {text} [/INST]"
            else:
                ret += f" {text} {self.sep2}"
        # Fix (b): LLaVA does `ret.lstrip(self.sep)`, which strips any leading '<', 's' or '>' characters rather
        # than the "<s>" prefix. The prompt always starts "<s>[INST]", so the output is the same; removing the
        # prefix once is what was meant (the tokenizer adds BOS itself).
        return ret.removeprefix(self.sep)

    def _render_plain(self, messages: list[tuple[str, str | None]]) -> str:
        # Fix (a): LLaVA terminates odd-position turns with `sep2`, which is None in the `plain` template, so any
        # completed turn raised TypeError. A missing `sep2` falls back to `sep`: every turn ends in "\n", as in
        # LLaVA's pretraining data (`preprocess_plain`: image + caption + sep).
        seps = (self.sep, self.sep2 if self.sep2 is not None else self.sep)
        ret = self.system
        for i, (_, text) in enumerate(messages):
            if text is not None:
                ret += text + seps[i % 2]
        return ret

    # ----------------------------------------------------------------------------------------------- editing

    def append_message(self, role: str, message: Any) -> None:
        """Append a `[role, message]` pair; `message` is a str, None, or `(text, image, image_process_mode)`."""
        self.messages.append([role, message])

    def copy(self) -> Conversation:
        """A copy whose message list can be appended to without touching this one (or a template).

        Like LLaVA, pairs are new lists but messages (and their images) are shared, and `skip_next` resets.
        """
        return Conversation(
            system=self.system,
            roles=self.roles,
            messages=[[role, message] for role, message in self.messages],
            offset=self.offset,
            sep_style=self.sep_style,
            sep=self.sep,
            sep2=self.sep2,
            version=self.version,
        )

    def dict(self) -> dict[str, Any]:
        """A JSON-able view (the web UI logs it): images dropped, each tuple message replaced by its text.

        LLaVA replaces tuples only when `get_images()` finds an image at a user position after `offset`,
        and returns PIL images otherwise; here every tuple is replaced, which is the same where LLaVA works.
        """
        return {
            "system": self.system,
            "roles": self.roles,
            "messages": [[role, _message_text(message)] for role, message in self.messages],
            "offset": self.offset,
            "sep": self.sep,
            "sep2": self.sep2,
        }

    # ----------------------------------------------------------------------------------------------- images

    def process_image(
        self,
        image: Image.Image,
        image_process_mode: str,
        return_pil: bool = False,
        image_format: str = "PNG",
        max_len: int = 1344,
        min_len: int = 672,
    ) -> Image.Image | str:
        """Prepare a web-UI image for the worker: LLaVA's mode, then a cap on its size.

        Modes: "Pad" (to a square, `expand2square`), "Resize" (to 336x336), "Crop" and "Default" (as is).
        An image whose long edge exceeds `max_len` is scaled, keeping its aspect ratio, so that its short
        edge is at most `min_len` and its long edge at most `max_len` (LLaVA's arithmetic, int truncation
        included). Returns the PIL image, or its base64 `image_format` encoding.
        """
        if image_process_mode == "Pad":
            image = expand2square(image, PAD_COLOR)
        elif image_process_mode in ("Default", "Crop"):
            pass  # LLaVA leaves cropping to the model's image processor
        elif image_process_mode == "Resize":
            image = image.resize(RESIZE_TO)
        else:
            raise ValueError(f"Invalid image_process_mode: {image_process_mode}")

        if max(image.size) > max_len:
            long_side, short_side = max(image.size), min(image.size)
            aspect_ratio = long_side / short_side
            # (`short_side` never binds once the long side exceeds max_len; kept as LLaVA wrote it.)
            shortest_edge = int(min(max_len / aspect_ratio, min_len, short_side))
            longest_edge = int(shortest_edge * aspect_ratio)
            width, height = image.size
            if height > width:
                image = image.resize((shortest_edge, longest_edge))
            else:
                image = image.resize((longest_edge, shortest_edge))

        if return_pil:
            return image
        if image_format.upper() in ("JPEG", "JPG") and image.mode not in ("RGB", "L", "CMYK"):
            # LLaVA raises OSError for RGBA/P uploads here (the chatbot view saves JPEG); JPEG has no alpha.
            image = image.convert("RGB")
        buffered = BytesIO()
        image.save(buffered, format=image_format)
        return base64.b64encode(buffered.getvalue()).decode()

    def _user_images(self) -> list[tuple[str, Image.Image, str]]:
        """The `(text, image, mode)` tuples at user positions, after the few-shot `offset`."""
        return [
            message
            for i, (_, message) in enumerate(self.messages[self.offset :])
            if i % 2 == 0 and isinstance(message, tuple)
        ]

    def get_images(self, return_pil: bool = False, image_format: str = "PNG") -> list[Image.Image | str]:
        """The conversation's images, each through `process_image` with its own mode: PIL or base64."""
        return [
            self.process_image(image, mode, return_pil=return_pil, image_format=image_format)
            for _, image, mode in self._user_images()
        ]

    def to_gradio_chatbot(self) -> list[list[str | None]]:
        """`[user, assistant]` pairs for a gradio Chatbot; an uploaded image is shown inline as a JPEG."""
        ret: list[list[str | None]] = []
        for i, (_, message) in enumerate(self.messages[self.offset :]):
            if i % 2 == 0:
                if isinstance(message, tuple):
                    text, image, _ = message
                    b64 = self.process_image(image, "Default", return_pil=False, image_format="JPEG")
                    img_tag = f'<img src="data:image/jpeg;base64,{b64}" alt="user upload image" />'
                    message = img_tag + text.replace(IMAGE_PLACEHOLDER, "").strip()
                ret.append([message, None])
            else:
                ret[-1][-1] = message
        return ret


_RENDERERS = {
    SeparatorStyle.SINGLE: Conversation._render_single,
    SeparatorStyle.TWO: Conversation._render_two,
    SeparatorStyle.MPT: Conversation._render_mpt,
    SeparatorStyle.LLAMA_2: Conversation._render_llama_2,
    SeparatorStyle.PLAIN: Conversation._render_plain,
}


# --------------------------------------------------------------------------------------------------- templates
# Strings are LLaVA's verbatim, odd spacing included ("safe.  Your", "language.The visual"): the released
# checkpoints were fine-tuned on them.

_VICUNA_V0_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
_MMTAG_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant is able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
    "The visual content will be provided with the following format: <Image>visual content</Image>."
)

conv_vicuna_v0 = Conversation(
    system=_VICUNA_V0_SYSTEM,
    roles=("Human", "Assistant"),
    # One worked example, shown to the model in every prompt; offset=2 keeps it out of the chat view.
    messages=(
        ("Human", "What are the key differences between renewable and non-renewable energy sources?"),
        (
            "Assistant",
            "Renewable energy sources are those that can be replenished naturally in a relatively "
            "short amount of time, such as solar, wind, hydro, geothermal, and biomass. "
            "Non-renewable energy sources, on the other hand, are finite and will eventually be "
            "depleted, such as coal, oil, and natural gas. Here are some key differences between "
            "renewable and non-renewable energy sources:\n"
            "1. Availability: Renewable energy sources are virtually inexhaustible, while non-renewable "
            "energy sources are finite and will eventually run out.\n"
            "2. Environmental impact: Renewable energy sources have a much lower environmental impact "
            "than non-renewable sources, which can lead to air and water pollution, greenhouse gas emissions, "
            "and other negative effects.\n"
            "3. Cost: Renewable energy sources can be more expensive to initially set up, but they typically "
            "have lower operational costs than non-renewable sources.\n"
            "4. Reliability: Renewable energy sources are often more reliable and can be used in more remote "
            "locations than non-renewable sources.\n"
            "5. Flexibility: Renewable energy sources are often more flexible and can be adapted to different "
            "situations and needs, while non-renewable sources are more rigid and inflexible.\n"
            "6. Sustainability: Renewable energy sources are more sustainable over the long term, while "
            "non-renewable sources are not, and their depletion can lead to economic and social instability.\n",
        ),
    ),
    offset=2,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_vicuna_v1 = Conversation(
    system="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llama_2 = Conversation(
    system="You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
    "while being safe.  Your answers should not include any harmful, unethical, racist, sexist, toxic, "
    "dangerous, or illegal content. Please ensure that your responses are socially unbiased and positive "
    "in nature.\n\nIf a question does not make any sense, or is not factually coherent, explain why instead "
    "of answering something not correct. If you don't know the answer to a question, please don't share "
    "false information.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_llava_llama_2 = Conversation(
    system="You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="<s>",
    sep2="</s>",
)

conv_mpt = Conversation(
    system="<|im_start|>system\n"
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

conv_llava_plain = Conversation(
    system="",
    roles=("", ""),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.PLAIN,
    sep="\n",
)

conv_llava_v0 = Conversation(
    system=_VICUNA_V0_SYSTEM,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
)

conv_llava_v0_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("Human", "Assistant"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.SINGLE,
    sep="###",
    version="v0_mmtag",
)

conv_llava_v1 = Conversation(
    # LLaVA-1.5 keeps Vicuna v1's format but says "human" where Vicuna says "user".
    system=_VICUNA_V0_SYSTEM,
    roles=("USER", "ASSISTANT"),
    version="v1",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
)

conv_llava_v1_mmtag = Conversation(
    system=_MMTAG_SYSTEM,
    roles=("USER", "ASSISTANT"),
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.TWO,
    sep=" ",
    sep2="</s>",
    version="v1_mmtag",
)

conv_mistral_instruct = Conversation(
    # Mistral-Instruct has no system prompt; "" also drops the <<SYS>> block and the "<s>" (the tokenizer adds BOS).
    system="",
    roles=("USER", "ASSISTANT"),
    version="llama_v2",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.LLAMA_2,
    sep="",
    sep2="</s>",
)

conv_chatml_direct = Conversation(
    # LLaVA-NeXT 34B (Nous-Hermes-2-Yi): ChatML, asking for direct answers.
    system="<|im_start|>system\nAnswer the questions.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
    version="mpt",
    messages=(),
    offset=0,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
)

# LLaVA's default is Vicuna v1 while its "default" key is Vicuna v0; both kept as they are.
default_conversation = conv_vicuna_v1
conv_templates: dict[str, Conversation] = {
    "default": conv_vicuna_v0,
    "v0": conv_vicuna_v0,
    "v1": conv_vicuna_v1,
    "vicuna_v1": conv_vicuna_v1,
    "llama_2": conv_llama_2,
    "mistral_instruct": conv_mistral_instruct,
    "chatml_direct": conv_chatml_direct,
    "mistral_direct": conv_chatml_direct,  # sic: LLaVA maps it to the ChatML template
    "plain": conv_llava_plain,
    "v0_plain": conv_llava_plain,
    "llava_v0": conv_llava_v0,
    "v0_mmtag": conv_llava_v0_mmtag,
    "llava_v1": conv_llava_v1,
    "v1_mmtag": conv_llava_v1_mmtag,
    "llava_llama_2": conv_llava_llama_2,
    "mpt": conv_mpt,
}


def guess_conv_mode(model_name: str) -> str:
    """The template LLaVA's CLI picks from a model name (`llava/serve/cli.py`); first match wins."""
    name = model_name.lower()
    if "llama-2" in name:
        return "llava_llama_2"
    if "mistral" in name:
        return "mistral_instruct"
    if "v1.6-34b" in name:
        return "chatml_direct"
    if "v1" in name:  # also matches v1.5 and v1.6
        return "llava_v1"
    if "mpt" in name:
        return "mpt"
    return "llava_v0"


# ------------------------------------------------------------------------------------------- HF chat templates


def _chat_template_owner(tokenizer_or_processor: Any) -> Any | None:
    """The object whose `apply_chat_template` renders with a template: a processor's own, else its tokenizer's."""
    if getattr(tokenizer_or_processor, "chat_template", None):
        return tokenizer_or_processor
    tokenizer = getattr(tokenizer_or_processor, "tokenizer", None)
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer
    return None


def _content_parts(message: Any) -> list[dict[str, str]]:
    """HF content parts for one message: `{"type": "image"}` and `{"type": "text", "text": ...}`.

    A web-UI tuple carries one image, placed first as `get_prompt` does; in a plain string each `<image>`
    becomes an image part where it stands. Text is stripped: the templates write their own "\\n" after an image.
    """
    if isinstance(message, tuple):
        text = message[0].replace(IMAGE_PLACEHOLDER, "").strip()
        return [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
    parts: list[dict[str, str]] = []
    for i, chunk in enumerate(message.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append({"type": "image"})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk.strip()})
    return parts


def conversation_to_chat_messages(conv: Conversation, include_system: bool = False) -> list[dict[str, Any]]:
    """The conversation as HF chat messages (`role` "user"/"assistant", content parts); pending turns dropped."""
    role_names = {conv.roles[0]: "user", conv.roles[1]: "assistant"}
    messages: list[dict[str, Any]] = []
    if include_system and conv.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": conv.system}]})
    for role, message in conv.messages:
        if not message:  # the turn to generate (LLaVA's falsy test): add_generation_prompt stands for it
            continue
        if role not in role_names:
            raise ValueError(f"role {role!r} is not one of the conversation's roles {tuple(conv.roles)}")
        messages.append({"role": role_names[role], "content": _content_parts(message)})
    return messages


def apply_chat_template(tokenizer_or_processor: Any, conv: Conversation, include_system: bool = False) -> str | None:
    """Render `conv` through a llava-hf checkpoint's jinja `chat_template`; None when it carries none.

    `tokenizer_or_processor` is a HF tokenizer or processor (a processor without a template of its own falls
    back to its tokenizer's). When the last message is pending (None), the template's generation prompt is
    added. LLaVA's system prompt is left out by default: the llava-hf templates define the checkpoint's
    format themselves and the llava-1.5 ones have none.
    """
    owner = _chat_template_owner(tokenizer_or_processor)
    if owner is None:
        return None
    add_generation_prompt = bool(conv.messages) and not conv.messages[-1][1]
    return owner.apply_chat_template(
        conversation_to_chat_messages(conv, include_system=include_system),
        add_generation_prompt=add_generation_prompt,
        tokenize=False,
    )


__all__ = [
    "SeparatorStyle",
    "Conversation",
    "conv_templates",
    "default_conversation",
    "expand2square",
    "guess_conv_mode",
    "apply_chat_template",
    "conversation_to_chat_messages",
]
