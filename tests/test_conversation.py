"""Tests for `fastllava.conversation`: LLaVA's prompt strings, byte for byte.

The oracle is LLaVA 1.2.2.post1 (`llava-torch` on PyPI, `llava/conversation.py`): every string in `EXPECTED`
is what its `get_prompt()` returned for the same template and messages, pasted here as a literal. Its code is
not part of this repository and is not needed to run these tests.

Where fastllava fixes a LLaVA bug, the expected string is not LLaVA's output:
- `FIXED`: a completed turn under the PLAIN style (`plain`, `v0_plain`). LLaVA raises
  `TypeError: can only concatenate str (not "NoneType") to str` there, because it appends `sep2`, which is None
  in that template; fastllava ends every turn with `sep` ("\\n") instead. Those strings come from fastllava.
- `test_llama_2_removes_sep_prefix_not_characters`: LLaVA's `lstrip(sep)`; its output is quoted in the test.
  For LLaVA's own templates the two agree (the prompt always starts "<s>[INST]"), so every `EXPECTED` string
  for `llama_2`, `llava_llama_2` and `mistral_instruct` is LLaVA's output.

Quirks of LLaVA that are matched on purpose (the checkpoints were trained on them): "default"/"v0" carry a
worked example before the user's messages, so a web-UI image turn is not first and its `<image>` is not moved
(`("v0", "webui_generation")`); the `*_mmtag` templates turn an image upload into an extra
`<Image><image></Image>` / `Received.` exchange; "mistral_direct" is the ChatML template.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from fastllava.conversation import (
    Conversation,
    SeparatorStyle,
    apply_chat_template,
    conv_templates,
    conversation_to_chat_messages,
    default_conversation,
    guess_conv_mode,
)

IMAGE = Image.new("RGB", (8, 6), (255, 0, 0))
QUESTION = "<image>\nWhat is shown in this image?"
ANSWER = "A red square on a white background."
FOLLOW_UP = "What colour is the square?"

# Message shapes: (role index, message); None is the turn the model generates next.
SHAPES = {
    "empty": [],
    "generation": [(0, QUESTION), (1, None)],
    "completed": [(0, QUESTION), (1, ANSWER)],
    "two_turns": [(0, QUESTION), (1, ANSWER), (0, FOLLOW_UP), (1, None)],
    # The web UI sends (text, image, image_process_mode); LLaVA moves the image to the front of the first turn.
    "webui_generation": [(0, ("What is shown in this image?\n<image>", IMAGE, "Default")), (1, None)],
    "webui_two_turns": [
        (0, ("<image> What is shown in this image?", IMAGE, "Pad")),
        (1, ANSWER),
        (0, FOLLOW_UP),
        (1, None),
    ],
    "text_only": [(0, "Hello!"), (1, "Hi! How can I help you today?"), (0, "Tell me a joke."), (1, None)],
}

LLAVA_TEMPLATE_KEYS = [
    "default",
    "v0",
    "v1",
    "vicuna_v1",
    "llama_2",
    "mistral_instruct",
    "chatml_direct",
    "mistral_direct",
    "plain",
    "v0_plain",
    "llava_v0",
    "v0_mmtag",
    "llava_v1",
    "v1_mmtag",
    "llava_llama_2",
    "mpt",
]


def build(name: str, shape: str) -> Conversation:
    conv = conv_templates[name].copy()
    for role_index, message in SHAPES[shape]:
        conv.append_message(conv.roles[role_index], message)
    return conv


# ---------------------------------------------------------------------------------------- LLaVA's prompts
# fmt: off
V0_HEAD = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's "
    "questions.###Human: What are the key differences between renewable and "
    "non-renewable energy sources?###Assistant: Renewable energy sources are "
    "those that can be replenished naturally in a relatively short amount of "
    "time, such as solar, wind, hydro, geothermal, and biomass. Non-renewable "
    "energy sources, on the other hand, are finite and will eventually be depleted, "
    "such as coal, oil, and natural gas. Here are some key differences between "
    "renewable and non-renewable energy sources:\n"
    "1. Availability: Renewable energy sources are virtually inexhaustible, "
    "while non-renewable energy sources are finite and will eventually run "
    "out.\n"
    "2. Environmental impact: Renewable energy sources have a much lower environmental "
    "impact than non-renewable sources, which can lead to air and water pollution, "
    "greenhouse gas emissions, and other negative effects.\n"
    "3. Cost: Renewable energy sources can be more expensive to initially set "
    "up, but they typically have lower operational costs than non-renewable "
    "sources.\n"
    "4. Reliability: Renewable energy sources are often more reliable and can "
    "be used in more remote locations than non-renewable sources.\n"
    "5. Flexibility: Renewable energy sources are often more flexible and can "
    "be adapted to different situations and needs, while non-renewable sources "
    "are more rigid and inflexible.\n"
    "6. Sustainability: Renewable energy sources are more sustainable over "
    "the long term, while non-renewable sources are not, and their depletion "
    "can lead to economic and social instability.\n"
    "###"
)

EXPECTED = {
    ("default", "empty"): V0_HEAD,
    ("default", "generation"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant:"
    ),
    ("default", "completed"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###"
    ),
    ("default", "two_turns"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("default", "webui_generation"): V0_HEAD + (
        "Human: What is shown in this image?\n"
        "<image>###Assistant:"
    ),
    ("default", "webui_two_turns"): V0_HEAD + (
        "Human: <image> What is shown in this image?###Assistant: A red square "
        "on a white background.###Human: What colour is the square?###Assistant:"
    ),
    ("default", "text_only"): V0_HEAD + (
        "Human: Hello!###Assistant: Hi! How can I help you today?###Human: Tell "
        "me a joke.###Assistant:"
    ),
    ("v0", "empty"): V0_HEAD,
    ("v0", "generation"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant:"
    ),
    ("v0", "completed"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###"
    ),
    ("v0", "two_turns"): V0_HEAD + (
        "Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("v0", "webui_generation"): V0_HEAD + (
        "Human: What is shown in this image?\n"
        "<image>###Assistant:"
    ),
    ("v0", "webui_two_turns"): V0_HEAD + (
        "Human: <image> What is shown in this image?###Assistant: A red square "
        "on a white background.###Human: What colour is the square?###Assistant:"
    ),
    ("v0", "text_only"): V0_HEAD + (
        "Human: Hello!###Assistant: Hi! How can I help you today?###Human: Tell "
        "me a joke.###Assistant:"
    ),
    ("v1", "empty"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. "
    ),
    ("v1", "generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("v1", "completed"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>"
    ),
    ("v1", "two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("v1", "webui_generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("v1", "webui_two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("v1", "text_only"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: Hello! ASSISTANT: Hi! How can I help you today?</s>USER: "
        "Tell me a joke. ASSISTANT:"
    ),
    ("vicuna_v1", "empty"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. "
    ),
    ("vicuna_v1", "generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("vicuna_v1", "completed"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>"
    ),
    ("vicuna_v1", "two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("vicuna_v1", "webui_generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("vicuna_v1", "webui_two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("vicuna_v1", "text_only"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's "
        "questions. USER: Hello! ASSISTANT: Hi! How can I help you today?</s>USER: "
        "Tell me a joke. ASSISTANT:"
    ),
    ("llama_2", "empty"): "",
    ("llama_2", "generation"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("llama_2", "completed"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s>"
    ),
    ("llama_2", "two_turns"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s><s>[INST] What colour is the square? [/INST]"
    ),
    ("llama_2", "webui_generation"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("llama_2", "webui_two_turns"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s><s>[INST] What colour is the square? [/INST]"
    ),
    ("llama_2", "text_only"): (
        "[INST] <<SYS>>\n"
        "You are a helpful, respectful and honest assistant. Always answer as helpfully "
        "as possible, while being safe.  Your answers should not include any harmful, "
        "unethical, racist, sexist, toxic, dangerous, or illegal content. Please "
        "ensure that your responses are socially unbiased and positive in nature.\n"
        "\n"
        "If a question does not make any sense, or is not factually coherent, explain "
        "why instead of answering something not correct. If you don't know the "
        "answer to a question, please don't share false information.\n"
        "<</SYS>>\n"
        "\n"
        "Hello! [/INST] Hi! How can I help you today? </s><s>[INST] Tell me a joke. "
        "[/INST]"
    ),
    ("mistral_instruct", "empty"): "",
    ("mistral_instruct", "generation"): (
        "[INST] <image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("mistral_instruct", "completed"): (
        "[INST] <image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s>"
    ),
    ("mistral_instruct", "two_turns"): (
        "[INST] <image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s>[INST] What colour is the square? [/INST]"
    ),
    ("mistral_instruct", "webui_generation"): (
        "[INST] <image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("mistral_instruct", "webui_two_turns"): (
        "[INST] <image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s>[INST] What colour is the square? [/INST]"
    ),
    ("mistral_instruct", "text_only"): (
        "[INST] Hello! [/INST] Hi! How can I help you today? </s>[INST] Tell me "
        "a joke. [/INST]"
    ),
    ("chatml_direct", "empty"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|>"
    ),
    ("chatml_direct", "generation"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("chatml_direct", "completed"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|>"
    ),
    ("chatml_direct", "two_turns"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("chatml_direct", "webui_generation"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("chatml_direct", "webui_two_turns"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("chatml_direct", "text_only"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "Hello!<|im_end|><|im_start|>assistant\n"
        "Hi! How can I help you today?<|im_end|><|im_start|>user\n"
        "Tell me a joke.<|im_end|><|im_start|>assistant\n"
    ),
    ("mistral_direct", "empty"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|>"
    ),
    ("mistral_direct", "generation"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("mistral_direct", "completed"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|>"
    ),
    ("mistral_direct", "two_turns"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("mistral_direct", "webui_generation"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("mistral_direct", "webui_two_turns"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("mistral_direct", "text_only"): (
        "<|im_start|>system\n"
        "Answer the questions.<|im_end|><|im_start|>user\n"
        "Hello!<|im_end|><|im_start|>assistant\n"
        "Hi! How can I help you today?<|im_end|><|im_start|>user\n"
        "Tell me a joke.<|im_end|><|im_start|>assistant\n"
    ),
    ("plain", "empty"): "",
    ("plain", "generation"): (
        "<image>\n"
        "What is shown in this image?\n"
    ),
    ("plain", "completed"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
    ),
    ("plain", "two_turns"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
        "What colour is the square?\n"
    ),
    ("plain", "webui_generation"): (
        "<image>\n"
        "What is shown in this image?\n"
    ),
    ("plain", "webui_two_turns"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
        "What colour is the square?\n"
    ),
    ("plain", "text_only"): (
        "Hello!\n"
        "Hi! How can I help you today?\n"
        "Tell me a joke.\n"
    ),
    ("v0_plain", "empty"): "",
    ("v0_plain", "generation"): (
        "<image>\n"
        "What is shown in this image?\n"
    ),
    ("v0_plain", "completed"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
    ),
    ("v0_plain", "two_turns"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
        "What colour is the square?\n"
    ),
    ("v0_plain", "webui_generation"): (
        "<image>\n"
        "What is shown in this image?\n"
    ),
    ("v0_plain", "webui_two_turns"): (
        "<image>\n"
        "What is shown in this image?\n"
        "A red square on a white background.\n"
        "What colour is the square?\n"
    ),
    ("v0_plain", "text_only"): (
        "Hello!\n"
        "Hi! How can I help you today?\n"
        "Tell me a joke.\n"
    ),
    ("llava_v0", "empty"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###"
    ),
    ("llava_v0", "generation"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: <image>\n"
        "What is shown in this image?###Assistant:"
    ),
    ("llava_v0", "completed"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###"
    ),
    ("llava_v0", "two_turns"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("llava_v0", "webui_generation"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: <image>\n"
        "What is shown in this image?###Assistant:"
    ),
    ("llava_v0", "webui_two_turns"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("llava_v0", "text_only"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions.###Human: Hello!###Assistant: Hi! How can I help you today?###Human: "
        "Tell me a joke.###Assistant:"
    ),
    ("v0_mmtag", "empty"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###"
    ),
    ("v0_mmtag", "generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: <image>\n"
        "What is shown in this image?###Assistant:"
    ),
    ("v0_mmtag", "completed"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###"
    ),
    ("v0_mmtag", "two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: <image>\n"
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("v0_mmtag", "webui_generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: <Image><image></Image>###Assistant: Received.###Human: "
        "What is shown in this image?###Assistant:"
    ),
    ("v0_mmtag", "webui_two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: <Image><image></Image>###Assistant: Received.###Human: "
        "What is shown in this image?###Assistant: A red square on a white background.###Human: "
        "What colour is the square?###Assistant:"
    ),
    ("v0_mmtag", "text_only"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>.###Human: Hello!###Assistant: Hi! How can I help you today?###Human: "
        "Tell me a joke.###Assistant:"
    ),
    ("llava_v1", "empty"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. "
    ),
    ("llava_v1", "generation"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("llava_v1", "completed"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>"
    ),
    ("llava_v1", "two_turns"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("llava_v1", "webui_generation"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("llava_v1", "webui_two_turns"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("llava_v1", "text_only"): (
        "A chat between a curious human and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the human's "
        "questions. USER: Hello! ASSISTANT: Hi! How can I help you today?</s>USER: "
        "Tell me a joke. ASSISTANT:"
    ),
    ("v1_mmtag", "empty"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. "
    ),
    ("v1_mmtag", "generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: <image>\n"
        "What is shown in this image? ASSISTANT:"
    ),
    ("v1_mmtag", "completed"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>"
    ),
    ("v1_mmtag", "two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: <image>\n"
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("v1_mmtag", "webui_generation"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: <Image><image></Image> ASSISTANT: Received.</s>USER: "
        "What is shown in this image? ASSISTANT:"
    ),
    ("v1_mmtag", "webui_two_turns"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: <Image><image></Image> ASSISTANT: Received.</s>USER: "
        "What is shown in this image? ASSISTANT: A red square on a white background.</s>USER: "
        "What colour is the square? ASSISTANT:"
    ),
    ("v1_mmtag", "text_only"): (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant is able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language.The "
        "visual content will be provided with the following format: <Image>visual "
        "content</Image>. USER: Hello! ASSISTANT: Hi! How can I help you today?</s>USER: "
        "Tell me a joke. ASSISTANT:"
    ),
    ("llava_llama_2", "empty"): "",
    ("llava_llama_2", "generation"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("llava_llama_2", "completed"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s>"
    ),
    ("llava_llama_2", "two_turns"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s><s>[INST] What colour is the square? [/INST]"
    ),
    ("llava_llama_2", "webui_generation"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST]"
    ),
    ("llava_llama_2", "webui_two_turns"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "<image>\n"
        "What is shown in this image? [/INST] A red square on a white background. "
        "</s><s>[INST] What colour is the square? [/INST]"
    ),
    ("llava_llama_2", "text_only"): (
        "[INST] <<SYS>>\n"
        "You are a helpful language and vision assistant. You are able to understand "
        "the visual content that the user provides, and assist the user with a "
        "variety of tasks using natural language.\n"
        "<</SYS>>\n"
        "\n"
        "Hello! [/INST] Hi! How can I help you today? </s><s>[INST] Tell me a joke. "
        "[/INST]"
    ),
    ("mpt", "empty"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|>"
    ),
    ("mpt", "generation"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("mpt", "completed"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|>"
    ),
    ("mpt", "two_turns"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("mpt", "webui_generation"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
    ),
    ("mpt", "webui_two_turns"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "<image>\n"
        "What is shown in this image?<|im_end|><|im_start|>assistant\n"
        "A red square on a white background.<|im_end|><|im_start|>user\n"
        "What colour is the square?<|im_end|><|im_start|>assistant\n"
    ),
    ("mpt", "text_only"): (
        "<|im_start|>system\n"
        "A conversation between a user and an LLM-based AI assistant. The assistant "
        "gives helpful and honest answers.<|im_end|><|im_start|>user\n"
        "Hello!<|im_end|><|im_start|>assistant\n"
        "Hi! How can I help you today?<|im_end|><|im_start|>user\n"
        "Tell me a joke.<|im_end|><|im_start|>assistant\n"
    ),
}

# fmt: on

# Expected strings above that are fastllava's output, not LLaVA's (LLaVA raises TypeError; see the docstring).
FIXED = {
    ("plain", "completed"),
    ("plain", "two_turns"),
    ("plain", "webui_two_turns"),
    ("plain", "text_only"),
    ("v0_plain", "completed"),
    ("v0_plain", "two_turns"),
    ("v0_plain", "webui_two_turns"),
    ("v0_plain", "text_only"),
}


def test_expected_covers_every_template_and_shape():
    assert set(EXPECTED) == {(name, shape) for name in LLAVA_TEMPLATE_KEYS for shape in SHAPES}


def test_template_keys_are_llavas():
    assert list(conv_templates) == LLAVA_TEMPLATE_KEYS


@pytest.mark.parametrize("name,shape", sorted(EXPECTED))
def test_get_prompt_matches_llava(name, shape):
    assert build(name, shape).get_prompt() == EXPECTED[(name, shape)]


def test_llava_v1_example():
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is shown in this image?")
    conv.append_message(conv.roles[1], None)
    assert conv.get_prompt() == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nWhat is shown in this image? "
        "ASSISTANT:"
    )


def test_default_conversation_is_vicuna_v1():
    # LLaVA's `default_conversation` is Vicuna v1, while its "default" key is Vicuna v0.
    assert default_conversation is conv_templates["v1"]
    assert conv_templates["default"] is conv_templates["v0"]
    assert conv_templates["mistral_direct"] is conv_templates["chatml_direct"]


def test_separator_styles():
    assert [s.name for s in SeparatorStyle] == ["SINGLE", "TWO", "MPT", "PLAIN", "LLAMA_2"]
    assert conv_templates["chatml_direct"].sep_style is SeparatorStyle.MPT


def test_empty_message_counts_as_pending_turn():
    # LLaVA tests `if message:`, so "" renders like None (role header only), while a tuple with empty text
    # is a present message. Outputs from LLaVA.
    conv = conv_templates["llava_v1"].copy()
    conv.append_message("USER", "Hi")
    conv.append_message("ASSISTANT", "")
    assert conv.get_prompt().endswith("USER: Hi ASSISTANT:")
    conv = conv_templates["v1_mmtag"].copy()
    conv.append_message("USER", ("<image>", IMAGE, "Default"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt().endswith("USER: <Image><image></Image> ASSISTANT: Received.</s>USER:ASSISTANT:")


def test_later_image_tuples_keep_their_text():
    # Only the first turn's image is moved; a later tuple contributes its text as typed (LLaVA's output).
    conv = conv_templates["llava_v1"].copy()
    conv.append_message("USER", ("What is it? <image>", IMAGE, "Default"))
    conv.append_message("ASSISTANT", "A square.")
    conv.append_message("USER", ("And this <image>", IMAGE, "Crop"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt().endswith(
        "USER: <image>\nWhat is it? ASSISTANT: A square.</s>USER: And this <image> ASSISTANT:"
    )


# ---------------------------------------------------------------------------------------- LLaVA's bugs, fixed


@pytest.mark.parametrize("name", ["plain", "v0_plain"])
def test_plain_completed_turn_does_not_raise(name):
    # LLaVA: TypeError (it appends sep2=None after the answer). Each turn ends in "\n" instead.
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], ("<image>\nDescribe it.", IMAGE, "Default"))
    conv.append_message(conv.roles[1], "A red square.")
    assert conv.get_prompt() == "<image>\nDescribe it.\nA red square.\n"
    assert all(EXPECTED[key].endswith("\n") for key in FIXED)


def test_llama_2_removes_sep_prefix_not_characters():
    conv = Conversation(
        system="",
        roles=("USER", "ASSISTANT"),
        messages=[],
        offset=0,
        sep_style=SeparatorStyle.LLAMA_2,
        sep="[BOS]",
        sep2="[EOS]",
        version="llama_v2",
    )
    for message in ["Hi", "Hello", "Bye", None]:
        conv.append_message(conv.roles[len(conv.messages) % 2], message)
    # LLaVA's `lstrip("[BOS]")` also eats the "[" of "[INST]": 'INST] Hi [/INST] Hello [EOS][BOS][INST] Bye [/INST]'
    assert conv.get_prompt() == "[INST] Hi [/INST] Hello [EOS][BOS][INST] Bye [/INST]"


@pytest.mark.parametrize("name", ["llama_2", "llava_llama_2", "mistral_instruct"])
def test_llama_2_first_message_checks(name):
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[0], None)
    with pytest.raises(ValueError, match="first message should not be none"):
        conv.get_prompt()
    conv = conv_templates[name].copy()
    conv.append_message(conv.roles[1], "Hi")
    with pytest.raises(ValueError, match="first message should come from user"):
        conv.get_prompt()


# ---------------------------------------------------------------------------------------- conv mode


@pytest.mark.parametrize(
    "model_name,mode",
    [
        ("llava-v1.5-7b", "llava_v1"),
        ("liuhaotian/llava-v1.5-13b-lora", "llava_v1"),
        ("llava-v1.6-vicuna-7b", "llava_v1"),
        ("llava-v1.6-mistral-7b", "mistral_instruct"),
        ("llava-v1.6-34b", "chatml_direct"),
        ("LLaVA-V1.6-34B", "chatml_direct"),
        ("llava-llama-2-13b-chat-lightning-preview", "llava_llama_2"),
        ("llava-llama-2-7b-v1", "llava_llama_2"),  # llama-2 is tested first
        ("LLaVA-Lightning-MPT-7B-preview", "mpt"),
        ("llava-mpt-v1", "llava_v1"),  # "v1" is tested before "mpt"
        ("LLaVA-7B-v0", "llava_v0"),
        ("my-tiny-llava", "llava_v0"),
    ],
)
def test_guess_conv_mode(model_name, mode):
    assert guess_conv_mode(model_name) == mode
    assert mode in conv_templates


# ---------------------------------------------------------------------------------------- copy / dict


def test_copy_is_independent():
    template = conv_templates["llava_v1"]
    a = template.copy()
    b = template.copy()
    a.append_message("USER", "Hi")
    a.skip_next = True
    assert template.messages == () and b.messages == []
    c = a.copy()
    c.append_message("ASSISTANT", "Hello")
    c.messages[0][1] = "changed"
    assert a.messages == [["USER", "Hi"]]
    assert c.skip_next is False  # LLaVA's copy() does not carry skip_next
    for field in ("system", "roles", "offset", "sep_style", "sep", "sep2", "version"):
        assert getattr(c, field) == getattr(template, field)
    # Templates are tuples: appending to one by mistake fails instead of leaking into every later prompt.
    with pytest.raises(AttributeError):
        template.append_message("USER", "Hi")


def test_copy_keeps_few_shot_example():
    conv = conv_templates["v0"].copy()
    assert conv.offset == 2 and len(conv.messages) == 2
    assert conv.get_prompt() == V0_HEAD


def test_dict_drops_images():
    conv = build("llava_v1", "webui_two_turns")
    d = conv.dict()
    json.dumps(d)
    assert d["messages"][0] == ["USER", "<image> What is shown in this image?"]
    assert d["messages"][-1] == ["ASSISTANT", None]
    assert (d["system"], d["roles"], d["offset"], d["sep"], d["sep2"]) == (
        conv.system,
        conv.roles,
        0,
        " ",
        "</s>",
    )
    assert build("llava_v1", "text_only").dict()["messages"][0] == ["USER", "Hello!"]


# ---------------------------------------------------------------------------------------- images


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_process_image_modes():
    conv = conv_templates["llava_v1"]
    wide = Image.new("RGB", (30, 20), (10, 200, 30))
    padded = conv.process_image(wide, "Pad", return_pil=True)
    assert padded.size == (30, 30)
    assert padded.getpixel((0, 0)) == (122, 116, 104)  # LLaVA's pad colour (CLIP mean)
    assert padded.getpixel((0, 5)) == (10, 200, 30)  # centred: rows 5..24
    assert padded.getpixel((0, 4)) == (122, 116, 104)
    tall = conv.process_image(Image.new("RGB", (20, 30), (1, 2, 3)), "Pad", return_pil=True)
    assert tall.size == (30, 30) and tall.getpixel((4, 0)) == (122, 116, 104) and tall.getpixel((5, 0)) == (1, 2, 3)
    assert conv.process_image(wide, "Resize", return_pil=True).size == (336, 336)
    assert conv.process_image(wide, "Crop", return_pil=True).size == (30, 20)
    assert conv.process_image(wide, "Default", return_pil=True) is wide
    with pytest.raises(ValueError, match="Invalid image_process_mode"):
        conv.process_image(wide, "Stretch")


# (input size, mode) -> output size, from LLaVA's process_image (max_len=1344, min_len=672).
RESIZED = [
    ((2000, 1000), "Default", (1344, 672)),
    ((1000, 3000), "Crop", (448, 1344)),
    ((1500, 1000), "Default", (1008, 672)),
    ((1345, 1344), "Default", (672, 672)),
    ((777, 1401), "Default", (672, 1211)),
    ((3000, 10), "Default", (1200, 4)),
    ((2000, 1000), "Pad", (672, 672)),
    ((1344, 100), "Default", (1344, 100)),  # not above max_len: untouched
]


@pytest.mark.parametrize("size,mode,out", RESIZED)
def test_process_image_caps_size(size, mode, out):
    image = Image.new("RGB", size, (0, 0, 0))
    assert conv_templates["llava_v1"].process_image(image, mode, return_pil=True).size == out


def test_process_image_base64():
    conv = conv_templates["llava_v1"]
    image = Image.new("RGB", (8, 6), (255, 0, 0))
    png = conv.process_image(image, "Default")
    assert base64.b64decode(png)[:8] == b"\x89PNG\r\n\x1a\n"
    assert decode(png).tobytes() == image.tobytes()
    jpeg = conv.process_image(image, "Default", image_format="JPEG")
    assert base64.b64decode(jpeg)[:2] == b"\xff\xd8" and decode(jpeg).size == (8, 6)


def test_process_image_other_modes():
    # LLaVA raises for these (Image.new("L", ..., (r, g, b)); JPEG of RGBA); fixed here.
    conv = conv_templates["llava_v1"]
    gray = conv.process_image(Image.new("L", (4, 2), 0), "Pad", return_pil=True)
    assert gray.mode == "L" and gray.size == (4, 4) and gray.getpixel((0, 0)) == 116
    rgba = conv.process_image(Image.new("RGBA", (4, 2), (1, 2, 3, 4)), "Pad", return_pil=True)
    assert rgba.getpixel((0, 0)) == (122, 116, 104, 255)  # as LLaVA
    jpeg = conv.process_image(Image.new("RGBA", (4, 2)), "Default", image_format="JPEG")
    assert decode(jpeg).mode == "RGB"


def test_get_images_skips_examples_and_assistant_turns():
    conv = conv_templates["v0"].copy()  # offset=2: the worked example has no image and is skipped
    conv.append_message("Human", ("<image>\nq", Image.new("RGB", (30, 20), (1, 2, 3)), "Pad"))
    conv.append_message("Assistant", ("not a user turn", Image.new("RGB", (5, 5)), "Default"))
    conv.append_message("Human", ("q2 <image>", Image.new("RGB", (20, 30), (4, 5, 6)), "Resize"))
    conv.append_message("Assistant", None)
    pil = conv.get_images(return_pil=True)
    assert [im.size for im in pil] == [(30, 30), (336, 336)]
    b64 = conv.get_images()
    assert [decode(s).tobytes() for s in b64] == [im.tobytes() for im in pil]
    assert conv_templates["llava_v1"].copy().get_images() == []
    # An image inside the few-shot part (before `offset`) is not the user's: skipped too.
    conv.messages[0][1] = ("example", Image.new("RGB", (7, 7)), "Default")
    assert [im.size for im in conv.get_images(return_pil=True)] == [(30, 30), (336, 336)]


def test_to_gradio_chatbot():
    conv = build("llava_v1", "webui_two_turns")
    chat = conv.to_gradio_chatbot()
    assert len(chat) == 2
    first, answer = chat[0]
    prefix = '<img src="data:image/jpeg;base64,'
    assert first.startswith(prefix)
    b64, rest = first[len(prefix) :].split('" alt="user upload image" />')
    assert decode(b64).size == IMAGE.size and decode(b64).format == "JPEG"
    assert rest == "What is shown in this image?"  # <image> removed, stripped
    assert answer == ANSWER
    assert chat[1] == [FOLLOW_UP, None]
    # The worked example of v0 (offset 2) is not shown.
    assert build("v0", "text_only").to_gradio_chatbot() == [
        ["Hello!", "Hi! How can I help you today?"],
        ["Tell me a joke.", None],
    ]


# ---------------------------------------------------------------------------------------- HF chat templates

# Shaped like llava-hf/llava-1.5's template: images first, then text, "ASSISTANT:" as the generation prompt.
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Renders parts in order, to see where each image lands.
ORDER_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG>{% else %}({{ c['text'] }}){% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}[gen]{% endif %}"
)


def make_tokenizer(chat_template):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<image>": 1, "USER": 2, "ASSISTANT": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", chat_template=chat_template)


class TinyProcessor:
    """Stands in for a HF ProcessorMixin: its own `chat_template` (maybe None) and a `tokenizer`."""

    def __init__(self, tokenizer, chat_template=None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    def apply_chat_template(self, conversation, **kwargs):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)


def test_apply_chat_template_generation_prompt():
    tokenizer = make_tokenizer(LLAVA_HF_TEMPLATE)
    assert apply_chat_template(tokenizer, build("llava_v1", "generation")) == (
        "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    )
    # The same prompt from a web-UI tuple (image moved first, as get_prompt does).
    assert apply_chat_template(tokenizer, build("llava_v1", "webui_generation")) == (
        "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    )
    assert apply_chat_template(tokenizer, build("llava_v1", "two_turns")) == (
        "USER: <image>\nWhat is shown in this image? ASSISTANT: A red square on a white background. "
        "USER: What colour is the square? ASSISTANT:"
    )


def test_apply_chat_template_completed_turn_has_no_generation_prompt():
    tokenizer = make_tokenizer(LLAVA_HF_TEMPLATE)
    assert apply_chat_template(tokenizer, build("llava_v1", "completed")) == (
        "USER: <image>\nWhat is shown in this image? ASSISTANT: A red square on a white background. "
    )


def test_apply_chat_template_part_order_and_roles():
    tokenizer = make_tokenizer(ORDER_TEMPLATE)
    conv = conv_templates["mpt"].copy()  # roles are "<|im_start|>user\n" etc.: mapped by position in `roles`
    conv.append_message(conv.roles[0], "Compare <image> with\n<image>\nplease.")
    conv.append_message(conv.roles[1], "Same.")
    conv.append_message(conv.roles[0], ("Again? <image>", IMAGE, "Default"))
    conv.append_message(conv.roles[1], None)
    assert apply_chat_template(tokenizer, conv) == (
        "[user](Compare)<IMG>(with)<IMG>(please.)[assistant](Same.)[user]<IMG>(Again?)[gen]"
    )
    assert apply_chat_template(tokenizer, conv, include_system=True).startswith(
        "[system](<|im_start|>system\nA conversation between"
    )
    conv.append_message("someone", "Hi")
    with pytest.raises(ValueError, match="not one of the conversation's roles"):
        conversation_to_chat_messages(conv)


def test_apply_chat_template_processor():
    with_template = TinyProcessor(make_tokenizer(None), chat_template=ORDER_TEMPLATE)
    assert apply_chat_template(with_template, build("llava_v1", "generation")) == (
        "[user]<IMG>(What is shown in this image?)[gen]"
    )
    # A processor without a template of its own uses its tokenizer's.
    falls_back = TinyProcessor(make_tokenizer(LLAVA_HF_TEMPLATE))
    assert apply_chat_template(falls_back, build("llava_v1", "text_only")) == (
        "USER: Hello! ASSISTANT: Hi! How can I help you today? USER: Tell me a joke. ASSISTANT:"
    )


def test_apply_chat_template_without_template_is_none():
    assert apply_chat_template(make_tokenizer(None), build("llava_v1", "generation")) is None
    assert apply_chat_template(TinyProcessor(make_tokenizer(None)), build("llava_v1", "generation")) is None
