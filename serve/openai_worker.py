"""A worker that puts an external OpenAI-compatible engine behind the LLaVA stack (LLaVA's ``sglang_worker.py``
counterpart): an SGLang or vLLM server, another fastllava worker's ``/v1``, or any ``/v1/chat/completions``.

    python -m serve.openai_worker --controller-address http://127.0.0.1:10000 --port 40001 \
        --engine-url http://127.0.0.1:30000/v1 [--engine-model NAME] [--model-name NAME] [--conv-mode M]

It registers with our controller (the shared worker token, heartbeats, re-registering when the controller
forgot it) and serves:
  * ``/worker_generate_stream`` (LLaVA's): the LLaVA prompt is turned back into chat messages by matching it
    against the conversation template (``--conv-mode``, else guessed from the model name), each ``<image>``
    becoming an ``image_url`` part with the request's image; the engine's stream comes back as LLaVA's
    NUL-separated ``{"text": prompt + answer, "error_code": 0}`` frames. A prompt that matches no template
    turn structure is sent as one user message.
  * ``/v1/chat/completions`` and ``/v1/models``: passed through to the engine (model name rewritten).
  * ``/worker_get_status``, ``/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import re

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fastllava import envs
from fastllava.constants import DEFAULT_IMAGE_TOKEN, WORKER_HEART_BEAT_INTERVAL
from fastllava.conversation import Conversation, conv_templates, guess_conv_mode
from fastllava.utils import server_error_msg

logger = logging.getLogger("fastllava.openai_worker")

WORKER_TOKEN_HEADER = "X-Worker-Token"
_SENTINEL = re.compile("\x01([UA])(\\d+)\x01")


# ------------------------------------------------------------------------------------ prompt -> messages


def _render(template: Conversation, n: int) -> list[str]:
    """``n`` sentinel turns rendered by the template, split: literal, kind, index, literal, kind, index, ..."""
    conv = template.copy()
    conv.messages = []
    for i in range(n):
        conv.append_message(conv.roles[0], f"\x01U{i}\x01")
        conv.append_message(conv.roles[1], f"\x01A{i}\x01" if i < n - 1 else None)
    return _SENTINEL.split(conv.get_prompt())


def prompt_to_turns(prompt: str, template: Conversation, max_tries: int = 8) -> list[tuple[str, str]] | None:
    """The (user, assistant) texts whose ``template.get_prompt()`` is ``prompt`` (the last assistant turn the
    one to generate), or None. Works for every separator style: the template renders sentinel turns and the
    rendering, with the sentinels as capture groups, must match the whole prompt. The turn count is first
    guessed from how often the template's between-turns text occurs, then lowered until a rendering matches."""
    turn_sep = _render(template, 2)[6]  # the literal between the first answer and the second question
    guess = prompt.count(turn_sep) + 1 if turn_sep else 1
    for n in range(guess, max(0, guess - max_tries), -1):
        pieces = _render(template, n)
        names = [(pieces[k], int(pieces[k + 1])) for k in range(1, len(pieces), 3)]
        pattern = re.escape(pieces[0]) + "".join("(.*?)" + re.escape(pieces[k + 2]) for k in range(1, len(pieces), 3))
        m = re.fullmatch(pattern, prompt, re.DOTALL)
        if m is not None:
            found = {name: m.group(j + 1) for j, name in enumerate(names)}
            return [(found[("U", i)], found.get(("A", i), "")) for i in range(n)]
    return None


def _user_content(text: str, images: list[str], used: list[int]) -> list[dict] | str:
    """``<image>`` tags -> ``image_url`` parts with the next images (data URLs), in place."""
    if DEFAULT_IMAGE_TOKEN not in text:
        return text
    parts: list[dict] = []
    for i, chunk in enumerate(text.split(DEFAULT_IMAGE_TOKEN)):
        if i > 0:
            image = images[used[0]] if used[0] < len(images) else None
            used[0] += 1
            if image is not None:
                url = image if image.startswith("data:") else "data:image/png;base64," + image
                parts.append({"type": "image_url", "image_url": {"url": url}})
        if chunk.strip():
            parts.append({"type": "text", "text": chunk})
    return parts


def prompt_to_messages(prompt: str, images: list[str], template: Conversation | None) -> list[dict]:
    """Chat messages for a LLaVA prompt (see ``prompt_to_turns``); images fill the ``<image>`` tags in order."""
    turns = prompt_to_turns(prompt, template) if template is not None else None
    if turns is None:
        logger.warning("the prompt matches no turn structure of the template; sending it as one user message")
        turns = [(prompt, "")]
    used, messages = [0], []
    for i, (user, assistant) in enumerate(turns):
        messages.append({"role": "user", "content": _user_content(user, images, used)})
        if i < len(turns) - 1:
            messages.append({"role": "assistant", "content": assistant})
    if used[0] != len(images):
        raise ValueError(f"the prompt has {used[0]} <image> tags but {len(images)} images were sent")
    return messages


# ------------------------------------------------------------------------------------------------ worker


class OpenAIWorker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.engine = args.engine_url.rstrip("/")
        self.address = (args.worker_address or f"http://{args.host}:{args.port}").rstrip("/")
        self.token = args.worker_token or envs.FASTLLAVA_WORKER_TOKEN
        self.engine_headers = {"Authorization": f"Bearer {args.engine_api_key}"} if args.engine_api_key else {}
        self.engine_model = args.engine_model
        self.model_name = args.model_name
        self.template: Conversation | None = None
        self.in_flight = 0
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout, connect=10.0))

    async def resolve_model(self) -> None:
        """The engine's model (its first ``/v1/models`` entry unless given) and the template for prompts."""
        if self.engine_model is None:
            r = await self.client.get(self.engine + "/models", headers=self.engine_headers)
            r.raise_for_status()
            self.engine_model = r.json()["data"][0]["id"]
        self.model_name = self.model_name or self.engine_model
        mode = self.args.conv_mode or guess_conv_mode(self.model_name)
        self.template = conv_templates[mode]
        logger.info("engine %s serves %s as %s (prompts parsed with %s)", self.engine, self.engine_model,
                    self.model_name, mode)  # fmt: skip

    def status(self) -> dict:
        return {"model_names": [self.model_name], "speed": self.args.speed, "queue_length": self.in_flight}

    def _controller_headers(self) -> dict[str, str]:
        return {WORKER_TOKEN_HEADER: self.token} if self.token else {}

    async def register(self) -> None:
        body = {"worker_name": self.address, "check_heart_beat": True, "worker_status": self.status()}
        r = await self.client.post(self.args.controller_address + "/register_worker", json=body,
                                   headers=self._controller_headers())  # fmt: skip
        r.raise_for_status()
        logger.info("registered with %s", self.args.controller_address)

    async def heart_beats(self) -> None:
        while True:
            await asyncio.sleep(self.args.heart_beat_interval)
            try:
                r = await self.client.post(self.args.controller_address + "/receive_heart_beat",
                                           json={"worker_name": self.address, "queue_length": self.in_flight},
                                           headers=self._controller_headers())  # fmt: skip
                if r.status_code == 200 and not r.json().get("exist", True):
                    await self.register()
            except (httpx.HTTPError, ValueError) as e:
                logger.warning("heart beat failed: %s", e)

    def chat_body(self, params: dict) -> dict:
        """LLaVA's worker parameters -> an OpenAI chat request to the engine (always streamed)."""
        messages = prompt_to_messages(params["prompt"], list(params.get("images") or []), self.template)
        body = {
            "model": self.engine_model,
            "messages": messages,
            "stream": True,
            "temperature": float(params.get("temperature", 1.0)),
            "top_p": float(params.get("top_p", 1.0)),
            "max_tokens": min(int(params.get("max_new_tokens", 256)), 1024),
        }
        if params.get("stop"):
            body["stop"] = [params["stop"]]
        return body

    async def llava_stream(self, params: dict):
        """LLaVA's frames: the prompt plus the answer so far, NUL-terminated JSON."""
        prompt = params["prompt"]
        text = ""
        self.in_flight += 1
        try:
            body = self.chat_body(params)
            async with self.client.stream("POST", self.engine + "/chat/completions", json=body,
                                          headers=self.engine_headers) as r:  # fmt: skip
                if r.status_code != 200:
                    detail = (await r.aread()).decode(errors="replace")[:500]
                    raise RuntimeError(f"engine answered HTTP {r.status_code}: {detail}")
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise RuntimeError(event["error"].get("message", "engine error"))
                    for choice in event.get("choices", []):
                        delta = (choice.get("delta") or {}).get("content") or ""
                        if delta:
                            text += delta
                            yield json.dumps({"text": prompt + text, "error_code": 0}).encode() + b"\0"
        except (httpx.HTTPError, RuntimeError, ValueError, KeyError) as e:
            logger.error("request failed: %s", e)
            yield json.dumps({"text": server_error_msg + f"\n\n({e})", "error_code": 1}).encode() + b"\0"
        finally:
            self.in_flight -= 1


def build_app(worker: OpenAIWorker) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        await worker.resolve_model()
        beats = None
        if not worker.args.no_register:
            await worker.register()
            beats = asyncio.create_task(worker.heart_beats())
        yield
        if beats is not None:
            beats.cancel()
        await worker.client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/worker_get_status")
    async def worker_get_status():
        return worker.status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        params = await request.json()
        return StreamingResponse(worker.llava_stream(params))

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": worker.model_name, "object": "model", "owned_by": "external"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = {**(await request.json()), "model": worker.engine_model}
        req = worker.client.build_request("POST", worker.engine + "/chat/completions", json=body,
                                          headers=worker.engine_headers)  # fmt: skip
        resp = await worker.client.send(req, stream=True)
        if not body.get("stream"):
            content = await resp.aread()
            await resp.aclose()
            out = json.loads(content) if resp.status_code == 200 else None
            if out is not None and "model" in out:
                out["model"] = worker.model_name
                return JSONResponse(out)
            return Response(content, status_code=resp.status_code, media_type="application/json")

        async def relay():
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(relay(), status_code=resp.status_code, media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": worker.model_name, "engine": worker.engine}

    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=40001)
    p.add_argument("--worker-address", default=None, help="how the controller reaches us (default http://host:port)")
    p.add_argument("--controller-address", default="http://127.0.0.1:10000")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--worker-token", default=None, help="registration token (else $FASTLLAVA_WORKER_TOKEN)")
    p.add_argument("--heart-beat-interval", type=float, default=WORKER_HEART_BEAT_INTERVAL)
    p.add_argument("--engine-url", required=True, help="the engine's OpenAI base URL, e.g. http://host:30000/v1")
    p.add_argument("--engine-model", default=None, help="the engine's model id (default: its first /v1/models)")
    p.add_argument("--engine-api-key", default=None)
    p.add_argument("--model-name", default=None, help="the name registered with the controller")
    p.add_argument("--conv-mode", default=None, help="the template LLaVA prompts are parsed with")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO)
    args = parse_args(argv)
    args.controller_address = args.controller_address.rstrip("/")
    uvicorn.run(build_app(OpenAIWorker(args)), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
