"""``serve.openai_worker`` (LLaVA's ``sglang_worker`` counterpart): an external OpenAI-compatible engine behind
our controller. The engine here is a fastllava worker's own ``/v1``; through the controller, LLaVA's
``/worker_generate_stream`` and the OpenAI route both reach it, and the answers are the engine's own.

The prompt -> messages step is checked against LLaVA's own ``conversation.py`` (llava-torch 1.2.2): prompts it
renders for random multi-turn conversations parse back into the same turns for every template with role
markers (``plain`` has none, so its turns are ambiguous and it is not offered).
"""

from __future__ import annotations

import base64
import io
import json
import random
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastllava.conversation import SeparatorStyle, conv_templates  # noqa: E402
from fastllava.default_model import default_model_path  # noqa: E402
from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http  # noqa: E402
from fastllava.serve.main import demo_question  # noqa: E402
from fastllava.serve.openai_worker import prompt_to_messages, prompt_to_turns  # noqa: E402

WORDS = ["what", "is", "the", "cat", "doing", "?", "red", "blue", "42", "shape", "left", "of", "it", "."]


def test_prompts_parse_back_into_llavas_turns():
    llava_conv = pytest.importorskip("llava.conversation")
    rng = random.Random(0)
    checked = 0
    for name, theirs in llava_conv.conv_templates.items():
        if theirs.sep_style == llava_conv.SeparatorStyle.PLAIN or name not in conv_templates:
            continue
        for _ in range(10):
            n = rng.randint(1, 4)
            turns = [(" ".join(rng.choices(WORDS, k=rng.randint(1, 8))), " ".join(rng.choices(WORDS, k=5)))
                     for _ in range(n)]  # fmt: skip
            turns[0] = ("<image>\n" + turns[0][0], turns[0][1])
            conv = theirs.copy()
            conv.messages = []
            for i, (u, a) in enumerate(turns):
                conv.append_message(conv.roles[0], u)
                conv.append_message(conv.roles[1], a if i < n - 1 else None)
            got = prompt_to_turns(conv.get_prompt(), conv_templates[name])
            want = [(u, a if i < n - 1 else "") for i, (u, a) in enumerate(turns)]
            assert got == want, name
            checked += 1
    assert checked >= 100
    assert conv_templates["plain"].sep_style == SeparatorStyle.PLAIN


def test_images_fill_the_image_tags_in_order():
    conv = conv_templates["llava_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nCompare with <image> please")
    conv.append_message(conv.roles[1], None)
    msgs = prompt_to_messages(conv.get_prompt(), ["AAAA", "data:image/jpeg;base64,BBBB"], conv_templates["llava_v1"])
    assert msgs == [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "\nCompare with "},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,BBBB"}},
        {"type": "text", "text": " please"},
    ]}]  # fmt: skip
    with pytest.raises(ValueError, match="1 <image> tags but 2 images"):
        prompt_to_messages("USER: <image>\nhi ASSISTANT:", ["A", "B"], conv_templates["llava_v1"])


@pytest.fixture(scope="module")
def stack():
    """Controller; a fastllava worker serving alone (the "external engine"); the openai worker in front of it."""
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-openai-worker-"))
    cport, eport, oport = free_port(), free_port(), free_port()
    ctl, engine, ow = (f"http://127.0.0.1:{p}" for p in (cport, eport, oport))
    name = "external-llava-tiny-shapes-mistral-instruct"
    procs = [
        Proc("controller", module_cmd("controller", "--port", cport), tmp),
        Proc(
            "engine",
            module_cmd(
                "worker", "--port", eport, "--no-register", "--model-path", default_model_path(), "--device", "cpu"
            ),
            tmp,
        ),  # fmt: skip
    ]
    try:
        wait_http(ctl + "/health", procs[0])
        wait_http(engine + "/health", procs[1])
        cmd = module_cmd("openai_worker", "--port", oport, "--controller-address", ctl,
                         "--engine-url", engine + "/v1", "--model-name", name)  # fmt: skip
        procs.append(Proc("openai-worker", cmd, tmp))
        wait_http(ow + "/health", procs[2])
        wait_http(ctl + "/health", procs[0], ok=lambda r: r.json()["workers"] == 1, timeout=30)
        assert httpx.post(ctl + "/list_models").json()["models"] == [name]
        yield {"controller": ctl, "engine": engine, "name": name}
    finally:
        for p in procs:
            p.stop()


def _png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_llava_routes_and_openai_route_reach_the_engine(stack):
    ctl, engine, name = stack["controller"], stack["engine"], stack["name"]
    image, question, truth = demo_question(seed=4)
    b64 = _png(image)
    conv = conv_templates["mistral_instruct"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    params = {"model": name, "prompt": prompt, "images": [b64], "temperature": 0, "top_p": 1.0,
              "max_new_tokens": 16, "stop": conv.sep2}  # fmt: skip
    frames = []
    with httpx.stream("POST", ctl + "/worker_generate_stream", json=params, timeout=120) as r:
        assert r.status_code == 200
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            *done, buf = buf.split(b"\0")
            frames += [json.loads(f) for f in done if f]
    assert frames and all(f["error_code"] == 0 for f in frames)
    assert frames[-1]["text"].startswith(prompt)
    answer = frames[-1]["text"][len(prompt) :].strip()
    # the engine asked directly, with the messages the prompt stands for
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64}},
                                         {"type": "text", "text": question}]}]  # fmt: skip
    direct = httpx.post(engine + "/v1/chat/completions", timeout=120,
                        json={"messages": msgs, "temperature": 0, "max_tokens": 16, "stop": [conv.sep2]})  # fmt: skip
    assert answer == direct.json()["choices"][0]["message"]["content"].strip()
    assert answer.lower() == truth.lower()
    # the OpenAI route through the controller, by the registered name
    via = httpx.post(ctl + "/v1/chat/completions", timeout=120,
                     json={"model": name, "messages": msgs, "temperature": 0, "max_tokens": 16})  # fmt: skip
    assert via.status_code == 200, via.text
    assert via.json()["choices"][0]["message"]["content"].strip().lower() == truth.lower()
