"""Register a worker with a controller by hand (LLaVA's ``register_worker.py``, same arguments).

    python -m serve.register_worker --controller-address http://127.0.0.1:10000 \
        --worker-name http://127.0.0.1:40000 [--check-heart-beat] [--worker-token TOKEN]

The controller asks the worker for its status (``worker_status`` is sent empty, as LLaVA does). Our controller
needs the shared worker token (``--worker-token`` or ``$FASTLLAVA_WORKER_TOKEN``) unless it has none and the
call comes from loopback. Exits 1 with the controller's error when registration is refused (LLaVA asserts).
"""

from __future__ import annotations

import argparse
import sys

import httpx

from fastllava import envs

WORKER_TOKEN_HEADER = "X-Worker-Token"


def register_worker(
    controller_address: str, worker_name: str, check_heart_beat: bool = False, token: str | None = None
) -> httpx.Response:
    """POST LLaVA's ``/register_worker`` body; returns the controller's response."""
    token = token if token is not None else envs.FASTLLAVA_WORKER_TOKEN
    headers = {WORKER_TOKEN_HEADER: token} if token else {}
    body = {"worker_name": worker_name, "check_heart_beat": check_heart_beat, "worker_status": None}
    return httpx.post(controller_address.rstrip("/") + "/register_worker", json=body, headers=headers, timeout=30)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--controller-address", required=True)
    p.add_argument("--worker-name", required=True, help="the worker's address, e.g. http://127.0.0.1:40000")
    p.add_argument("--check-heart-beat", action="store_true")
    p.add_argument("--worker-token", default=None, help="default: $FASTLLAVA_WORKER_TOKEN")
    a = p.parse_args(argv)
    r = register_worker(a.controller_address, a.worker_name, a.check_heart_beat, a.worker_token)
    if r.status_code != 200:
        print(f"registration refused: HTTP {r.status_code}: {r.text[:500]}", file=sys.stderr)
        return 1
    print(f"registered {a.worker_name} with {a.controller_address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
