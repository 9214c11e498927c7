"""What people are told about the default model: the web UI's examples and hint, and ``fastllava serve``'s hint.

The examples' answers are checked against the shipped model in ``tests/test_default_replies.py``; here: every
example is offered with a picture that exists, the hint is on the page, and ``fastllava serve`` prints it when
it serves the default model (and not when told another model).
"""

from __future__ import annotations

import json

import pytest

from fastllava.data.asking import DEFAULT_MODEL_HINT

pytest.importorskip("gradio")


def test_web_ui_offers_the_examples_and_the_hint(tmp_path):
    from fastllava.serve import gradio_web_server as web

    rows = json.loads((web.EXAMPLES_DIR / "examples.json").read_text())
    offered = web.examples()
    assert [q for _, q in offered] == [r["question"] for r in rows]
    assert all((web.EXAMPLES_DIR / r["image"]).is_file() for r in rows)
    demo = web.build_demo(web.WebServer(web.parse_args(["--log-dir", str(tmp_path)])))
    config = json.dumps(demo.config, default=str)
    assert DEFAULT_MODEL_HINT in config
    assert all(q in config for _, q in offered)  # the examples' questions are on the page


@pytest.mark.parametrize("model_path", [None, "/some/other/model"])
def test_serve_prints_the_hint_for_the_default_model(monkeypatch, capsys, model_path):
    from fastllava.serve import launcher, main

    seen = {}
    monkeypatch.setattr(launcher, "run_stack", lambda args: seen.setdefault("model_path", args.model_path) and 0)
    main.main(["serve"] + (["--model-path", model_path] if model_path else []))
    assert seen["model_path"] == model_path
    assert (DEFAULT_MODEL_HINT in capsys.readouterr().out) == (model_path is None)
