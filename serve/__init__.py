"""Serving: controller, model workers, OpenAI-compatible API, Gradio web UI, CLI (`python -m serve.cli`)."""
