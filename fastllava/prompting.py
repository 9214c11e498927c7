"""Prompts as LLaVA builds them: the image tag, a question with its image, chat messages -> prompt, the stop.

    prompt = question_prompt("llava_v1", "What is it?", image=True)      # LLaVA's model_vqa / eval prompt
    prompt = messages_prompt("llava_v1", [("user", [image, "What is it?"])], tokenizer)   # serving, chat
    stop = template_stop("llava_v1")                                      # "</s>": where an answer ends

The one place serving (``serve/backend.py``, ``serve/cli.py``), evaluation (``eval/runner.py``) and training data
(``fastllava/data/preprocess.py``) spell LLaVA's image tag (``<image>``, or ``<im_start><image><im_end>`` for
checkpoints trained with ``mm_use_im_start_end``) and the template's end-of-turn stop string. The prompts are
LLaVA's own, byte for byte (``tests/test_llava_*`` compare them with LLaVA's ``conversation.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

from fastllava.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
from fastllava.conversation import Conversation, SeparatorStyle, apply_chat_template, conv_templates


def image_tag(mm_use_im_start_end: bool = False) -> str:
    """What stands for one image in a prompt: ``<image>``, wrapped in ``<im_start>``/``<im_end>`` when the
    checkpoint was trained so (LLaVA's ``mm_use_im_start_end``)."""
    if mm_use_im_start_end:
        return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN
    return DEFAULT_IMAGE_TOKEN


def with_image(text: str, mm_use_im_start_end: bool = False) -> str:
    """A user turn carrying an image as LLaVA writes it: the tag first, then a newline and the text."""
    return image_tag(mm_use_im_start_end) + "\n" + text


def template(conv_mode: str) -> Conversation:
    """A fresh copy of the conversation template ``conv_mode``; a ``ValueError`` naming the known ones if unknown."""
    if conv_mode not in conv_templates:
        raise ValueError(f"conv_mode {conv_mode!r} is unknown; choose from {sorted(conv_templates)}")
    return conv_templates[conv_mode].copy()


def template_stop(conv: str | Conversation) -> str | None:
    """The template's end-of-turn separator, what LLaVA's workers and scripts stop on (``sep2`` for two-separator
    templates, else ``sep``); None when it is only whitespace (it cannot be told from the answer's own)."""
    conv = conv_templates[conv] if isinstance(conv, str) else conv
    stop = conv.sep2 if conv.sep_style == SeparatorStyle.TWO else conv.sep
    return stop if stop and stop.strip() else None


def render(conv: Conversation, tokenizer=None) -> str:
    """The prompt of ``conv`` with the assistant's turn open: through the checkpoint's own chat template when the
    tokenizer carries one (llava-hf), else LLaVA's ``get_prompt()``."""
    return (apply_chat_template(tokenizer, conv) if tokenizer is not None else None) or conv.get_prompt()


def question_prompt(
    conv_mode: str, text: str, image: bool = False, mm_use_im_start_end: bool = False, tokenizer=None
) -> str:
    """One user turn (``text``, with the image tag first when ``image``) and the assistant's turn open: LLaVA's
    ``model_vqa`` / ``run_llava`` prompt. ``tokenizer``: use its chat template if it has one (see ``render``)."""
    conv = template(conv_mode)
    conv.append_message(conv.roles[0], with_image(text, mm_use_im_start_end) if image else text)
    conv.append_message(conv.roles[1], None)
    return render(conv, tokenizer)


def messages_prompt(
    conv_mode: str,
    messages: Sequence[tuple[str, Sequence[object]]],
    tokenizer=None,
    mm_use_im_start_end: bool = False,
) -> str:
    """Chat messages -> the prompt, the assistant's turn left open.

    Each message is ``(role, parts)``, role ``"system"``, ``"user"`` or ``"assistant"``; a part is text (``str``)
    or anything else for an image, which becomes the image tag where it stands (LLaVA's clients put it first,
    ``"<image>\\ntext"``). Parts of one message are joined by newlines, consecutive messages of one role merged;
    system text replaces the template's system prompt.
    """
    conv = template(conv_mode)
    system = [p for role, parts in messages if role == "system" for p in parts if isinstance(p, str)]
    if system:
        conv.system = "\n".join(system)
    roles = {"user": conv.roles[0], "assistant": conv.roles[1]}
    turns: list[tuple[str, str]] = []
    for role, parts in messages:
        if role == "system":
            continue
        if role not in roles:
            raise ValueError(f"message role must be system, user or assistant, got {role!r}")
        pieces = [p.strip() if isinstance(p, str) else image_tag(mm_use_im_start_end) for p in parts]
        text = "\n".join(p for p in pieces if p)
        if turns and turns[-1][0] == roles[role]:  # merge consecutive turns of one role
            turns[-1] = (turns[-1][0], turns[-1][1] + "\n" + text)
        else:
            turns.append((roles[role], text))
    for role, text in turns:
        conv.append_message(role, text)
    conv.append_message(conv.roles[1], None)
    return render(conv, tokenizer)
