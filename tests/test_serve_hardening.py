"""Issue 23 through the real servers: a controller and a worker as processes on loopback ports, with API
keys on both (different keys: the controller vouches for its clients with the worker token), small limits,
and every kind of input that once broke a worker or reached a 500.

Each test asserts the status a client gets AND that an ordinary request is answered right after; the
property-based fuzz tests throw random bodies (valid and not: NaN, lone surrogates, huge integers, wrong
types, deep nesting) at both generating routes of both servers and require no 5xx and a healthy worker
after every example.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from serve_testing import cluster, data_url, model_name, msgs, ordinary_chat, png  # noqa: E402

from fastllava.default_model import random_model_path  # noqa: E402
from fastllava.serve import protocol as P  # noqa: E402

TOKEN = "hardening-token"
CTL_KEY, WORKER_KEY = "sk-controller", "sk-worker"
BUDGET = 20_000_000  # pixels in flight: one 4096 x 4096 image (16.8 M) fits, two do not
RED = data_url(png())
BIG = data_url(png((200, 10, 10), (4096, 4096)))  # ~50 KB of PNG, 16.8 M pixels decoded


@pytest.fixture(scope="module")
def hard():
    worker_args = ["--api-key", WORKER_KEY, "--worker-token", TOKEN, "--max-pixels-in-flight", BUDGET,
                   "--body-timeout", 3, "--default-max-tokens", 8, "--max-images", 4]  # fmt: skip
    ctl_args = ["--api-key", CTL_KEY, "--body-timeout", 3, "--heart-beat-expiration", 60]
    with cluster(random_model_path(), ctl_args, {"a": worker_args}, {"FASTLLAVA_WORKER_TOKEN": TOKEN}) as c:
        c["worker"] = c["workers"]["a"]
        c["headers"] = {"worker": {"Authorization": f"Bearer {WORKER_KEY}"},
                        "controller": {"Authorization": f"Bearer {CTL_KEY}"}}  # fmt: skip
        c["model"] = model_name(c["worker"], c["headers"]["worker"])
        yield c


def _ok_after(hard, via: str) -> None:
    ordinary_chat(hard[via], hard["headers"][via])
    assert httpx.get(hard["worker"] + "/health").status_code == 200


def _post(hard, via: str, route: str, content: bytes | dict, timeout: float = 60) -> httpx.Response:
    raw = json.dumps(content).encode() if isinstance(content, dict) else content
    headers = {**hard["headers"][via], "Content-Type": "application/json"}
    return httpx.post(hard[via] + route, content=raw, headers=headers, timeout=timeout)


def _error(r: httpx.Response, route: str) -> dict:
    """The error object of a refused request: OpenAI's shape, or (LLaVA's route) a NUL-terminated frame."""
    if route == "/worker_generate_stream":
        frames, rest = P.llava_frames(r.content)
        assert not rest and len(frames) == 1 and frames[0]["error_code"] != 0, r.content[:300]
        return frames[0]["error"]
    return r.json()["error"]


# ----------------------------------------------------------------------------- one request kills a worker

HI = [{"role": "user", "content": "hi"}]
ISSUE_PAYLOADS = {  # the issue's curl payloads: each once raised inside the engine step and killed the worker
    "top_k_1e19": ({"messages": HI, "max_tokens": 4, "temperature": 1, "top_k": 10**19}, "top_k"),
    "seed_2_63": ({"messages": HI, "max_tokens": 4, "temperature": 1, "seed": 2**63}, "seed"),
    "seed_below_int64": ({"messages": HI, "max_tokens": 4, "temperature": 1, "seed": -(2**63) - 1}, "seed"),
}


@pytest.mark.parametrize("via", ["worker", "controller"])
@pytest.mark.parametrize("case", list(ISSUE_PAYLOADS))
def test_issue_payloads_are_400_and_the_worker_keeps_serving(hard, via, case):
    body, param = ISSUE_PAYLOADS[case]
    r = _post(hard, via, "/v1/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    _ok_after(hard, via)


@pytest.mark.parametrize("via", ["worker", "controller"])
def test_top_k_over_the_vocabulary_and_max_tokens_over_the_context(hard, via):
    limits = httpx.post(hard["worker"] + "/worker_get_status").json()["limits"]
    r = _post(hard, via, "/v1/chat/completions", {"messages": HI, "temperature": 1, "top_k": limits["vocab_size"] + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k" and "vocabulary" in r.text
    r = _post(hard, via, "/v1/chat/completions", {"messages": HI, "max_tokens": limits["context_length"] + 1})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    _ok_after(hard, via)


# ------------------------------------------------------------------------------- 500s that are now 400s

_MSG = b'"messages": [{"role": "user", "content": "hi"}]'
BAD_CHAT = {  # raw body -> the param named in the 400 (None: the body as a whole)
    "nan_temperature": (b"{" + _MSG + b', "temperature": NaN}', "temperature"),
    "infinite_top_p": (b"{" + _MSG + b', "top_p": Infinity}', "top_p"),
    "lone_surrogate_content": (
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content[0].text"
    ),
    "lone_surrogate_stop": (b"{" + _MSG + b', "stop": ["\\udfff"]}', "stop[0]"),
    "deep_json": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    "5000_digit_integer": (b"{" + _MSG + b', "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
    "stream_options_wrong_type": (b"{" + _MSG + b', "stream": true, "stream_options": 7}', "stream_options"),
    "stream_yes": (b"{" + _MSG + b', "stream": "yes"}', "stream"),
    "non_object": (b"[1, 2, 3]", None),
    "invalid_utf8": (b'{"messages": "\xff\xfe"}', None),
}  # fmt: skip
BAD_LLAVA = {
    "infinite_max_new_tokens": (b'{"prompt": "hi", "max_new_tokens": Infinity}', "max_new_tokens"),
    "nan_temperature": (b'{"prompt": "hi", "temperature": NaN}', "temperature"),
    "lone_surrogate_prompt": (b'{"prompt": "\\udc00"}', "prompt"),
    "images_not_a_list": (b'{"prompt": "hi", "images": "abc"}', "images"),
    "5000_digit_integer": (b'{"prompt": "hi", "max_new_tokens": ' + b"1" * 5000 + b"}", "max_new_tokens"),
    "deep_json": (b"[" * 100_000, None),
    "non_object": (b'"hello"', None),
}


@pytest.mark.parametrize("via", ["worker", "controller"])
@pytest.mark.parametrize(
    "route,case", [("/v1/chat/completions", c) for c in BAD_CHAT] + [("/worker_generate_stream", c) for c in BAD_LLAVA]
)
def test_bad_input_is_400_naming_the_field(hard, via, route, case):
    raw, param = (BAD_CHAT if route.startswith("/v1") else BAD_LLAVA)[case]
    if route == "/worker_generate_stream" and raw.startswith(b"{"):
        raw = raw[:-1] + f', "model": "{hard["model"]}"}}'.encode()
    r = _post(hard, via, route, raw)
    assert r.status_code == 400, r.content[:300]
    err = _error(r, route)
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert len(r.content) < 1000  # nothing echoed back
    _ok_after(hard, via)


def test_non_object_bodies_on_controller_routes(hard):
    ctl = hard["controller"]
    for route in ("/get_worker_address", "/worker_generate_stream"):
        r = httpx.post(ctl + route, content=b"[1]", headers=hard["headers"]["controller"])
        assert r.status_code == 400, (route, r.content)
    assert httpx.post(ctl + "/get_worker_address", json={"model": hard["model"]}).json()["address"] == hard["worker"]
    _ok_after(hard, "controller")


def test_llava_route_through_the_controller_streams_frames(hard):
    prompt = "A chat.###Human: <image>\nWhat color is the shape?###Assistant:"
    body = {"model": hard["model"], "prompt": prompt, "images": [RED.split(",", 1)[1]], "temperature": 0,
            "max_new_tokens": 6}  # fmt: skip
    r = _post(hard, "controller", "/worker_generate_stream", body)
    frames, rest = P.llava_frames(r.content)
    assert r.status_code == 200 and frames and not rest and all(f["error_code"] == 0 for f in frames)
    assert frames[-1]["text"].startswith(prompt) and len(frames[-1]["text"]) > len(prompt)


# ------------------------------------------------------------------------------------------------ API keys


@pytest.mark.parametrize("via", ["worker", "controller"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/worker_generate_stream"])
def test_keys_on_every_generating_route(hard, via, route):
    body = (
        {"messages": msgs(RED), "max_tokens": 2} if route.startswith("/v1") else {"prompt": "hi", "max_new_tokens": 2}
    )
    body["model"] = hard["model"]
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(hard[via] + route, json=body, headers=headers, timeout=60)
        assert r.status_code == 401, (headers, r.content[:300])
        assert _error(r, route)["code"] == "invalid_api_key"
    r = httpx.post(hard[via] + route, json=body, headers=hard["headers"][via], timeout=60)
    assert r.status_code == 200, r.content[:300]  # through the controller: its key, then the worker token
    if route == "/worker_generate_stream":
        assert all(f["error_code"] == 0 for f in P.llava_frames(r.content)[0])
    _ok_after(hard, via)


def test_controller_key_does_not_open_the_worker(hard):
    r = httpx.post(hard["worker"] + "/v1/chat/completions", json={"messages": msgs(RED)},
                   headers=hard["headers"]["controller"])  # fmt: skip
    assert r.status_code == 401
    r = httpx.post(hard["worker"] + "/v1/chat/completions", json={"messages": msgs(RED)},
                   headers={**hard["headers"]["controller"], "X-Worker-Token": "guess"})  # fmt: skip
    assert r.status_code == 401


# ------------------------------------------------------------------------------------ the event loop stays free


def test_huge_prompt_is_refused_before_tokenizing_and_health_stays_fast(hard):
    limits = httpx.post(hard["worker"] + "/worker_get_status").json()["limits"]
    text = "the red circle is big " * (limits["max_prompt_chars"] // 22 + 10)
    assert len(text) > limits["max_prompt_chars"]
    delays = []

    def probe():  # another client's /health while the big body is parsed and refused
        for _ in range(10):
            t0 = time.perf_counter()
            assert httpx.get(hard["worker"] + "/health", timeout=10).status_code == 200
            delays.append(time.perf_counter() - t0)
            time.sleep(0.05)

    t = threading.Thread(target=probe)
    t.start()
    t0 = time.perf_counter()
    for via in ("worker", "controller"):
        r = _post(hard, via, "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
        assert r.json()["error"]["param"] == "messages"
    refused = time.perf_counter() - t0
    t.join()
    assert refused < 10 and max(delays) < 1.0, (refused, delays)
    _ok_after(hard, "worker")


def test_pixel_budget_refuses_with_429_and_retry_after(hard):
    body = {"model": hard["model"], "messages": msgs(BIG), "max_tokens": 1}

    def send(out: list):
        out.append(_post(hard, "worker", "/v1/chat/completions", body, timeout=120))

    results: list = []
    threads = [threading.Thread(target=send, args=(results,)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    codes = sorted(r.status_code for r in results)
    assert 200 in codes and 429 in codes and set(codes) <= {200, 429}, codes
    for r in results:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
    _ok_after(hard, "worker")
    r = _post(hard, "worker", "/v1/chat/completions", body, timeout=120)  # alone, the same request fits
    assert r.status_code == 200, r.text[:300]
    gauge = re.search(
        r"^fastllava:image_pixels_in_flight\{.*\} (\S+)$", httpx.get(hard["worker"] + "/metrics").text, re.M
    )
    assert float(gauge.group(1)) == 0  # every reservation was given back


# -------------------------------------------------------------------------------------- registration sanity


def test_registration_sanity(hard):
    ctl, tok = hard["controller"], {"X-Worker-Token": TOKEN}
    good = {"model_names": ["m2"], "speed": 1, "queue_length": 0}
    bad_statuses = [
        ({**good, "queue_length": -1_000_000}, "worker_status.queue_length"),
        ({**good, "speed": "fast"}, "worker_status.speed"),
        ({**good, "speed": 0}, "worker_status.speed"),
        ({**good, "model_names": "m2"}, "worker_status.model_names"),
    ]
    for status, param in bad_statuses:
        reg = {"worker_name": "http://127.0.0.1:9", "worker_status": status}
        r = httpx.post(ctl + "/register_worker", json=reg, headers=tok)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    nan = b'{"worker_name": "http://127.0.0.1:9", "worker_status": {"model_names": ["m2"], "speed": NaN}}'
    assert httpx.post(ctl + "/register_worker", content=nan, headers=tok).status_code == 400
    beat = {"worker_name": hard["worker"], "queue_length": -1_000_000}
    r = httpx.post(ctl + "/receive_heart_beat", json=beat, headers=tok)
    assert r.status_code == 400 and r.json()["error"]["param"] == "queue_length"
    r = httpx.post(ctl + "/receive_heart_beat", json={"worker_name": hard["worker"], "queue_length": "x"}, headers=tok)
    assert r.status_code == 400
    port = ctl.rsplit(":", 1)[1]
    for own in (ctl, f"http://localhost:{port}", f"http://127.0.0.1:{port}/"):
        r = httpx.post(ctl + "/register_worker", json={"worker_name": own, "worker_status": good}, headers=tok)
        assert r.status_code == 400 and "controller" in r.json()["error"]["message"], (own, r.text)
    assert httpx.post(ctl + "/list_models").json()["models"] == [hard["model"]]
    _ok_after(hard, "controller")


class _Forwarder:
    """A TCP proxy on a loopback port (0: a free one) to ``target`` (another address of the controller)."""

    def __init__(self, target: tuple[str, int], port: int = 0) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.server.accept()
                upstream = socket.create_connection(self.target)
                for a, b in ((client, upstream), (upstream, client)):
                    threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a: socket.socket, b: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := a.recv(65536):
                b.sendall(data)
        with contextlib.suppress(OSError):
            b.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()


def test_an_address_that_leads_back_to_the_controller(hard):
    ctl, tok = hard["controller"], {"X-Worker-Token": TOKEN}
    host, port = ctl.removeprefix("http://").split(":")
    status = {"model_names": ["m-loop"], "speed": 1, "queue_length": 0}
    proxy = _Forwarder((host, int(port)))
    try:  # at registration: the controller asks the address for its status and gets its own request back
        reg = {"worker_name": f"http://127.0.0.1:{proxy.port}", "worker_status": status}
        r = httpx.post(ctl + "/register_worker", json=reg, headers=tok)
        assert r.status_code == 400 and "leads back" in r.json()["error"]["message"], r.text
    finally:
        proxy.close()
    # registered while unreachable, then it loops: the first request that comes back drops it
    free = socket.create_server(("127.0.0.1", 0))
    loop_port = free.getsockname()[1]
    free.close()
    reg = {"worker_name": f"http://127.0.0.1:{loop_port}", "worker_status": status}
    assert httpx.post(ctl + "/register_worker", json=reg, headers=tok).status_code == 200
    assert "m-loop" in httpx.post(ctl + "/list_models").json()["models"]
    proxy = _Forwarder((host, int(port)), loop_port)
    try:
        r = _post(hard, "controller", "/v1/chat/completions", {"model": "m-loop", "messages": HI, "max_tokens": 1})
        assert r.status_code in (404, 503), r.text
        assert "m-loop" not in httpx.post(ctl + "/list_models").json()["models"]
    finally:
        proxy.close()
    _ok_after(hard, "controller")


# -------------------------------------------------------------------------------------------- slow clients


def test_slow_upload_gets_408_and_is_cut(hard):
    for via in ("worker", "controller"):
        host, port = hard[via].removeprefix("http://").split(":")
        t0 = time.perf_counter()
        with socket.create_connection((host, int(port)), timeout=15) as s:
            s.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Authorization: Bearer {CTL_KEY if via == 'controller' else WORKER_KEY}\r\n"
                      "Content-Length: 1000\r\n\r\n{".encode())  # fmt: skip
            reply = b""
            for _ in range(12):  # a byte a second; the server gives up after its 3 s body timeout
                try:
                    s.sendall(b" ")
                except OSError:
                    break
                if select.select([s], [], [], 1.0)[0]:
                    break
            with contextlib.suppress(OSError):
                while chunk := s.recv(4096):  # the 408, then the server closes the connection
                    reply += chunk
        assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
        assert time.perf_counter() - t0 < 12
        _ok_after(hard, via)


# --------------------------------------------------------------------------------------------- fuzzing

LONE = st.sampled_from(["\ud800", "a\udfffb", "\udc00\ud800"])
TEXT = st.one_of(st.text(max_size=30), LONE)
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    TEXT,
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _field(valid):
    return st.one_of(valid, valid, JUNK)  # mostly valid values, so deep fields are reached too


PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _field(TEXT)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": _field(
                st.fixed_dictionaries({"url": st.one_of(st.just(RED), st.just("data:image/png;base64,AAAA"), TEXT)})
            ),
        }
    ),  # fmt: skip
    JUNK,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": _field(st.sampled_from(["user", "system", "assistant", "developer"])),
        "content": st.one_of(TEXT, st.lists(PART, max_size=3), JUNK),
    }  # fmt: skip
)
CHAT = st.fixed_dictionaries(
    {"messages": _field(st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={
        "max_tokens": _field(st.integers(1, 3)),
        "temperature": _field(st.floats(0, 2)),
        "top_p": _field(st.floats(0.01, 1)),
        "top_k": _field(st.integers(0, 50)),
        "seed": _field(st.integers(-(2**63), 2**63 - 1)),
        "stop": _field(st.one_of(TEXT, st.lists(TEXT, max_size=5))),
        "n": _field(st.integers(0, 2)),
        "stream": _field(st.booleans()),
        "stream_options": _field(st.fixed_dictionaries({"include_usage": _field(st.booleans())})),
        "ignore_eos": _field(st.booleans()),
    },
)
LLAVA = st.fixed_dictionaries(
    {"prompt": _field(st.one_of(TEXT, TEXT.map(lambda t: "<image>\n" + t))),
     "max_new_tokens": _field(st.integers(1, 3))},
    optional={
        "images": _field(st.lists(st.one_of(st.just(RED.split(",", 1)[1]), TEXT), max_size=2)),
        "temperature": _field(st.floats(0, 2)),
        "top_p": _field(st.floats(0.01, 1)),
        "stop": _field(TEXT),
    },
)  # fmt: skip
RAW = st.sampled_from([b"[" * 50_000, b'{"a": ' + b"1" * 5000 + b"}", b"\xff\xfe\xfd", b"", b"null", b'{"messages": '])
FUZZ = settings(max_examples=50, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip


def _fuzz_once(hard, via: str, route: str, body) -> None:
    if isinstance(body, dict):
        body = {"model": hard["model"], **body}
        raw = json.dumps(body, allow_nan=True).encode()  # NaN, Infinity and lone surrogates as JSON writes them
    else:
        raw = body
    r = _post(hard, via, route, raw)
    assert r.status_code < 500, (r.status_code, r.content[:500], raw[:300])
    assert b"server_error" not in r.content, r.content[:500]  # no failure inside a stream either
    assert httpx.get(hard["worker"] + "/health").status_code == 200


@pytest.mark.parametrize("via", ["worker", "controller"])
def test_fuzz_chat_completions(hard, via):
    @FUZZ
    @given(body=st.one_of(CHAT, RAW))
    def run(body):
        _fuzz_once(hard, via, "/v1/chat/completions", body)

    run()


@pytest.mark.parametrize("via", ["worker", "controller"])
def test_fuzz_worker_generate_stream(hard, via):
    @FUZZ
    @given(body=st.one_of(LLAVA, RAW))
    def run(body):
        _fuzz_once(hard, via, "/worker_generate_stream", body)

    run()


# ------------------------------------------------------------------------------- one unhandled-error path


def test_an_unexpected_error_is_one_traceback_with_the_request_id():
    from fastapi import FastAPI
    from fastapi.responses import StreamingResponse
    from fastapi.testclient import TestClient

    from fastllava.serve.http_app import LimitsMiddleware, install_error_handlers, setup_logging

    records: list[logging.LogRecord] = []
    log = setup_logging("fastllava.test-unexpected")  # the servers' logger: a request id on every record
    log.handlers[0].emit = records.append
    app = FastAPI()
    app.add_middleware(LimitsMiddleware, logger=log)
    install_error_handlers(app, log)

    @app.post("/boom")
    async def boom():
        return {}["missing"]

    @app.post("/boom-mid-stream")
    async def boom_mid_stream():
        async def body():
            yield b"data: first\n\n"
            raise TypeError("a bug after the response started")

        return StreamingResponse(body(), media_type="text/event-stream")

    with TestClient(app) as client:  # raise_server_exceptions: anything escaping our middleware would raise here
        r = client.post("/boom", headers={"X-Request-Id": "rid-42"})
        assert r.status_code == 500 and "rid-42" in r.json()["error"]["message"]
        assert r.headers["x-request-id"] == "rid-42" and r.json()["error"]["type"] == "server_error"
        assert len(records) == 1 and records[0].exc_info is not None and "KeyError" in records[0].getMessage()
        r = client.post("/boom-mid-stream", headers={"X-Request-Id": "rid-43"})
        assert r.status_code == 200 and r.content == b"data: first\n\n"  # the body ends cleanly
        assert len(records) == 2 and records[1].exc_info[0] is TypeError and records[1].request_id == "rid-43"
