"""Conversations -> token ids and labels, with LLaVA's per-template label masking.

The masking reproduces LLaVA's ``llava/train/train.py`` (``preprocess_plain``, ``preprocess_v1``,
``preprocess_llama_2``, ``preprocess_mpt``) token for token: the prompt is rendered by the template, split back
into rounds on the template's separators, and every round's instruction part is masked by re-tokenizing it. LLaVA
then compares the masked length with the real length and, on a *tokenization mismatch*, silently sets every label
of the sample to IGNORE_INDEX. Here a mismatch raises ``SampleError`` instead: the dataset counts and reports
such samples and applies the run's policy (stop, or skip and count) -- a sample never trains on zero targets
unnoticed.

Two input formats are accepted and normalised to LLaVA's:
  * LLaVA: ``{"id", "image" (str or list), "conversations": [{"from": "human"|"gpt", "value"}, ...]}``;
  * HF/TRL: ``{"messages": [{"role": "user"|"assistant"|"system", "content": str | [{"type": "image"},
    {"type": "text", "text": ...}]}], "images": [...]}``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastllava.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from fastllava.conversation import Conversation, SeparatorStyle, conv_templates
from fastllava.mm_utils import tokenizer_image_token
from fastllava.prompting import image_tag


class SampleError(ValueError):
    """A sample that cannot be trained on; ``kind`` names the problem for counting."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Tokenized:
    input_ids: list[int]  # IMAGE_TOKEN_INDEX for each <image>
    labels: list[int]  # aligned with input_ids, IGNORE_INDEX where no loss

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


# ------------------------------------------------------------------------------------ input formats


def normalize_record(record: dict) -> tuple[list[dict], list[str], str | None]:
    """One JSON record -> (LLaVA conversation turns, image file names, system prompt override or None)."""
    if "conversations" in record:
        images = record.get("image")
        images = [] if images is None else ([images] if isinstance(images, str) else list(images))
        return [dict(t) for t in record["conversations"]], images, None
    if "messages" not in record:
        raise SampleError("format", "record has neither 'conversations' (LLaVA) nor 'messages' (HF/TRL)")
    images = record.get("images", record.get("image")) or []
    images = [images] if isinstance(images, str) else list(images)
    turns, system = [], None
    roles = {"user": "human", "assistant": "gpt"}
    for m in record["messages"]:
        content = m["content"]
        if isinstance(content, list):
            text_parts, n_img = [], 0
            for part in content:
                if part.get("type") == "image":
                    n_img += 1
                elif part.get("type") == "text":
                    text_parts.append(part.get("text", ""))
            text = DEFAULT_IMAGE_TOKEN * n_img + ("\n" if n_img else "") + "".join(text_parts)
        else:
            text = content
        if m["role"] == "system":
            system = text
            continue
        if m["role"] not in roles:
            raise SampleError("format", f"unknown message role {m['role']!r}")
        turns.append({"from": roles[m["role"]], "value": text})
    return turns, images, system


def preprocess_multimodal(
    turns: list[dict], template: Conversation, mm_use_im_start_end: bool = False, keep_image_position: bool = False
) -> None:
    """LLaVA's ``preprocess_multimodal``: move ``<image>`` to the front of its turn (``<image>\\n`` + text),
    wrap in ``<Image>`` tags for mmtag templates, and in ``<im_start>``/``<im_end>`` when asked. In place.

    ``keep_image_position`` (a record's ``"keep_image_position": true``, a fastllava extension) leaves the
    ``<image>`` where the text has it: an OpenAI chat request whose text part comes first is served as
    ``text\\n<image>``, and a model that should answer it must have been trained on that order."""
    for turn in turns:
        if DEFAULT_IMAGE_TOKEN in turn["value"] and keep_image_position:
            turn["value"] = turn["value"].strip()
        elif DEFAULT_IMAGE_TOKEN in turn["value"]:
            n = turn["value"].count(DEFAULT_IMAGE_TOKEN)
            text = turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
            turn["value"] = (DEFAULT_IMAGE_TOKEN + "\n") * n + text
            turn["value"] = turn["value"].strip()
            if "mmtag" in (template.version or ""):
                turn["value"] = turn["value"].replace(DEFAULT_IMAGE_TOKEN, "<Image>" + DEFAULT_IMAGE_TOKEN + "</Image>")
        if mm_use_im_start_end:
            turn["value"] = turn["value"].replace(DEFAULT_IMAGE_TOKEN, image_tag(mm_use_im_start_end=True))


# ------------------------------------------------------------------------------------ templates


def _tok_len(text: str, tokenizer, has_image: bool) -> int:
    if has_image:
        return len(tokenizer_image_token(text, tokenizer))
    return len(tokenizer(text).input_ids)


def _tokenize(text: str, tokenizer, has_image: bool) -> list[int]:
    if has_image:
        return tokenizer_image_token(text, tokenizer)
    return list(tokenizer(text).input_ids)


def _legacy_offset(tokenizer, i: int) -> int:
    # LLaVA: `if i != 0 and not tokenizer.legacy and IS_TOKENIZER_GREATER_THAN_0_14: round_len -= 1 ...`
    # (non-legacy sentencepiece Llama tokenizers drop the space after "</s>"); other tokenizers have no `legacy`.
    return 1 if i != 0 and getattr(tokenizer, "legacy", True) is False else 0


def _render(turns: list[dict], template: Conversation, system: str | None) -> Conversation:
    conv = template.copy()
    if system is not None:
        conv.system = system
    roles = {"human": conv.roles[0], "gpt": conv.roles[1]}
    if turns and roles.get(turns[0]["from"]) != conv.roles[0]:
        turns = turns[1:]  # LLaVA skips a leading non-human turn
    conv.messages = []
    for j, turn in enumerate(turns):
        role = roles.get(turn["from"])
        if role != conv.roles[j % 2]:
            raise SampleError("format", f"turn {j} is from {turn['from']!r}; turns must alternate human/gpt")
        conv.append_message(role, turn["value"])
    return conv


def _takes_space_before(tokenizer, token: str) -> bool:
    """Whether the special ``token`` absorbs the whitespace before it (an ``AddedToken`` with ``lstrip``)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return any(t.content == token and t.lstrip for t in added.values())


def _mask_rounds(
    prompt: str, input_ids: list[int], tokenizer, has_image: bool, round_sep: str, answer_sep: str, style: str
) -> list[int]:
    """LLaVA's round-splitting mask for the TWO and LLAMA_2 styles."""
    target = list(input_ids)
    total_len = sum(1 for t in input_ids if t != tokenizer.pad_token_id)
    cur_len = 1
    target[:cur_len] = [IGNORE_INDEX] * cur_len
    # LLaVA counts a round's tokens without its ``round_sep`` (the BOS it adds stands in for it). When that
    # separator takes the space before it (the default model's "</s>", see train/make_tiny_base.py), the space
    # that ends the round's text is no token of its own in the sample either.
    trim = _takes_space_before(tokenizer, round_sep)
    for i, rou in enumerate(prompt.split(round_sep)):
        if rou == "":
            break
        rou = rou.rstrip() if trim else rou
        parts = rou.split(answer_sep)
        if len(parts) != 2:
            break
        parts[0] += answer_sep
        round_len = _tok_len(rou, tokenizer, has_image)
        instruction_len = _tok_len(parts[0], tokenizer, has_image) - 2
        off = _legacy_offset(tokenizer, i) if style == "two" else 0
        round_len -= off
        instruction_len -= off
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * max(0, instruction_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        raise SampleError("mismatch", f"tokenization mismatch: {cur_len} vs. {total_len} (LLaVA would zero its labels)")
    return target[: len(input_ids)]


def _mask_mpt(prompt: str, input_ids: list[int], tokenizer, has_image: bool, conv: Conversation) -> list[int]:
    """LLaVA's ``preprocess_mpt`` (ChatML templates)."""
    target = list(input_ids)
    total_len = sum(1 for t in input_ids if t != tokenizer.pad_token_id)
    sep = conv.sep + conv.roles[1]
    rounds = prompt.split(conv.sep)
    re_rounds = [conv.sep.join(rounds[:3])]  # system + user + gpt
    for idx in range(3, len(rounds), 2):
        re_rounds.append(conv.sep.join(rounds[idx : idx + 2]))
    cur_len = 0
    for i, rou in enumerate(re_rounds):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = _tok_len(rou, tokenizer, has_image)
        instruction_len = _tok_len(parts[0], tokenizer, has_image) - 1
        if i != 0 and getattr(tokenizer, "legacy", False):
            round_len += 1
            instruction_len += 1
        target[cur_len : cur_len + instruction_len] = [IGNORE_INDEX] * max(0, instruction_len)
        cur_len += round_len
    target[cur_len:] = [IGNORE_INDEX] * max(0, len(target) - cur_len)
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        raise SampleError("mismatch", f"tokenization mismatch: {cur_len} vs. {total_len} (LLaVA would zero its labels)")
    return target[: len(input_ids)]


def preprocess(
    turns: list[dict],
    tokenizer,
    template: str | Conversation,
    has_image: bool,
    system: str | None = None,
    mm_use_im_start_end: bool = False,
    keep_image_position: bool = False,
) -> Tokenized:
    """Render, tokenize and mask one conversation as LLaVA's ``preprocess`` does for ``template``.

    ``turns`` are LLaVA turns (``from``/``value``); they are copied, not modified. ``keep_image_position``: see
    ``preprocess_multimodal``. Raises ``SampleError`` for malformed turns, a conversation without any target
    token, or a tokenization mismatch.
    """
    conv_t = conv_templates[template] if isinstance(template, str) else template
    turns = [dict(t) for t in turns]
    if has_image:
        preprocess_multimodal(turns, conv_t, mm_use_im_start_end, keep_image_position)
    if not any(t.get("from") == "gpt" and str(t.get("value", "")).strip() for t in turns):
        raise SampleError("no_target", "conversation has no non-empty 'gpt' turn to learn from")
    style = conv_t.sep_style
    if style == SeparatorStyle.PLAIN:
        # LLaVA's preprocess_plain: "<image>" + answer + "\n", everything up to the answer masked
        if len(turns) != 2 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
            raise SampleError("format", "the 'plain' template needs exactly one human turn with <image> and one answer")
        head = DEFAULT_IMAGE_TOKEN
        ids = tokenizer_image_token(head + turns[1]["value"] + conv_t.sep, tokenizer)
        n_head = len(tokenizer_image_token(head, tokenizer))
        labels = [IGNORE_INDEX] * n_head + ids[n_head:]
        out = Tokenized(ids, labels)
    else:
        conv = _render(turns, conv_t, system)
        prompt = conv.get_prompt()
        ids = _tokenize(prompt, tokenizer, has_image)
        if style == SeparatorStyle.TWO:
            labels = _mask_rounds(prompt, ids, tokenizer, has_image, conv.sep2, conv.sep + conv.roles[1] + ": ", "two")
        elif style == SeparatorStyle.LLAMA_2:
            labels = _mask_rounds(prompt, ids, tokenizer, has_image, conv.sep2, "[/INST] ", "llama_2")
        elif style == SeparatorStyle.MPT:
            labels = _mask_mpt(prompt, ids, tokenizer, has_image, conv)
        else:
            raise ValueError(f"template style {style} has no label masking in LLaVA; use plain, v1, llama_2 or mpt")
        out = Tokenized(ids, labels)
    if out.n_targets == 0:
        raise SampleError("no_target", "every label is masked (nothing to learn from this sample)")
    return out
