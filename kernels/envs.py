"""The environment variables of the kernel layer (``kernels/``, ``csrc/``), and the ``EnvVar`` record.

    from fastllava.kernels import envs
    if envs.FASTLLAVA_NF4_CUDA: ...          # read from os.environ at each access, parsed, default applied

The layering rules (docs/ARCHITECTURE.md) forbid ``kernels/`` and ``csrc/`` importing ``fastllava`` proper, so
their variables are declared here, at the bottom of the stack; ``fastllava/envs.py`` imports this table and
declares every other variable beside it, so ``fastllava.envs.VARIABLES`` is the whole list (the README's table
is checked against it). Standard library only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnvVar:
    """One variable: its name, the value used when it is unset, what it means, and how its text is parsed."""

    name: str
    default: str | None  # the text used when the variable is unset (None: unset stays None)
    meaning: str  # one line for the README's table
    parse: Callable[[str | None], Any] = lambda text: text
    shown_default: str | None = None  # the README's default when it is computed elsewhere (a path, a fallback)

    def get(self) -> Any:
        """The parsed value, read from ``os.environ`` now (tests and callers may change it at run time)."""
        return self.parse(os.environ.get(self.name, self.default))

    def readme_default(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        return "unset" if self.default is None else self.default


def flag(default: str) -> Callable[[str | None], bool]:
    """A switch that is on when the text is ``"1"``; ``default`` names the text an unset variable counts as."""
    return lambda text: (text if text is not None else default) == "1"


def table(*variables: EnvVar) -> dict[str, EnvVar]:
    return {v.name: v for v in variables}


KERNEL_MODES = ("auto", "triton", "torch")

KERNEL_VARIABLES = table(
    EnvVar(
        "FASTLLAVA_KERNELS",
        "auto",
        "`auto`: Triton ops for CUDA tensors, the torch references otherwise; `triton` / `torch` force one side "
        "for every op (read once at import; `fastllava.set_kernels()` switches at run time)",
        parse=lambda text: (text or "auto").lower(),
    ),
    EnvVar(
        "TRITON_INTERPRET",
        "0",
        "Triton's own switch: `1` runs the Triton kernels on CPU tensors in its interpreter (how CI tests them); "
        "set it before fastllava is imported",
        parse=flag("0"),
    ),
    EnvVar(
        "FASTLLAVA_NF4_CUDA",
        "1",
        "`0` never builds or uses the CUDA NF4 GEMV (`csrc/nf4_gemv.cu`); decode then runs the Triton NF4 kernel",
        parse=lambda text: text != "0",
    ),
    EnvVar(
        "FASTLLAVA_VERBOSE_BUILD",
        "0",
        "`1` prints the compiler output of the CUDA extension build",
        parse=flag("0"),
    ),
)


def __getattr__(name: str) -> Any:
    if name in KERNEL_VARIABLES:
        return KERNEL_VARIABLES[name].get()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
