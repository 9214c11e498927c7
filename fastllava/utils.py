"""LLaVA's ``llava/utils.py`` names: ``build_logger``, ``disable_torch_init``, ``violates_moderation`` and the
messages its servers show, so code ported from LLaVA imports them from here.

    logger = build_logger("model_worker", "model_worker.log")   # writes under $FASTLLAVA_LOGDIR (LLaVA's LOGDIR)
    if violates_moderation(text): ...                            # any OpenAI-compatible /moderations endpoint

Differences from LLaVA, on purpose: ``build_logger`` does not replace ``sys.stdout`` / ``sys.stderr`` with
loggers (LLaVA's does, which swallows tracebacks and breaks anything else that prints) and adds its file
handler to the loggers it builds, not to every logger that exists; ``violates_moderation`` sends real JSON
(LLaVA pastes the text into a JSON string by hand, so a quote in the text made the request invalid and the
check pass) to ``base_url`` (default ``$OPENAI_BASE_URL``, else OpenAI's), and still fails open (a network
error or an unexpected reply is "not flagged", logged as a warning) as LLaVA does.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import urllib.error
import urllib.request

from fastllava import constants, envs

server_error_msg = "**NETWORK ERROR DUE TO HIGH TRAFFIC. PLEASE REGENERATE OR REFRESH THIS PAGE.**"
moderation_msg = "YOUR INPUT VIOLATES OUR CONTENT MODERATION GUIDELINES. PLEASE TRY AGAIN."

_FORMAT = logging.Formatter(fmt="%(asctime)s | %(levelname)s | %(name)s | %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
log = logging.getLogger(__name__)


def log_dir() -> str:
    """Where ``build_logger`` writes: ``$FASTLLAVA_LOGDIR``, else LLaVA's ``LOGDIR`` (the working directory)."""
    return envs.FASTLLAVA_LOGDIR or constants.LOGDIR


def build_logger(logger_name: str, logger_filename: str, logdir: str | None = None) -> logging.Logger:
    """An INFO logger that also writes to ``<logdir>/<logger_filename>``, rotated daily (UTC), as LLaVA's."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO)
        logging.getLogger().handlers[0].setFormatter(_FORMAT)
    directory = logdir or log_dir()
    filename = os.path.abspath(os.path.join(directory, logger_filename))
    if not any(getattr(h, "baseFilename", None) == filename for h in logger.handlers):
        os.makedirs(directory, exist_ok=True)
        handler = logging.handlers.TimedRotatingFileHandler(filename, when="D", utc=True, encoding="UTF-8")
        handler.setFormatter(_FORMAT)
        logger.addHandler(handler)
    return logger


def disable_torch_init() -> None:
    """Skip torch's default init of Linear / LayerNorm (weights are loaded next anyway), as LLaVA's scripts do.
    Our loader builds models on the meta device already; this is for code that builds them itself."""
    import torch

    torch.nn.Linear.reset_parameters = lambda self: None
    torch.nn.LayerNorm.reset_parameters = lambda self: None


def violates_moderation(
    text: str, base_url: str | None = None, api_key: str | None = None, timeout: float = 5.0
) -> bool:
    """Whether an OpenAI-compatible moderation endpoint (``POST {base_url}/moderations``) flags ``text``.

    ``base_url`` defaults to ``$OPENAI_BASE_URL`` or ``https://api.openai.com/v1``, ``api_key`` to
    ``$OPENAI_API_KEY``. Newlines are dropped from the text first, as LLaVA does."""
    base = (base_url or envs.OPENAI_BASE_URL or "https://api.openai.com/v1").rstrip("/")
    key = api_key if api_key is not None else envs.OPENAI_API_KEY
    body = json.dumps({"input": text.replace("\n", "")}).encode("utf-8")
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = "Bearer " + key
    request = urllib.request.Request(base + "/moderations", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return bool(json.loads(reply.read())["results"][0]["flagged"])
    except (urllib.error.URLError, TimeoutError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        log.warning("moderation check failed (%s); treating the text as not flagged", exc)
        return False


def pretty_print_semaphore(semaphore) -> str:
    if semaphore is None:
        return "None"
    return f"Semaphore(value={semaphore._value}, locked={semaphore.locked()})"
