"""Every environment variable fastllava reads, with its default and meaning, read in one place (as vLLM's envs.py).

    from fastllava import envs
    token = args.worker_token or envs.FASTLLAVA_WORKER_TOKEN    # read from os.environ now, parsed, default applied

Attribute access reads ``os.environ`` at that moment, so a variable set after import (a test's monkeypatch, a
launcher's child environment) is seen. ``VARIABLES`` is the whole table; the README's "Environment variables"
table is generated from it (``python -m fastllava.envs``) and a test checks the two agree. The kernel layer's
variables are declared in ``fastllava.kernels.envs`` (``kernels/`` and ``csrc/`` may not import ``fastllava``
proper) and listed here with the rest. Launcher-set variables of other tools (torchrun's ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) are read where the distributed setup happens, not here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastllava.kernels.envs import KERNEL_VARIABLES, EnvVar, flag, table


def _optional_text(text: str | None) -> str | None:
    return text or None  # set but empty counts as unset


def _comma_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


LIBRARY_VARIABLES = table(
    EnvVar(
        "FASTLLAVA_CACHE",
        None,
        "where the random-weight fallback default model is built and cached",
        parse=lambda text: Path(text) if text is not None else Path.home() / ".cache" / "fastllava",
        shown_default="`~/.cache/fastllava`",
    ),
    EnvVar(
        "FASTLLAVA_ALLOW_PICKLE",
        "0",
        "`1` lets checkpoint loading read pickled `.bin` weights (with `torch.load(weights_only=True)`) when a "
        "caller passes no `allow_pickle`",
        parse=flag("0"),
    ),
    EnvVar(
        "FASTLLAVA_LOGDIR",
        None,
        "where `fastllava.utils.build_logger` writes its log files",
        parse=_optional_text,
        shown_default="`.` (LLaVA's `LOGDIR`)",
    ),
    EnvVar(
        "OPENAI_BASE_URL",
        None,
        "the OpenAI-compatible endpoint `fastllava.utils.violates_moderation` calls",
        parse=_optional_text,
        shown_default="`https://api.openai.com/v1`",
    ),
    EnvVar(
        "OPENAI_API_KEY",
        None,
        "the key for that endpoint and for eval's GPT review (`EMPTY` there when unset)",
        parse=_optional_text,
    ),
)

SERVE_VARIABLES = table(
    EnvVar(
        "FASTLLAVA_TP_TIMEOUT",
        "120",
        "seconds a tensor-parallel collective waits for a peer rank before it fails (the dead-rank watchdog)",
        parse=lambda text: float(text if text is not None else "120"),
    ),
    EnvVar(
        "FASTLLAVA_WORKER_TOKEN",
        None,
        "the shared token workers present to register and heartbeat (`--worker-token` wins; `fastllava serve` "
        "makes a random one when neither is set)",
        parse=_optional_text,
    ),
    EnvVar(
        "FASTLLAVA_API_KEYS",
        None,
        "comma-separated API keys for `/v1/*` and `/worker_generate_stream`, added to `--api-key`",
        parse=_comma_list,
    ),
    EnvVar(
        "FASTLLAVA_LOG_LEVEL",
        "INFO",
        "the servers' log level (`DEBUG`, `INFO`, `WARNING`, ...)",
        parse=lambda text: text or "INFO",
    ),
)

BENCH_VARIABLES = table(
    EnvVar(
        "FASTLLAVA_BENCH_BASELINES",
        None,
        "the folder of per-device baseline files `pytest bench` gates against",
        parse=_optional_text,
        shown_default="`bench/baselines`",
    ),
    EnvVar(
        "FASTLLAVA_BENCH_DEVICE_KIND",
        None,
        "the device kind benchmarks record and gate as (`cpu`, `h100`, ...), instead of the detected one",
        parse=_optional_text,
        shown_default="detected",
    ),
)

VARIABLES: dict[str, EnvVar] = {**KERNEL_VARIABLES, **LIBRARY_VARIABLES, **SERVE_VARIABLES, **BENCH_VARIABLES}


def readme_table() -> str:
    """The README's markdown table of ``VARIABLES`` (name, default, meaning)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for v in VARIABLES.values():
        default = v.readme_default()
        default = default if default.startswith("`") or default in ("unset", "detected") else f"`{default}`"
        rows.append(f"| `{v.name}` | {default} | {v.meaning} |")
    return "\n".join(rows)


def __getattr__(name: str) -> Any:
    if name in VARIABLES:
        return VARIABLES[name].get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    print(readme_table())
