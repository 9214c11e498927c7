"""LLaVA's name for the worker: ``python -m serve.model_worker`` is ``python -m serve.worker``."""

from .worker import main

if __name__ == "__main__":
    raise SystemExit(main())
