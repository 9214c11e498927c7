"""The one table of checkpoint key names: every layout fastllava reads or writes, as rename rules between a
checkpoint's keys and fastllava's parameter names, used by loading, export and training alike.

Each ``Rule`` is written once and read in both directions: ``ours`` and ``theirs`` are templates with named
fields (``{rest}``: any tail, ``{param}``: one name component, ``{n}``: an integer), so a key parses against one
template and formats into the other. Rules are pure key functions: no rule reads, permutes, splits or
concatenates a tensor -- every layout below stores each of our parameters whole, under one key, in our
orientation (no q/k permutation, no fused qkv), so a tensor can be read (or sliced) straight from the file.

Layouts (``LAYOUTS[name]``):

  ``hf_legacy``  llava-hf as transformers < 4.52 and 5 write it: ``language_model.model.X``,
                 ``language_model.lm_head.X``, ``vision_tower.vision_model.X``, ``multi_modal_projector.X``,
                 ``image_newline`` (read too: transformers 5's ``vision_tower.X``, without ``vision_model``)
  ``hf_new``     llava-hf as transformers >= 4.52 holds it in memory: ``model.language_model.X``, ``lm_head.X``,
                 ``model.vision_tower.vision_model.X`` (or 5's ``model.vision_tower.X``),
                 ``model.multi_modal_projector.X``, ``model.image_newline``
  ``llava``      original LLaVA (``llava_llama`` / ``llava_mistral`` / ``llava_qwen``): ``model.X``, ``lm_head.X``,
                 ``model.mm_projector.{0,2,..}.P`` (``model.mm_projector.P`` for a linear projector),
                 ``model.vision_tower.vision_tower.vision_model.X``, ``model.image_newline``. Its language-model
                 rules are also the plain ``LlamaForCausalLM`` / Mistral / Qwen2 layout.
  ``lora``       a LLaVA LoRA run's ``adapter_model`` and ``non_lora_trainables``: ``llava`` under
                 ``base_model.model.`` (adapter weights keep peft's ``.lora_A.weight`` tails, without the
                 adapter name)
  ``vision``     a CLIP / SigLIP folder (``mm_vision_tower``): ``vision_model.X``; also read: the bare ``X``
                 of transformers 5's in-memory ``CLIPVisionModel``

Keys every layout skips on load (``DROP``): rotary ``inv_freq`` buffers, ``position_ids``, SigLIP's pooling
``head`` (LLaVA never uses it).

API (stable; tensor-parallel loading builds on it)::

    from fastllava.model import checkpoint, weights

    weights.LAYOUTS["llava"].to_ours("model.mm_projector.2.weight")    # -> "multi_modal_projector.linear_2.weight"
    weights.LAYOUTS["llava"].to_theirs("multi_modal_projector.linear_2.weight", projector_type="mlp2x_gelu")
    weights.to_ours(key, *layouts)            # first layout that knows the key; None: skipped or unknown
    layouts = weights.layouts_for(config)     # the layouts to read a checkpoint's config.json dict with
    pairs = checkpoint.checkpoint_keys(folder)        # [(file, key)], safetensors headers only, no tensor read
    where = weights.key_map(pairs, *layouts)          # {our name: (file, key)}
    # a rank then reads only its slice: safetensors.safe_open(file, "pt").get_slice(key)[rows]
    weights.remap(state, *layouts)            # a loaded {key: tensor} under our names (warns on unknown keys)
    weights.to_layout(state, layout, projector_type)  # {our name: tensor} -> that layout's keys

``to_theirs`` takes ``projector_type`` because LLaVA spells a linear projector ``model.mm_projector.weight``
and a multi-layer one ``model.mm_projector.0.weight``: a rule with ``when="linear"`` is used to write only
for a linear projector (both spellings are read whatever it is).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# what a field matches when its template does not say: {rest} any tail, {param} one name component, {n} an int
FIELDS = {"rest": r".+", "param": r"[^.]+", "n": r"\d+"}
_FIELD = re.compile(r"\{(\w+)(?::([^}]*))?\}")

DROP = re.compile(r"rotary_emb\.inv_freq$|position_ids$|(?:^|\.)head\.")


def _compile(template: str) -> re.Pattern:
    """``"model.{rest}"`` -> ``^model\\.(?P<rest>.+)$``; ``{name:regex}`` gives a field its own pattern."""
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        out.append(f"(?P<{m.group(1)}>{m.group(2) or FIELDS[m.group(1)]})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _fill(template: str, values: Mapping[str, str]) -> str:
    return _FIELD.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class Rule:
    """One rename, both ways: ``ours`` <-> ``theirs`` (templates sharing their fields).

    ``index=(a, b)``: the ``{n}`` in ``theirs`` is ``a * n + b`` of the ``{n}`` in ``ours`` (LLaVA's
    ``mm_projector`` is an ``nn.Sequential`` with GELUs between the linears: ``linear_i`` is its ``2i - 2``).
    ``aliases``: more spellings of ``theirs`` accepted when reading (never written). ``when="linear"``: written
    only for a linear projector (see the module docstring).
    """

    ours: str
    theirs: str
    index: tuple[int, int] | None = None
    aliases: tuple[str, ...] = ()
    when: str | None = None

    def __post_init__(self):
        if self.when not in (None, "linear"):
            raise ValueError(f"Rule.when is None or 'linear', not {self.when!r}")

    @cached_property
    def _ours_re(self) -> re.Pattern:
        return _compile(self.ours)

    @cached_property
    def _theirs_res(self) -> tuple[re.Pattern, ...]:
        return tuple(_compile(t) for t in (self.theirs, *self.aliases))

    def parse(self, key: str) -> str | None:
        """The checkpoint key ``key`` as our name, or None if this rule does not spell it."""
        for pattern in self._theirs_res:
            m = pattern.match(key)
            if m is None:
                continue
            values = m.groupdict()
            if self.index is not None:
                a, b = self.index
                n, rem = divmod(int(values["n"]) - b, a)
                if rem or n < 0:
                    return None
                values["n"] = str(n)
            return _fill(self.ours, values)
        return None

    def format(self, name: str, projector_type: str) -> str | None:
        """Our name ``name`` as this rule's checkpoint key, or None if the rule does not apply to it."""
        if self.when == "linear" and projector_type != "linear":
            return None
        m = self._ours_re.match(name)
        if m is None:
            return None
        values = m.groupdict()
        if self.index is not None:
            a, b = self.index
            values["n"] = str(a * int(values["n"]) + b)
        return _fill(self.theirs, values)


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: ordered rules (the first that matches wins, so specific rules come first) under an
    optional key ``prefix``."""

    name: str
    rules: tuple[Rule, ...]
    prefix: str = ""

    def to_ours(self, key: str) -> str | None:
        """Our parameter name for checkpoint key ``key``; None for a key to skip (``DROP``) or not of this layout."""
        if not key.startswith(self.prefix) or DROP.search(key):
            return None
        key = key[len(self.prefix) :]
        for rule in self.rules:
            name = rule.parse(key)
            if name is not None:
                return name
        return None

    def to_theirs(self, name: str, projector_type: str = "mlp2x_gelu") -> str | None:
        """This layout's key for our parameter ``name``; None if the layout holds no such parameter."""
        for rule in self.rules:
            key = rule.format(name, projector_type)
            if key is not None:
                return self.prefix + key
        return None


HF_LEGACY = Layout(
    "hf_legacy",
    (
        Rule("language_model.lm_head.{rest}", "language_model.lm_head.{rest}"),
        Rule("language_model.{rest}", "language_model.model.{rest}"),
        # transformers 5 writes the tower without its vision_model level; earlier versions with it
        Rule("vision_tower.{rest}", "vision_tower.vision_model.{rest}", aliases=("vision_tower.{rest}",)),
        Rule("multi_modal_projector.{rest}", "multi_modal_projector.{rest}"),
        Rule("image_newline", "image_newline"),
    ),
)

HF_NEW = Layout(
    "hf_new",
    (
        Rule("language_model.lm_head.{rest}", "lm_head.{rest}"),
        Rule("language_model.{rest}", "model.language_model.{rest}"),
        Rule("vision_tower.{rest}", "model.vision_tower.vision_model.{rest}", aliases=("model.vision_tower.{rest}",)),
        Rule("multi_modal_projector.{rest}", "model.multi_modal_projector.{rest}"),
        Rule("image_newline", "model.image_newline"),
    ),
)

_LLAVA_RULES = (
    Rule("multi_modal_projector.linear_1.{param}", "model.mm_projector.{param}", when="linear"),
    Rule("multi_modal_projector.linear_{n}.{param}", "model.mm_projector.{n}.{param}", index=(2, -2)),
    # LLaVA's CLIPVisionTower holds HF's CLIPVisionModel as .vision_tower; older nestings are read too
    Rule(
        "vision_tower.{rest}",
        "model.vision_tower.vision_tower.vision_model.{rest}",
        aliases=(r"model.vision_tower.{outer:(?:.+\.)?}vision_model.{rest}",),
    ),
    Rule("image_newline", "model.image_newline"),
    Rule("language_model.lm_head.{rest}", "lm_head.{rest}"),
    Rule("language_model.{rest}", "model.{rest}"),
)

LLAVA = Layout("llava", _LLAVA_RULES)  # also a plain Llama / Mistral / Qwen2 LM folder

LORA = Layout("lora", _LLAVA_RULES, prefix="base_model.model.")  # a LoRA run's adapter / non_lora_trainables

VISION = Layout(
    "vision",
    (
        Rule(
            "vision_tower.{rest}",
            "vision_model.{rest}",
            aliases=(r"{rest:(?:embeddings|encoder|pre_layrnorm|post_layernorm)\..+}",),
        ),
    ),
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (HF_LEGACY, HF_NEW, LLAVA, LORA, VISION)}

HF_MODEL_TYPES = ("llava", "llava_next")


def _as_layouts(layouts: Iterable[Layout | str]) -> tuple[Layout, ...]:
    out = []
    for layout in layouts:
        if isinstance(layout, str):
            if layout not in LAYOUTS:
                raise ValueError(f"unknown checkpoint layout {layout!r}; known: {', '.join(LAYOUTS)}")
            layout = LAYOUTS[layout]
        out.append(layout)
    if not out:
        raise ValueError("name at least one checkpoint layout")
    return tuple(out)


def layouts_for(config: Mapping) -> tuple[Layout, ...]:
    """The layouts to read a checkpoint with, from its ``config.json`` dict: llava-hf keys may come in either
    transformers layout; any other model type (``llava_*``, a plain LM) is read in the original-LLaVA layout.
    A vision tower folder (``mm_vision_tower``) is read with ``VISION``."""
    if config.get("model_type", "") in HF_MODEL_TYPES:
        return (HF_LEGACY, HF_NEW)
    return (LLAVA,)


def to_ours(key: str, *layouts: Layout | str) -> str | None:
    """Our name for ``key`` under the first of ``layouts`` that knows it; None if skipped or unknown to all."""
    for layout in _as_layouts(layouts):
        name = layout.to_ours(key)
        if name is not None:
            return name
    return None


def key_map(pairs: Iterable[tuple[Path, str]], *layouts: Layout | str) -> dict[str, tuple[Path, str]]:
    """``{our name: (file, key)}`` for ``(file, key)`` pairs (``checkpoint.checkpoint_keys``); keys no layout
    knows are left out (and logged), as loading leaves them out."""
    found = _as_layouts(layouts)
    out, unknown = {}, []
    for file, key in pairs:
        name = to_ours(key, *found)
        if name is not None:
            out[name] = (file, key)
        elif not DROP.search(key):
            unknown.append(key)
    if unknown:
        log.warning("ignoring %d weight(s) of no known layout, e.g. %s", len(unknown), unknown[:4])
    return out


def remap(state: Mapping[str, torch.Tensor], *layouts: Layout | str) -> dict[str, torch.Tensor]:
    """``state`` (checkpoint keys) under our names; keys that no layout knows are left out (and logged)."""
    where = key_map(((Path(), k) for k in state), *layouts)
    return {name: state[key] for name, (_, key) in where.items()}


def to_layout(
    state: Mapping[str, torch.Tensor], layout: Layout | str, projector_type: str = "mlp2x_gelu"
) -> dict[str, torch.Tensor]:
    """``state`` (our names) under ``layout``'s keys, contiguous on the CPU; a parameter the layout has no key
    for is an error (export must not drop weights silently)."""
    (layout,) = _as_layouts([layout])
    out = {}
    for name, value in state.items():
        key = layout.to_theirs(name, projector_type)
        if key is None:
            raise ValueError(f"layout {layout.name!r} has no key for parameter {name!r}")
        out[key] = value.detach().contiguous().cpu()
    return out
