"""``fastllava.prompting`` against LLaVA's own prompt building (``llava-torch``: ``llava/conversation.py`` and the
way ``llava/eval/model_vqa.py``, ``llava/serve/cli.py`` and the workers put the image tag and stop string).

The oracle side of each test is written the way LLaVA's scripts write it, with LLaVA's templates and constants.
"""

from __future__ import annotations

import pytest

llava_conv = pytest.importorskip("llava.conversation")
llava_constants = pytest.importorskip("llava.constants")

from fastllava import prompting  # noqa: E402
from fastllava.conversation import conv_templates  # noqa: E402

MODES = sorted(set(conv_templates) & set(llava_conv.conv_templates))
QUESTIONS = ["What is in the image?", "  padded question \n", "two\nlines"]


def _llava_tag(mm_use_im_start_end: bool) -> str:
    c = llava_constants
    if mm_use_im_start_end:
        return c.DEFAULT_IM_START_TOKEN + c.DEFAULT_IMAGE_TOKEN + c.DEFAULT_IM_END_TOKEN
    return c.DEFAULT_IMAGE_TOKEN


def _llava_question(mode: str, qs: str, image: bool, mm_use_im_start_end: bool) -> str:
    """llava/eval/model_vqa.py's prompt (text-only questions: no tag)."""
    if image:
        qs = _llava_tag(mm_use_im_start_end) + "\n" + qs
    conv = llava_conv.conv_templates[mode].copy()
    conv.append_message(conv.roles[0], qs)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("image", [True, False])
@pytest.mark.parametrize("mm_use_im_start_end", [True, False])
def test_question_prompt_is_llavas(mode, image, mm_use_im_start_end):
    for q in QUESTIONS:
        ours = prompting.question_prompt(mode, q, image=image, mm_use_im_start_end=mm_use_im_start_end)
        assert ours == _llava_question(mode, q, image, mm_use_im_start_end), (mode, q)


@pytest.mark.parametrize("mode", MODES)
def test_template_stop_is_what_llava_stops_on(mode):
    conv = llava_conv.conv_templates[mode]
    stop = conv.sep if conv.sep_style != llava_conv.SeparatorStyle.TWO else conv.sep2
    want = stop if stop and stop.strip() else None
    assert prompting.template_stop(mode) == want
    assert prompting.template_stop(conv_templates[mode]) == want  # a Conversation works too


def test_template_stop_values():
    assert prompting.template_stop("llava_v1") == "</s>"  # two-separator template: sep2
    assert prompting.template_stop("mpt") == "<|im_end|>"
    assert prompting.template_stop("plain") is None  # "\n": whitespace only


@pytest.mark.parametrize("mode", ["llava_v1", "llava_llama_2", "mpt", "chatml_direct", "v0"])
def test_messages_prompt_matches_a_llava_conversation(mode):
    """Images where they stand, parts joined by newlines, consecutive turns of one role merged, a system
    message replacing the template's system prompt: the conversation LLaVA's own code would render."""
    image = object()  # any non-str part is an image
    messages = [
        ("system", ["Be brief."]),
        ("user", [image, " What is it? "]),
        ("assistant", ["A cat."]),
        ("user", ["And this?"]),
        ("user", ["Compare:", image]),
    ]
    tag = _llava_tag(False)
    conv = llava_conv.conv_templates[mode].copy()
    conv.system = "Be brief."
    conv.append_message(conv.roles[0], tag + "\nWhat is it?")
    conv.append_message(conv.roles[1], "A cat.")
    conv.append_message(conv.roles[0], "And this?\nCompare:\n" + tag)
    conv.append_message(conv.roles[1], None)
    assert prompting.messages_prompt(mode, messages) == conv.get_prompt()
    # no system message: the template's own system prompt stays
    plain = llava_conv.conv_templates[mode].copy()
    plain.append_message(plain.roles[0], _llava_tag(True) + "\nHi")
    plain.append_message(plain.roles[1], None)
    assert prompting.messages_prompt(mode, [("user", [image, "Hi"])], mm_use_im_start_end=True) == plain.get_prompt()


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="conv_mode 'nope' is unknown"):
        prompting.question_prompt("nope", "hi")
    with pytest.raises(ValueError, match="role must be system, user or assistant"):
        prompting.messages_prompt("llava_v1", [("tool", ["x"])])


def test_chat_template_is_used_when_the_tokenizer_has_one():
    class Tok:  # a llava-hf tokenizer: its jinja chat template renders the messages
        chat_template = "x"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            assert add_generation_prompt and not tokenize
            return "|".join(m["role"] for m in messages) + "|"

    assert prompting.question_prompt("llava_v1", "hi", tokenizer=Tok()) == "user|"
    assert prompting.question_prompt("llava_v1", "hi") == _llava_question("llava_v1", "hi", False, False)
