#!/usr/bin/env bash
# Install everything the tests need on a fresh CPU machine, then lint and run the test and benchmark suites.
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0                 # the local CPU wheel; must come before anything pulls torch
python -m pip install -q -e ".[dev]"                  # deepspeed among them: the ZeRO-2/3 tests run, on CPU
python -c "import torch; assert torch.__version__.startswith('2.13.0'), f'torch replaced: {torch.__version__}'"
# LLaVA's own code, the oracle of tests/test_llava_*.py; --no-deps: its pins (torch 2.1, transformers 4.37) would
# replace ours, and its modules import fine without them
python -m pip install -q --no-deps llava-torch==1.2.2.post1
if ! command -v chromium >/dev/null; then                # the web-UI test drives Debian's Chromium via Playwright
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m ruff check .
python -m ruff format --check .
if [ -x .ci/nvcc_check.sh ] && command -v nvcc >/dev/null; then bash .ci/nvcc_check.sh; fi
export TRITON_INTERPRET=1                              # Triton kernels run on the CPU through the interpreter
export DS_ACCELERATOR=cpu                              # DeepSpeed's CPU accelerator (no device probing)
pytest tests -q --timeout=900                         # not `python -m pytest`: the tests import the installed
pytest bench -q --timeout=900                         # package, not the repository root's folders
