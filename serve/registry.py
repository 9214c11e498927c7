"""The controller's registry of model workers: who serves which model, how busy, and since when silent.

    reg = Registry("shortest_queue", expiration=90)
    reg.register("http://10.0.0.5:40000", {"model_names": ["llava-v1.5-7b"], "speed": 1, "queue_length": 0})
    worker = reg.pick("llava-v1.5-7b")          # shortest queue / speed, or a speed-weighted lottery

Statuses are validated (``protocol.WorkerStatus``); a worker whose heartbeats stop for ``expiration``
seconds is dropped at the next look-up.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field

from . import protocol as P

logger = logging.getLogger("fastllava.controller")


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    limits: P.Limits = field(default_factory=P.Limits)
    last_heart_beat: float = field(default_factory=time.monotonic)


class Registry:
    """Workers by address; dispatch by shortest queue (queue / speed) or lottery (weighted by speed)."""

    def __init__(self, dispatch_method: str, expiration: float) -> None:
        if dispatch_method not in ("shortest_queue", "lottery"):
            raise ValueError(f"dispatch method {dispatch_method!r}: use shortest_queue or lottery")
        self.method, self.expiration = dispatch_method, expiration
        self.workers: dict[str, WorkerInfo] = {}

    def register(self, name: str, status: P.WorkerStatus | dict, check_heart_beat: bool = True) -> None:
        """Add or refresh a worker; a status dict is validated (a 400 ``APIError`` naming the bad field)."""
        st = status if isinstance(status, P.WorkerStatus) else P.validate(P.WorkerStatus, status)
        self.workers[name] = WorkerInfo(st.model_names, st.speed, st.queue_length, check_heart_beat, st.worker_limits())

    def limits(self, model: str) -> P.Limits:
        """What the workers serving ``model`` accept (the loosest of them: any may get the request)."""
        return P.Limits.loosest(w.limits for w in self.workers.values() if model in w.model_names)

    def remove(self, name: str, why: str) -> None:
        if self.workers.pop(name, None) is not None:
            logger.warning("dropped worker %s: %s", name, why)

    def heart_beat(self, name: str, queue_length: int) -> bool:
        w = self.workers.get(name)
        if w is None:
            return False
        w.queue_length, w.last_heart_beat = queue_length, time.monotonic()
        return True

    def expire(self) -> None:
        now = time.monotonic()
        for name, w in list(self.workers.items()):
            if w.check_heart_beat and now - w.last_heart_beat > self.expiration:
                self.remove(name, f"no heartbeat for {now - w.last_heart_beat:.1f}s")

    def models(self) -> list[str]:
        self.expire()
        return sorted({m for w in self.workers.values() for m in w.model_names})

    def pick(self, model: str, exclude: set[str] = frozenset()) -> str | None:
        self.expire()
        cands = [(n, w) for n, w in self.workers.items() if model in w.model_names and n not in exclude]
        if not cands:
            return None
        if self.method == "lottery":
            return random.choices([n for n, _ in cands], weights=[w.speed for _, w in cands])[0]
        name, w = min(cands, key=lambda nw: (nw[1].queue_length / nw[1].speed, random.random()))
        w.queue_length += 1  # count our own dispatch until the next heartbeat says otherwise
        return name
