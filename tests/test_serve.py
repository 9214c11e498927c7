"""The serving stack end to end: a controller and a worker started as real processes on loopback ports,
the embedded default model, spoken to by the official ``openai`` client and by raw HTTP.

Oracles: streamed vs non-streamed text (temperature 0), the prompt-token count computed independently from
LLaVA's template, the tokenizer and the checkpoint's ``image_seq_length``; OpenAI's error shape and status
for each kind of bad input, and a good request answered right after each; the worker's KV-block gauge back
at zero after 64 concurrent streams and after a client disconnects mid-stream.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import signal
import tempfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
from PIL import Image  # noqa: E402

from fastllava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from fastllava.conversation import conv_templates  # noqa: E402
from fastllava.default_model import random_model_path  # noqa: E402
from fastllava.mm_utils import tokenizer_image_token  # noqa: E402
from fastllava.serve import protocol as P  # noqa: E402
from fastllava.serve.controller import Registry  # noqa: E402
from fastllava.serve.images import ImagePolicy, check_public_addresses, fetch_image, host_allowed  # noqa: E402
from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http  # noqa: E402

TOKEN = "test-worker-token"
API_KEY = "sk-test-key"
MAX_BODY = 4 * 1024 * 1024


def _png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


RED, BLUE = _data_url(_png((255, 0, 0))), _data_url(_png((0, 0, 255), (30, 50)))


def _msgs(*images: str, text: str = "What color is the shape?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


# ------------------------------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def stack():
    """Controller (token + API key) and one worker; the worker also serves alone (no API key on it)."""
    model = random_model_path()  # the stack under test, on a model that never stops early
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-serve-"))
    allowed = tmp / "allowed"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(_png())
    (tmp / "outside.png").write_bytes(_png())
    env = {**os.environ, "FASTLLAVA_WORKER_TOKEN": TOKEN}
    cport, wport = free_port(), free_port()
    ctl = Proc("controller", module_cmd("controller", "--port", cport, "--heart-beat-expiration", 5,
                                        "--api-key", API_KEY, "--max-body-bytes", MAX_BODY), tmp, env)  # fmt: skip
    worker = Proc(
        "worker",
        module_cmd("worker", "--port", wport, "--controller-address", f"http://127.0.0.1:{cport}",
                   "--model-path", model, "--device", "cpu", "--heart-beat-interval", 1, "--max-images", 4,
                   "--max-body-bytes", MAX_BODY, "--allowed-local-image-dir", allowed, "--drain-timeout", 60),
        tmp, env,
    )  # fmt: skip
    try:
        ctl_url, w_url = f"http://127.0.0.1:{cport}", f"http://127.0.0.1:{wport}"
        wait_http(ctl_url + "/health", ctl)
        wait_http(w_url + "/health", worker)
        wait_http(ctl_url + "/health", ctl, ok=lambda r: r.json()["workers"] == 1, timeout=30)
        yield {"controller": ctl_url, "worker": w_url, "model": model, "tmp": tmp, "procs": (ctl, worker)}
    finally:
        worker.stop()
        ctl.stop()


@pytest.fixture(scope="module")
def clients(stack):
    return {
        "controller": openai.OpenAI(base_url=stack["controller"] + "/v1", api_key=API_KEY, max_retries=0),
        "worker": openai.OpenAI(base_url=stack["worker"] + "/v1", api_key="unused", max_retries=0),
    }


def _stream_text(client, **kw) -> tuple[str, list, object]:
    parts, reasons, use = [], [], None
    for ch in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in ch.choices:
            parts.append(c.delta.content or "")
            if c.finish_reason:
                reasons.append(c.finish_reason)
        use = ch.usage or use
    return "".join(parts), reasons, use


def _expected_prompt_tokens(model_dir: Path, n_images: int, text: str) -> int:
    """Independent count: LLaVA's template, tokenizer_image_token, and image_seq_length slots per image."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    conv = conv_templates["llava_v0"].copy()  # LLaVA's choice for a model name without a version
    conv.append_message(conv.roles[0], "\n".join(["<image>"] * n_images + [text]))
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tok, IMAGE_TOKEN_INDEX)
    per_image = json.loads((model_dir / "config.json").read_text())["image_seq_length"]
    assert ids.count(IMAGE_TOKEN_INDEX) == n_images
    return len(ids) - n_images + n_images * per_image


# ----------------------------------------------------------------------------------- OpenAI client


@pytest.mark.parametrize("via", ["controller", "worker"])
@pytest.mark.parametrize("images", [(RED,), (RED, BLUE)], ids=["one_image", "two_images"])
def test_openai_client_stream_equals_non_stream(stack, clients, via, images):
    client = clients[via]
    name = client.models.list().data[0].id
    kw = dict(model=name, messages=_msgs(*images), temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw)
    text, reasons, use = _stream_text(client, **kw)
    assert full.choices[0].message.content == text and text
    assert reasons == [full.choices[0].finish_reason] and reasons[0] in ("stop", "length")
    expected = _expected_prompt_tokens(stack["model"], len(images), "What color is the shape?")
    assert full.usage.prompt_tokens == use.prompt_tokens == expected
    assert full.usage.completion_tokens == use.completion_tokens <= 24


def test_images_change_the_answer_and_usage_counts_them(stack, clients):
    c = clients["worker"]
    name = c.models.list().data[0].id
    one = c.chat.completions.create(
        model=name, messages=_msgs(RED), temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
    )
    two = c.chat.completions.create(
        model=name, messages=_msgs(RED, RED), temperature=0, max_tokens=8, extra_body={"ignore_eos": True}
    )
    per_image = json.loads((stack["model"] / "config.json").read_text())["image_seq_length"]
    assert two.usage.prompt_tokens - one.usage.prompt_tokens >= per_image
    assert one.usage.completion_tokens == two.usage.completion_tokens == 8


def test_sampling_parameters(clients):
    c = clients["worker"]
    name = c.models.list().data[0].id
    kw = dict(model=name, messages=_msgs(BLUE, text="Describe the image."), max_tokens=16)
    greedy = c.chat.completions.create(temperature=0, extra_body={"ignore_eos": True}, **kw).choices[0].message.content
    # a stop string cuts the answer where it first appears (and is not included)
    cut = greedy[len(greedy) // 2 :][:3]
    if cut.strip():
        stopped = c.chat.completions.create(temperature=0, stop=[cut], extra_body={"ignore_eos": True}, **kw)
        assert stopped.choices[0].message.content == greedy[: greedy.index(cut)].lstrip()
        assert stopped.choices[0].finish_reason == "stop"
    # same seed, same sample; the sampled answers are not all the greedy one
    a = c.chat.completions.create(temperature=1.0, seed=1234, **kw).choices[0].message.content
    b = c.chat.completions.create(temperature=1.0, seed=1234, **kw).choices[0].message.content
    assert a == b
    others = {c.chat.completions.create(temperature=1.0, seed=s, **kw).choices[0].message.content for s in range(3)}
    assert len(others | {a}) > 1
    r = c.chat.completions.create(temperature=0, extra_body={"ignore_eos": True}, **{**kw, "max_tokens": 5})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_api_key_required_on_controller(stack):
    r = httpx.post(stack["controller"] + "/v1/chat/completions", json={"model": "x", "messages": _msgs()})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=stack["controller"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# --------------------------------------------------------------------------------------- bad input


def _bomb_png(side: int = 6000) -> bytes:
    """A small PNG whose header claims side x side pixels (compresses to a few dozen KB)."""
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG", optimize=True)
    return buf.getvalue()


def _corrupt_png() -> bytes:
    data = bytearray(_png(size=(64, 64)))
    data[60:] = b"\x00" * (len(data) - 60)  # header intact, pixel data destroyed
    return bytes(data)


BAD_CASES = {
    # name: (body or raw bytes, status, substring of the message, param or None)
    "malformed_json": (b'{"model": "m", "messages": [', 400, "not valid JSON", None),
    "bare_string_image_url": (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": RED}]}]},
        400, "not a bare string", "messages[0].content[0].image_url",
    ),
    "invalid_base64": ({"messages": _msgs("data:image/png;base64,@@notbase64@@")}, 400, "base64", None),
    "corrupt_image": ({"messages": _msgs(_data_url(_corrupt_png()))}, 400, "corrupt", None),
    "decompression_bomb": ({"messages": _msgs(_data_url(_bomb_png()))}, 400, "pixel cap", None),
    "too_many_images": ({"messages": _msgs(*[RED] * 5)}, 400, "too many images", "messages"),
    "prompt_over_context": (
        {"messages": _msgs(text="the red circle is big " * 1200)}, 400, "context length", "messages",
    ),
    "negative_max_tokens": ({"messages": _msgs(RED), "max_tokens": -5}, 400, "max_tokens", "max_tokens"),
    "unknown_model": ({"model": "no-such-model", "messages": _msgs(RED)}, 404, "does not exist", "model"),
    "remote_url_off": ({"messages": _msgs("http://127.0.0.1:9/cat.png")}, 400, "remote image URLs are disabled", None),
    "path_outside_dir": ({"messages": _msgs("OUTSIDE")}, 400, "outside the allowed directory", None),
    "n_2": ({"messages": _msgs(RED), "n": 2}, 400, "n=1", "n"),
    "body_too_large": (b"{" + b" " * (MAX_BODY + 10) + b"}", 413, "over the limit", None),
}  # fmt: skip


@pytest.mark.parametrize("via", ["worker", "controller"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gets_openai_error_and_server_keeps_serving(stack, clients, via, case):
    body, status, needle, param = BAD_CASES[case]
    url = stack[via] + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    name = clients["worker"].models.list().data[0].id
    if isinstance(body, dict):
        body = {"model": name, **body}
        if case == "path_outside_dir":
            body["messages"] = _msgs(str(stack["tmp"] / "outside.png"))
        raw = json.dumps(body).encode()
    else:
        raw = body
    r = httpx.post(url, content=raw, headers=headers, timeout=60)
    assert r.status_code == status, r.text[:500]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle.lower() in err["message"].lower(), err
    if param is not None:
        assert err["param"] == param
    assert "base64," not in r.text  # the image is never echoed back
    ok = clients[via].chat.completions.create(model=name, messages=_msgs(RED), temperature=0, max_tokens=2)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_local_path_inside_allowed_dir_works(stack, clients):
    c = clients["worker"]
    name = c.models.list().data[0].id
    inside = str(stack["tmp"] / "allowed" / "red.png")
    r = c.chat.completions.create(model=name, messages=_msgs(inside), temperature=0, max_tokens=4)
    ref = c.chat.completions.create(model=name, messages=_msgs(RED), temperature=0, max_tokens=4)
    assert r.choices[0].message.content == ref.choices[0].message.content  # the same pixels


def test_worker_registration_needs_the_token(stack):
    reg = {"worker_name": "http://127.0.0.1:9", "check_heart_beat": True,
           "worker_status": {"model_names": ["evil"], "speed": 1, "queue_length": 0}}  # fmt: skip
    for headers in ({}, {"X-Worker-Token": "wrong"}):
        r = httpx.post(stack["controller"] + "/register_worker", json=reg, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_worker_token"
        r = httpx.post(stack["controller"] + "/receive_heart_beat", json={"worker_name": "x"}, headers=headers)
        assert r.status_code == 401
    assert "evil" not in httpx.post(stack["controller"] + "/list_models").json()["models"]


# ----------------------------------------------------------------------------------- LLaVA routes


def test_llava_routes(stack, clients):
    ctl = stack["controller"]
    name = clients["worker"].models.list().data[0].id
    assert httpx.post(ctl + "/list_models").json() == {"models": [name]}
    assert httpx.post(ctl + "/get_worker_address", json={"model": name}).json()["address"] == stack["worker"]
    assert httpx.post(ctl + "/get_worker_address", json={"model": "nope"}).json()["address"] == ""
    st = httpx.post(ctl + "/worker_get_status").json()
    assert st["model_names"] == [name] and st["speed"] > 0 and "queue_length" in st
    assert httpx.post(ctl + "/refresh_all_workers").status_code == 200
    prompt = "A chat.###Human: <image>\nWhat color is the shape?###Assistant:"
    params = {"model": name, "prompt": prompt, "images": [RED.split(",", 1)[1]], "temperature": 0,
              "max_new_tokens": 12, "stop": "###"}  # fmt: skip
    assert httpx.post(ctl + "/worker_generate_stream", json=params).status_code == 401  # keys cover LLaVA's route
    key = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", ctl + "/worker_generate_stream", json=params, headers=key, timeout=60) as r:
        frames, rest = P.llava_frames(r.read())
    assert frames and not rest and all(f["error_code"] == 0 for f in frames)
    assert frames[-1]["text"].startswith(prompt) and len(frames[-1]["text"]) > len(prompt)
    bad = httpx.post(ctl + "/worker_generate_stream", json={**params, "model": "nope"}, headers=key)
    frames, _ = P.llava_frames(bad.content)
    assert frames[0]["error_code"] != 0 and "No worker" in frames[0]["text"]


# ------------------------------------------------------------------------------------- operations


def _gauge(metrics: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", metrics, re.M)
    assert m, f"{name} missing from /metrics"
    return float(m.group(1))


def _idle(worker_url: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        m = httpx.get(worker_url + "/metrics").text
        busy = _gauge(m, "fastllava:num_requests_running") + _gauge(m, "fastllava:num_requests_waiting")
        if (busy == 0 and _gauge(m, "fastllava:kv_cache_blocks_used") == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def test_health_and_metrics(stack, clients):
    assert httpx.get(stack["worker"] + "/health").json() == {"status": "ready"}
    assert httpx.get(stack["controller"] + "/health").json()["workers"] == 1
    before = httpx.get(stack["worker"] + "/metrics").text
    name = clients["worker"].models.list().data[0].id
    clients["worker"].chat.completions.create(
        model=name, messages=_msgs(RED), max_tokens=3, extra_body={"ignore_eos": True}
    )
    m = httpx.get(stack["worker"] + "/metrics").text
    for metric in ("fastllava:num_requests_running", "fastllava:num_requests_waiting", "fastllava:kv_cache_usage_perc"):
        _gauge(m, metric)
    for h in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"):
        assert f"fastllava:{h}_bucket" in m
    gen = lambda text: sum(float(x) for x in re.findall(r"^fastllava:generation_tokens_total\{.*\} (\S+)$", text, re.M))
    assert gen(m) - gen(before) == 3
    assert "fastllava_controller_workers 1" in httpx.get(stack["controller"] + "/metrics").text


def test_logs_have_request_ids_and_no_image_bytes(stack, clients):
    rid = "trace-me-123"
    name = clients["worker"].models.list().data[0].id
    clients["controller"].chat.completions.create(model=name, messages=_msgs(BLUE), max_tokens=2,
                                                  extra_headers={"X-Request-Id": rid})  # fmt: skip
    time.sleep(0.3)
    ctl, worker = stack["procs"]
    assert f"[req={rid}]" in ctl.log(100_000) and f"[req={rid}]" in worker.log(100_000)
    payload = BLUE.split(",", 1)[1]
    for p in (ctl, worker):
        assert payload[:40] not in p.log(10**7)


def test_client_disconnect_aborts_the_request(stack, clients):
    name = clients["worker"].models.list().data[0].id
    body = {"model": name, "messages": _msgs(RED), "stream": True, "max_tokens": 1500, "ignore_eos": True}
    aborted = lambda m: _gauge(m, "fastllava:request_aborted_total")
    for via in ("worker", "controller"):
        before = aborted(httpx.get(stack["worker"] + "/metrics").text)
        with httpx.stream("POST", stack[via] + "/v1/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as r:  # fmt: skip
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break  # one event, then hang up
        m = _idle(stack["worker"], timeout=10)  # 1500 tokens would take far longer than this
        assert _gauge(m, "fastllava:num_requests_running") == 0
        assert _gauge(m, "fastllava:kv_cache_blocks_used") == 0
        assert aborted(m) == before + 1


def test_64_concurrent_streams(stack, clients):
    name = clients["worker"].models.list().data[0].id
    body = {"model": name, "stream": True, "max_tokens": 12, "ignore_eos": True, "temperature": 0}

    async def one(client, i):
        msgs = _msgs(RED if i % 2 else BLUE, text=f"What shape is in the image? {i}")
        events = []
        async with client.stream("POST", stack["controller"] + "/v1/chat/completions", json={**body, "messages": msgs},
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as r:  # fmt: skip
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(line[5:].strip())
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == ["length"]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    async def run():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            return await asyncio.gather(*[one(client, i) for i in range(64)])

    texts = asyncio.run(run())
    assert len(texts) == 64
    m = _idle(stack["worker"])
    assert _gauge(m, "fastllava:kv_cache_blocks_used") == 0 and _gauge(m, "fastllava:num_requests_in_flight") == 0


def test_sigterm_drains_the_worker(stack, clients):
    """Last in this module: the worker finishes its in-flight stream, refuses new work, leaves, exits 0."""
    ctl, worker = stack["procs"]
    name = clients["worker"].models.list().data[0].id
    body = {"model": name, "messages": _msgs(RED), "stream": True, "max_tokens": 400, "ignore_eos": True}
    with httpx.stream("POST", stack["worker"] + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        worker.popen.send_signal(signal.SIGTERM)
        wait_http(stack["worker"] + "/health", ok=lambda r: r.status_code == 503, timeout=10)
        refused = httpx.post(stack["worker"] + "/v1/chat/completions", json={"model": name, "messages": _msgs(RED)})
        assert refused.status_code == 503 and refused.headers.get("retry-after")
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
    assert worker.popen.wait(30) == 0
    assert httpx.get(stack["controller"] + "/health").json()["workers"] == 0  # it unregistered


# ---------------------------------------------------------------------------------- pure functions


def test_parse_chat_request_fields():
    req = P.validate_chat(
        {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": RED}}, {"type": "text", "text": "hi"}]}],
         "stop": "###", "max_completion_tokens": 7, "stream": True, "stream_options": {"include_usage": True}}
    )  # fmt: skip
    assert req.stop == ["###"] and req.max_new_tokens == 7 and req.include_usage and len(req.images) == 1
    assert req.images[0].param == "messages[1].content[0].image_url"
    for body, param in [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": _msgs(), "temperature": 3}, "temperature"),
        ({"messages": _msgs(), "top_p": 0}, "top_p"),
        ({"messages": _msgs(), "stop": ["a"] * 5}, "stop"),
        ({"messages": _msgs(), "max_tokens": True}, "max_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0].type"),
    ]:
        with pytest.raises(P.APIError) as e:
            P.validate_chat(body)
        assert e.value.status == 400 and e.value.param == param


def test_remote_image_policy():
    assert host_allowed("img.example.com", ("example.com",)) and not host_allowed("example.com.evil", ("example.com",))
    assert host_allowed("anything.org", ())
    check_public_addresses(["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"])
    for private in (["127.0.0.1"], ["10.0.0.5"], ["169.254.169.254"], ["93.184.216.34", "192.168.1.1"], ["::1"], []):
        with pytest.raises(ValueError):
            check_public_addresses(private)
    policy = ImagePolicy(allow_remote=True, remote_hosts=("127.0.0.1", "localhost"))
    with pytest.raises(P.APIError, match="non-public address"):
        asyncio.run(fetch_image("http://127.0.0.1:9/x.png", policy))
    with pytest.raises(P.APIError, match="not in the allowed"):
        asyncio.run(fetch_image("http://example.org/x.png", policy))


def test_registry_dispatch_and_expiry():
    reg = Registry("shortest_queue", expiration=0.2)
    reg.register("http://a", {"model_names": ["m"], "speed": 1, "queue_length": 5})
    reg.register("http://b", {"model_names": ["m"], "speed": 1, "queue_length": 1})
    assert reg.pick("m") == "http://b" and reg.pick("m", {"http://b"}) == "http://a" and reg.pick("x") is None
    lottery = Registry("lottery", expiration=60)
    lottery.register("http://fast", {"model_names": ["m"], "speed": 9})
    lottery.register("http://slow", {"model_names": ["m"], "speed": 1})
    picks = [lottery.pick("m") for _ in range(400)]
    assert 0.8 < picks.count("http://fast") / 400 < 0.97
    time.sleep(0.3)
    assert reg.heart_beat("http://a", 0)
    reg.expire()
    assert list(reg.workers) == ["http://a"] and not reg.heart_beat("http://b", 0)
