"""fastllava: LLaVA rebuilt for speed.

    from fastllava import load_pretrained_model
    tokenizer, model, image_processor, context_len = load_pretrained_model(path, device="cpu")

The subpackages `kernels`, `csrc`, `serve`, `train` and `eval` live at the top of the repository and are
installed as `fastllava.kernels`, `fastllava.serve`, ... (see setup.py). Library code always imports them
under the `fastllava.` names.
"""

from __future__ import annotations

import os as _os

# From a checkout without an install, let `fastllava.kernels` etc. resolve to the top-level folders.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "setup.py")) and _os.path.isdir(_os.path.join(_root, "kernels")):
    __path__.append(_root)  # noqa: F821  (package __path__)

__version__ = "0.1.0"

from fastllava.kernels.dispatch import get_kernels, set_kernels  # noqa: E402


def load_pretrained_model(*args, **kwargs):
    """See `fastllava.model.builder.load_pretrained_model`."""
    from fastllava.model.builder import load_pretrained_model as _load

    return _load(*args, **kwargs)


__all__ = ["load_pretrained_model", "set_kernels", "get_kernels", "__version__"]

# ``LlavaModel.generate`` is the padded API over the engine; the model package never imports the engine, so the
# adapter installs itself on the model class when imported (here, before any model can be built).
from fastllava import generation as _generation  # noqa: E402, F401
