"""The controller's app in-process (no worker processes): its routers and its Prometheus ``/metrics``.

    pytest tests/test_serve_controller.py

``/metrics`` is read back with prometheus_client's own parser: the names dashboards use
(``fastllava_controller_workers``, ``..._requests_total``, ``..._retries_total``, ``..._failed_mid_stream_total``)
and values that follow a request failing over between two workers that cannot be reached.
"""

from __future__ import annotations

import socket

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from fastllava.serve import controller as C


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _samples(text: str) -> dict[str, tuple[str, float]]:
    """``{sample name: (family type, value)}`` for the label-free samples of a Prometheus text page."""
    return {s.name: (f.type, s.value) for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


@pytest.fixture
def ctl():
    return C.Controller(C.parse_args(["--worker-token", "t0k3n", "--port", "1"]))


def test_metrics_parse_with_prometheus_client_and_count_failover(ctl):
    with TestClient(C.build_app(ctl)) as client:
        before = _samples(client.get("/metrics").text)
        assert before["fastllava_controller_workers"] == ("gauge", 0.0)
        for name in ("requests", "retries", "failed_mid_stream"):
            assert before[f"fastllava_controller_{name}_total"] == ("counter", 0.0)
        for port in (_closed_port(), _closed_port()):
            ctl.registry.register(f"http://127.0.0.1:{port}", {"model_names": ["m"]}, check_heart_beat=False)
        assert _samples(client.get("/metrics").text)["fastllava_controller_workers"][1] == 2.0
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 503, r.text  # both unreachable: dropped, then no live worker
        after = _samples(client.get("/metrics").text)
    assert after["fastllava_controller_workers"][1] == 0.0
    assert after["fastllava_controller_requests_total"][1] == 1.0
    assert after["fastllava_controller_retries_total"][1] == 1.0  # the second worker was a retry
    assert after["fastllava_controller_failed_mid_stream_total"][1] == 0.0


def test_routes_are_all_mounted(ctl):
    app = C.build_app(ctl)
    paths = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    for path in ("/register_worker", "/unregister_worker", "/receive_heart_beat", "/refresh_all_workers",
                 "/list_models", "/get_worker_address", "/worker_get_status", "/worker_generate_stream",
                 "/v1/chat/completions"):  # fmt: skip
        assert ("POST", path) in paths, path
    for path in ("/v1/models", "/health", "/metrics"):
        assert ("GET", path) in paths, path
    with TestClient(app) as client:
        r = client.post("/register_worker", json={"worker_name": "http://127.0.0.1:9", "check_heart_beat": False})
        assert r.status_code == 401  # the worker routes still check the token
        assert client.post("/list_models").json() == {"models": []}
        frame = client.post("/worker_generate_stream", json={"model": "m", "prompt": "hi"}).content
        assert b'"error_code": 2' in frame or b'"error_code":2' in frame  # LLaVA's "no worker" frame
