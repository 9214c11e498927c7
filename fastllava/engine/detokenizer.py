"""Incremental detokenization and stop strings: constant host work per generated token.

Decoding a request's whole output on every step (and searching it for stop strings) costs O(n) per token,
O(n²) per answer. ``IncrementalDetokenizer`` decodes a short window of the newest tokens instead, with the
prefix/read offsets of vLLM's incremental detokenizer (``detokenize_incrementally``):

    committed text | decode(ids[prefix:read]) = prefix_text | new tokens ids[read:]

Each step decodes ``ids[prefix:]``; what it adds past ``prefix_text`` is new text. It is committed (and the
window slides: ``prefix = read``, ``read = len(ids)``) unless it ends in U+FFFD, i.e. a multi-byte character
whose bytes are split across tokens (byte-level BPE, sentencepiece byte fallback) is still incomplete, or
its last token is a byte-fallback or special token (see ``uncommittable_ids``); then the window grows until that is
over. Decoding a window rather than single tokens keeps what
context-dependent decoders do at token boundaries (sentencepiece's leading-space strip happens to the
window's first token in both decodes, and cancels). The text so far is always ``committed + pending``, and
equals ``tokenizer.decode(ids, skip_special_tokens=True)`` (the tests check it at every prefix).

Stop strings are searched only in what may contain a new match: the last ``max(len(stop)) - 1`` committed
characters, the new text and the pending tail. Streaming holds those same characters back (they may still
become the start of a stop string) and never streams the pending tail (an incomplete character).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"  # what a decoder yields for the bytes of an incomplete UTF-8 character
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def fast_decode(tokenizer) -> Callable[..., str]:
    """``tokenizer.decode``, or the Rust ``tokenizers`` decoder behind a transformers fast tokenizer when that is
    all ``decode`` would run (no ``clean_up_tokenization_spaces``): the same text, without ~10 us of Python
    argument handling per call, twice per request per step."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "decode") or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.decode
    for cls in type(tokenizer).__mro__:  # a subclass below the fast-tokenizer base that decodes its own way
        if "backend_tokenizer" in vars(cls):
            return backend.decode
        if "decode" in vars(cls) or "_decode" in vars(cls):
            return tokenizer.decode
    return tokenizer.decode


@functools.lru_cache(maxsize=8)
def uncommittable_ids(tokenizer) -> frozenset[int]:
    """Ids a window never ends a commit on: sentencepiece byte-fallback tokens (``<0xNN>``) and special tokens.

    The byte-fallback decoder turns each run of byte tokens into text as one byte string, and when the run is
    not valid UTF-8 *every* byte of it becomes U+FFFD: a later byte can turn characters already decoded into
    replacement characters. Special tokens are dropped before decoding (``skip_special_tokens``), so the bytes
    on both sides of one are one run. Found once per tokenizer."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ids = {i for t, i in vocab.items() if _BYTE_TOKEN.fullmatch(t)}
    return frozenset(ids | set(getattr(tokenizer, "all_special_ids", ())))


class IncrementalDetokenizer:
    """The output text of one request, built a few tokens at a time.

    ``add(n)`` once the request's first ``n`` token ids are known; ``stream()`` returns the text that can be
    sent now; ``finish()`` returns the rest and ``text()`` the whole text. A stop string found ends the text
    before it (``stopped``), as a full decode cut at its first stop string would.
    """

    def __init__(self, tokenizer, token_ids: Sequence[int], stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = token_ids  # the request's output ids (shared, appended to by the engine)
        self.stop = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may start a stop string
        self.prefix = self.read = 0
        self.prefix_text = ""
        self.sent: list[str] = []  # streamed pieces (joined once, by text())
        self.unsent = ""  # committed text not streamed yet: at most `hold` chars + one step's new text
        self.pending = ""  # decoded tokens past `read` whose text is not committed (may end in U+FFFD)
        self.stopped: str | None = None  # the stop string found
        self.uncommittable = uncommittable_ids(tokenizer)
        self._decode_fn = fast_decode(tokenizer)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._decode_fn(ids, skip_special_tokens=True)

    def add(self, n: int) -> str | None:
        """Take ``token_ids[:n]`` (the tokens known so far; later entries may be placeholders); returns the stop
        string found, if any.

        Host work: two decodes of the window (a few tokens) and a search of O(new text + longest stop) chars.
        """
        if self.stopped is not None:
            return self.stopped
        text = self._decode(self.ids[self.prefix : n])
        if text.startswith(self.prefix_text):
            new = text[len(self.prefix_text) :]
        else:  # a decoder that rewrote the window's start (e.g. clean_up_tokenization_spaces): redo it alone
            new = self._decode(self.ids[self.read : n])
        if new and not new.endswith(REPLACEMENT) and self.ids[n - 1] not in self.uncommittable:
            self.unsent += new
            self.pending = ""
            self.prefix, self.read = self.read, n
            self.prefix_text = self._decode(self.ids[self.prefix : n])
        else:
            self.pending = new
        if self.stop:
            region = self.unsent + self.pending  # every char a new match can touch
            cuts = [(i, s) for s in self.stop if (i := region.find(s)) >= 0]
            if cuts:
                cut, self.stopped = min(cuts)
                self.unsent, self.pending = region[:cut], ""
        return self.stopped

    def stream(self) -> str:
        """Committed text that can be sent while the request runs (none that may still become a stop string)."""
        keep = len(self.unsent) - self.hold if self.stop else len(self.unsent)
        if keep <= 0:
            return ""
        delta, self.unsent = self.unsent[:keep], self.unsent[keep:]
        self.sent.append(delta)
        return delta

    def finish(self) -> str:
        """Everything not streamed yet (the request is over): held-back text and an incomplete tail."""
        delta = self.unsent + self.pending
        self.unsent = self.pending = ""
        self.sent.append(delta)
        return delta

    def text(self) -> str:
        """The whole text so far (O(length): for final outputs, or callers who asked for it)."""
        return "".join(self.sent) + self.unsent + self.pending
