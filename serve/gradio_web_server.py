"""The web UI: a multimodal chat in front of a controller, like LLaVA's ``llava.serve.gradio_web_server``.

    python -m serve.gradio_web_server --controller-url http://127.0.0.1:10000 [--port 7860] [--log-dir DIR]

Upload an image, ask, and the answer streams in. The image goes through the chosen preprocessing mode
(Crop / Resize / Pad / Default, LLaVA's ``process_image``) and is sent as a data URL to the controller's
``/v1/chat/completions``, which routes it to a worker serving the selected model (and retries on another
while no token has come back). Upvote / downvote / flag append the conversation to
``<log-dir>/conv-<date>.jsonl``; images are stored once, as ``<log-dir>/images/<sha256>.png``, and the log
refers to them by hash. When no worker is up or a request fails, the chat says so plainly.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import httpx
from PIL import Image

from fastllava.conversation import default_conversation
from fastllava.data.asking import DEFAULT_MODEL_HINT
from fastllava.utils import moderation_msg, violates_moderation

from .http_app import setup_logging

logger = setup_logging("fastllava.web")
MODES = ["Crop", "Resize", "Pad", "Default"]
NO_MODEL = "No model is being served right now: start a worker (`python -m serve.worker ...`), then press Refresh."
EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def examples() -> list[list[str]]:
    """``[image path, question]`` rows of ``serve/examples/examples.json``: questions the default model answers
    (its ``answer`` fields are what ``tests/test_default_examples.py`` checks the shipped model says)."""
    rows = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    return [[str(EXAMPLES_DIR / r["image"]), r["question"]] for r in rows]


@dataclass
class Session:
    """One browser tab's conversation: API messages (images as hashes) and what the chatbot shows."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    messages: list[dict] = field(default_factory=list)  # OpenAI messages; image parts hold {"sha256": ...}
    display: list[dict] = field(default_factory=list)  # gradio chatbot messages


class WebServer:
    def __init__(self, args: argparse.Namespace) -> None:
        self.controller = args.controller_url.rstrip("/")
        self.log_dir = Path(args.log_dir).resolve()
        (self.log_dir / "images").mkdir(parents=True, exist_ok=True)
        self.api_key = args.api_key
        self.timeout = args.request_timeout
        # conversations live here, keyed by an id held in the page's gr.State (gradio copies state values)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.max_sessions = 10_000
        self.moderate = getattr(args, "moderate", False)

    def session(self, sid: str | None) -> Session:
        """The conversation with id ``sid`` (a new one if unknown); least recently used ones are dropped."""
        s = self.sessions.get(sid or "")
        if s is None:
            s = Session()
            self.sessions[s.id] = s
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(s.id)
        return s

    # ------------------------------------------------------------------------------------------- models
    def models(self) -> list[str]:
        try:
            httpx.post(self.controller + "/refresh_all_workers", timeout=10.0)
            return httpx.post(self.controller + "/list_models", timeout=10.0).json().get("models", [])
        except (httpx.HTTPError, ValueError) as e:
            logger.warning("cannot list models from %s: %s", self.controller, type(e).__name__)
            return []

    def refresh(self, current: str | None = None):
        models = self.models()
        value = current if current in models else (models[0] if models else None)
        return gr.update(choices=models, value=value)

    # ------------------------------------------------------------------------------------------- images
    def store_image(self, image: Image.Image, mode: str) -> tuple[str, Path]:
        """Preprocess as LLaVA's web UI does, store as PNG under its hash; returns (hash, path)."""
        b64 = default_conversation.copy().process_image(image.convert("RGB"), mode, image_format="PNG")
        data = base64.b64decode(b64)
        sha = hashlib.sha256(data).hexdigest()
        path = self.log_dir / "images" / f"{sha}.png"
        if not path.exists():
            path.write_bytes(data)
        return sha, path

    def _api_messages(self, session: Session) -> list[dict]:
        out = []
        for m in session.messages:
            parts = []
            for p in m["content"]:
                if "sha256" in p:
                    data = (self.log_dir / "images" / f"{p['sha256']}.png").read_bytes()
                    url = "data:image/png;base64," + base64.b64encode(data).decode()
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    parts.append(p)
            out.append({"role": m["role"], "content": parts})
        return out

    # ------------------------------------------------------------------------------------------ actions
    def add_text(self, sid: str | None, text: str, image, mode: str):
        session = self.session(sid)
        text = (text or "").strip()
        if not text and image is None:
            return session.id, session.display, text, image
        if self.moderate and text and violates_moderation(text):  # LLaVA's --moderate: the turn is not added
            return session.id, session.display, moderation_msg, None
        content, shown = [], []
        if image is not None:
            sha, path = self.store_image(image, mode)
            content.append({"sha256": sha})
            shown.append({"path": str(path)})
        if text:
            content.append({"type": "text", "text": text})
            shown.append(text)
        session.messages.append({"role": "user", "content": content})
        session.display.append({"role": "user", "content": shown})
        return session.id, session.display, "", None

    def bot(self, sid: str | None, model: str | None, temperature: float, top_p: float, max_tokens: int):
        """Stream the answer to the last user turn into the chatbot."""
        session = self.session(sid)
        if not session.messages or session.messages[-1]["role"] != "user":
            yield session.id, session.display, ""
            return
        session.display.append({"role": "assistant", "content": ""})
        if not model:
            model = (self.models() or [None])[0]
        if not model:
            session.display[-1]["content"] = NO_MODEL
            session.messages.pop()
            yield session.id, session.display, "no model"
            return
        body = {"model": model, "messages": self._api_messages(session), "stream": True,
                "temperature": float(temperature), "top_p": float(top_p), "max_tokens": int(max_tokens)}  # fmt: skip
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        text, error = "", None
        t0 = time.perf_counter()
        try:
            with httpx.stream("POST", self.controller + "/v1/chat/completions", json=body, headers=headers,
                              timeout=httpx.Timeout(self.timeout, connect=5.0)) as r:  # fmt: skip
                if r.status_code != 200:
                    error = _error_message(r.status_code, r.read())
                else:
                    for line in r.iter_lines():
                        if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                            continue
                        ev = json.loads(line[5:])
                        if "error" in ev:
                            error = ev["error"].get("message", "the worker failed")
                            break
                        for ch in ev.get("choices") or []:
                            text += (ch.get("delta") or {}).get("content") or ""
                        session.display[-1]["content"] = text + " ▌"
                        yield session.id, session.display, "generating…"
        except httpx.ConnectError:
            error = f"cannot reach the controller at {self.controller}; is it running?"
        except (httpx.HTTPError, ValueError) as e:
            error = f"the connection to the server failed ({type(e).__name__})"
        if error is not None:
            logger.warning("session %s: request failed: %s", session.id, error)
            session.display[-1]["content"] = f"⚠️ The request failed: {error}" + (f"\n\n{text}" if text else "")
            session.messages.pop()  # the turn can be sent again
            yield session.id, session.display, "request failed"
            return
        text = text.strip() or "(the model returned an empty answer)"
        session.display[-1]["content"] = text
        session.messages.append({"role": "assistant", "content": [{"type": "text", "text": text}]})
        dt = time.perf_counter() - t0
        logger.info("session %s: answered in %.2fs", session.id, dt)
        yield session.id, session.display, f"answered in {dt:.1f}s"

    def regenerate(self, sid: str | None):
        session = self.session(sid)
        if session.messages and session.messages[-1]["role"] == "assistant":
            session.messages.pop()
            session.display.pop()
        elif session.display and session.display[-1]["role"] == "assistant":
            session.display.pop()  # a failed answer: only shown, never sent
        return session.id, session.display

    def clear(self):
        s = self.session(None)
        return s.id, s.display, "", None

    def vote(self, kind: str, sid: str | None, model: str | None) -> None:
        """Append the conversation and the vote to today's log (images by hash)."""
        session = self.session(sid)
        record = {"tstamp": round(time.time(), 3), "type": kind, "model": model, "session": session.id,
                  "messages": session.messages}  # fmt: skip
        path = self.log_dir / f"conv-{datetime.date.today().isoformat()}.jsonl"
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        gr.Info(f"{kind} recorded, thank you")


def _error_message(status: int, body: bytes) -> str:
    try:
        msg = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        msg = f"HTTP {status}"
    if status == 503:
        return f"no worker can take the request right now ({msg})"
    return msg


def build_demo(web: WebServer) -> gr.Blocks:
    with gr.Blocks(title="fastllava", analytics_enabled=False) as demo:
        session = gr.State("")  # the conversation's id in WebServer.sessions
        gr.Markdown("# fastllava\nAsk about an image: upload it, type a question, press Send.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Row():
                    model = gr.Dropdown(choices=[], label="Model", elem_id="model_selector", scale=4)
                    refresh = gr.Button("Refresh", elem_id="refresh_btn", scale=1)
                image = gr.Image(type="pil", label="Image", elem_id="imagebox", sources=["upload", "clipboard"])
                mode = gr.Radio(MODES, value="Default", label="Preprocess for non-square image", elem_id="mode")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.1, label="Temperature")
                    top_p = gr.Slider(0.0, 1.0, value=0.7, step=0.1, label="Top P")
                    max_tokens = gr.Slider(1, 1024, value=512, step=1, label="Max output tokens")
            with gr.Column(scale=8):
                chatbot = gr.Chatbot(elem_id="chatbot", label="fastllava", height=550)
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    textbox = gr.Textbox(show_label=False, placeholder="Enter text and press ENTER", elem_id="textbox",
                                         scale=8)  # fmt: skip
                    send = gr.Button("Send", variant="primary", elem_id="send_btn", scale=1)
                gr.Markdown(DEFAULT_MODEL_HINT + " Click an example to try it.", elem_id="default_model_hint")
                gr.Examples(examples(), inputs=[image, textbox], label="Examples for the default model")
                with gr.Row():
                    up = gr.Button("👍 Upvote", elem_id="upvote_btn")
                    down = gr.Button("👎 Downvote", elem_id="downvote_btn")
                    flag = gr.Button("⚠️ Flag", elem_id="flag_btn")
                    regen = gr.Button("🔄 Regenerate", elem_id="regenerate_btn")
                    clear = gr.Button("🗑️ Clear", elem_id="clear_btn")
        params = [model, temperature, top_p, max_tokens]
        for trigger in (send.click, textbox.submit):
            trigger(web.add_text, [session, textbox, image, mode], [session, chatbot, textbox, image]).then(
                web.bot, [session, *params], [session, chatbot, status]
            )
        regen.click(web.regenerate, [session], [session, chatbot]).then(
            web.bot, [session, *params], [session, chatbot, status]
        )
        clear.click(web.clear, None, [session, chatbot, textbox, image])
        for btn, kind in ((up, "upvote"), (down, "downvote"), (flag, "flag")):
            btn.click(lambda s, m, kind=kind: web.vote(kind, s, m), [session, model], None)
        refresh.click(web.refresh, [model], [model])
        demo.load(web.refresh, [model], [model])
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--controller-url", default="http://127.0.0.1:10000")
    p.add_argument("--log-dir", default="fastllava-web-logs", help="votes, flags and uploaded images")
    p.add_argument("--api-key", default=None, help="bearer key for the controller's /v1, if it needs one")
    p.add_argument("--concurrency-count", type=int, default=16)
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument(
        "--moderate",
        action="store_true",
        help="check each message with an OpenAI-compatible /moderations endpoint ($OPENAI_BASE_URL, $OPENAI_API_KEY)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    web = WebServer(args)
    demo = build_demo(web)
    logger.info("web UI on http://%s:%d (controller %s)", args.host, args.port, web.controller)
    allowed = [str(web.log_dir / "images"), str(EXAMPLES_DIR)]  # votes' images; the examples' pictures
    demo.queue(default_concurrency_limit=args.concurrency_count).launch(
        server_name=args.host, server_port=args.port, allowed_paths=allowed, show_error=True
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
