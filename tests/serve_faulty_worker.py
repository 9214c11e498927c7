"""A real worker (``python -m serve.worker``'s ``main``) whose engine fails on request, for the supervision
tests: a request whose ``stop`` strings include

- ``FAULT-REQUEST``: its step raises at once (a failure the engine blames on the requests of that step);
- ``FAULT-LATER``: its step raises once it has 10 output tokens (a failure mid-stream);
- ``FAULT-DEVICE``: its step raises a CUDA error (the engine is dead: the worker must leave and exit 3).

    python tests/serve_faulty_worker.py --port 40000 --model-path DIR ...      # the worker's arguments
"""

from __future__ import annotations

import sys

from fastllava.engine.runner import ModelRunner
from fastllava.serve import worker

_launch = ModelRunner.launch


def _faulty_launch(self, out, tables):
    for req in [c.request for c in out.prefills] + list(out.decodes):
        stops = req.params.stop
        if "FAULT-DEVICE" in stops:
            raise RuntimeError("CUDA error: an injected device fault")
        if "FAULT-REQUEST" in stops or ("FAULT-LATER" in stops and len(req.output_token_ids) >= 10):
            raise ValueError(f"an injected fault in request {req.request_id}")
    return _launch(self, out, tables)


ModelRunner.launch = _faulty_launch

if __name__ == "__main__":
    raise SystemExit(worker.main(sys.argv[1:]))
