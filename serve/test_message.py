"""Send one text message to a worker and stream the answer (LLaVA's ``test_message.py``, same arguments).

    python -m serve.test_message --controller-address http://127.0.0.1:10000 --model-name MODEL --message "Hi"
    python -m serve.test_message --worker-address http://127.0.0.1:40000 --model-name MODEL

Without ``--worker-address`` it asks the controller for the models and a worker serving ``--model-name``
(LLaVA's ``/refresh_all_workers``, ``/list_models``, ``/get_worker_address``), then streams LLaVA's
``/worker_generate_stream`` frames, printing the prompt and the answer as LLaVA's script does. Differences from
LLaVA: ``--temperature`` (LLaVA fixes 0.7) and ``--conv-mode`` (LLaVA always uses its default conversation);
a worker that answers with an error frame makes it exit 1 with the error.
"""

from __future__ import annotations

import argparse
import json
import sys

import httpx

from fastllava.conversation import conv_templates, default_conversation


def worker_address(controller: str, model: str) -> str:
    """The address the controller gives for ``model`` ("" when none serves it); prints LLaVA's lines."""
    httpx.post(controller + "/refresh_all_workers", timeout=30)
    models = sorted(httpx.post(controller + "/list_models", timeout=30).json()["models"])
    print(f"Models: {models}")
    addr = httpx.post(controller + "/get_worker_address", json={"model": model}, timeout=30).json()["address"]
    print(f"worker_addr: {addr}")
    return addr


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controller-address", default="http://localhost:21001")
    p.add_argument("--worker-address", default=None)
    p.add_argument("--model-name", default="facebook/opt-350m")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--message", default="Tell me a story with more than 1000 words.")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--conv-mode", default=None, help="a fastllava.conversation template (default: LLaVA's)")
    a = p.parse_args(argv)
    addr = a.worker_address or worker_address(a.controller_address.rstrip("/"), a.model_name)
    if addr == "":
        return 1
    conv = (conv_templates[a.conv_mode] if a.conv_mode else default_conversation).copy()
    conv.append_message(conv.roles[0], a.message)
    prompt = conv.get_prompt()
    sep = conv.sep or None  # templates without a first separator (llama_2 style) stop at their EOS
    payload = {"model": a.model_name, "prompt": prompt, "max_new_tokens": a.max_new_tokens,
               "temperature": a.temperature, "stop": sep}  # fmt: skip
    print(prompt.replace(sep, "\n") if sep else prompt, end="")
    with httpx.stream("POST", addr.rstrip("/") + "/worker_generate_stream", json=payload, timeout=300,
                      headers={"User-Agent": "LLaVA Client"}) as r:  # fmt: skip
        buf = b""
        for chunk in r.iter_bytes():
            buf += chunk
            *frames, buf = buf.split(b"\0")
            for frame in frames:
                if not frame:
                    continue
                data = json.loads(frame)
                if data.get("error_code", 0) != 0:
                    print(f"\nerror: {data.get('text', '')}", file=sys.stderr)
                    return 1
                print(data["text"].split(sep)[-1] if sep else data["text"][len(prompt) :], end="\r")
    print("")
    return 0


if __name__ == "__main__":
    sys.exit(main())
