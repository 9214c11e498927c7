"""Helpers for the serving tests: images as data URLs, chat messages, and a controller + workers started as
real processes on loopback ports (``serve.launcher``'s ``Proc``), stopped when the test module ends."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import httpx
from PIL import Image

from fastllava.serve.launcher import Proc, free_port, module_cmd, wait_http


def png(color=(255, 0, 0), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def msgs(*images: str, text: str = "What color is the shape?") -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@contextlib.contextmanager
def cluster(
    model: Path,
    controller_args=(),
    workers: dict[str, list] | None = None,
    env: dict | None = None,
    worker_script: Path | None = None,
):
    """A controller and named workers (``{"a": [extra worker args]}``) registered with it; yields
    ``{"controller": url, "workers": {name: url}, "procs": {name: Proc}, "tmp": dir}``. ``worker_script``: run
    the workers as ``python worker_script ARGS`` instead of ``python -m serve.worker ARGS`` (fault injection)."""
    tmp = Path(tempfile.mkdtemp(prefix="fastllava-test-serve-"))
    env = {**os.environ, **(env or {})}
    cport = free_port()
    ctl_url = f"http://127.0.0.1:{cport}"
    procs = {"controller": Proc("controller", module_cmd("controller", "--port", cport, *controller_args), tmp, env)}
    urls = {}
    for name, extra in (workers or {}).items():
        port = free_port()
        urls[name] = f"http://127.0.0.1:{port}"
        args = ["--port", port, "--controller-address", ctl_url, "--model-path", model, "--device", "cpu",
                "--heart-beat-interval", 1, *extra]  # fmt: skip
        cmd = [sys.executable, str(worker_script), *map(str, args)] if worker_script else module_cmd("worker", *args)
        procs[name] = Proc(f"worker-{name}", cmd, tmp, env)
    try:
        wait_http(ctl_url + "/health", procs["controller"])
        for name in urls:
            wait_http(urls[name] + "/health", procs[name])
        n = len(urls)
        wait_http(ctl_url + "/health", procs["controller"], ok=lambda r: r.json()["workers"] == n, timeout=60)
        yield {"controller": ctl_url, "workers": urls, "procs": procs, "tmp": tmp}
    finally:
        for p in procs.values():
            p.stop()


def model_name(url: str, headers: dict | None = None) -> str:
    return httpx.get(url + "/v1/models", headers=headers).json()["data"][0]["id"]


def ordinary_chat(url: str, headers: dict | None = None, **kw) -> dict:
    """An ordinary request, which must be answered (after each bad one)."""
    body = {"messages": msgs(data_url(png())), "max_tokens": 2, "temperature": 0, **kw}
    r = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    return r.json()
