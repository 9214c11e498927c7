"""Optional dependencies in one place: whether each is installed, and what to install when it is not.

    from fastllava.optional import HAS_XFORMERS, install_hint
    if not HAS_XFORMERS:
        raise RuntimeError(f"attention backend 'xformers' needs xformers: {install_hint('xformers')}")

Availability is a ``find_spec`` look-up at import (nothing optional is imported here: the import happens where
the feature is used, and the error is raised there, saying what to install). ``python -m fastllava.optional``
prints the table. Triton is the one flag computed elsewhere: ``kernels/`` may not import ``fastllava`` proper
(the layering rules), so ``fastllava.kernels.dispatch.HAS_TRITON`` is the source and this module re-exports it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from fastllava.kernels.dispatch import HAS_TRITON


@dataclass(frozen=True)
class OptionalPackage:
    module: str  # what is looked up (and imported at the point of use)
    pip: str  # what ``pip install`` takes
    used_for: str


PACKAGES: dict[str, OptionalPackage] = {
    p.module: p
    for p in (
        OptionalPackage("triton", "triton", "the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)"),
        OptionalPackage("torch.nn.attention.flex_attention", "-U 'torch>=2.5'", "the `flex` attention backend"),
        OptionalPackage("flash_attn", "flash-attn", "the `flash` attention backend"),
        OptionalPackage("xformers", "xformers", "the `xformers` attention backend"),
        OptionalPackage("bitsandbytes", "bitsandbytes", "8-bit quantization and the NF4 oracle"),
        OptionalPackage("liger_kernel", "liger-kernel", "the `liger` fused linear cross-entropy"),
        OptionalPackage("deepspeed", "deepspeed", "training with --deepspeed (ZeRO-2/3)"),
        OptionalPackage("openai", "openai", "eval's GPT review (or pip install 'fastllava[eval]')"),
        OptionalPackage("tiktoken", "tiktoken", "eval's exact token counts for GPT scoring"),
        OptionalPackage(
            "pycocoevalcap",
            "git+https://github.com/ronghanghu/coco-caption.git@python23",
            "eval's TextCaps BLEU-4 (needs Java too)",
        ),
    )
}


def available(module: str) -> bool:
    """Whether ``module`` (a key of ``PACKAGES``) can be imported here; nothing is imported."""
    if module not in PACKAGES:
        raise KeyError(f"unknown optional dependency {module!r}; known: {sorted(PACKAGES)}")
    if module == "triton":
        return HAS_TRITON
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        return False


def install_hint(module: str) -> str:
    """``"pip install <name>"`` for ``module`` (a key of ``PACKAGES``)."""
    return f"pip install {PACKAGES[module].pip}"


HAS_FLEX = available("torch.nn.attention.flex_attention")  # torch >= 2.5
HAS_FLASH_ATTN = available("flash_attn")
HAS_XFORMERS = available("xformers")
HAS_BITSANDBYTES = available("bitsandbytes")
HAS_LIGER = available("liger_kernel")
HAS_DEEPSPEED = available("deepspeed")
HAS_OPENAI = available("openai")
HAS_TIKTOKEN = available("tiktoken")
HAS_PYCOCOEVALCAP = available("pycocoevalcap")

__all__ = [
    "HAS_BITSANDBYTES",
    "HAS_DEEPSPEED",
    "HAS_FLASH_ATTN",
    "HAS_FLEX",
    "HAS_LIGER",
    "HAS_OPENAI",
    "HAS_PYCOCOEVALCAP",
    "HAS_TIKTOKEN",
    "HAS_TRITON",
    "HAS_XFORMERS",
    "PACKAGES",
    "OptionalPackage",
    "available",
    "install_hint",
]


if __name__ == "__main__":
    for name, package in PACKAGES.items():
        print(f"{name:36} {'yes' if available(name) else 'no ':3}  {install_hint(name):24}  {package.used_for}")
