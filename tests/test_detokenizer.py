"""Incremental detokenization and stop strings (fastllava/engine/detokenizer.py) against full decodes.

Oracle: ``tokenizer.decode(ids[:n], skip_special_tokens=True)`` for every prefix ``n`` of random token
streams, on the shipped default model's tokenizer (byte-level BPE: multi-byte characters split across tokens)
and on a sentencepiece-style tokenizer built here (Metaspace, byte fallback ``<0xNN>`` tokens, Llama's
decoder with its leading-space strip) trained on a few strings with accented letters, CJK and emoji. Random
streams hit what a model's output may: special tokens, lone bytes of a character, invalid byte sequences.
"""

from __future__ import annotations

import json
import random

import pytest

from fastllava.engine.detokenizer import IncrementalDetokenizer

CORPUS = [
    "Le café est très bon, n'est-ce pas?",
    "naïve façade — déjà vu à Zürich",
    "中文的句子也要能解码。你好，世界！",
    "emoji 🙂 and 🚀 and 👍🏽 too",
    "The quick brown fox jumps over the lazy dog.",
    "a shape is a square, a circle or a triangle",
]


@pytest.fixture(scope="module")
def shipped_tokenizer():
    from transformers import AutoTokenizer

    from fastllava.default_model import default_model_path

    return AutoTokenizer.from_pretrained(str(default_model_path()))


@pytest.fixture(scope="module")
def byte_fallback_tokenizer():
    """A Llama-style sentencepiece BPE: few merges, a tiny alphabet (so every non-ASCII character takes the byte
    fallback path), <0x00>..<0xFF> byte tokens, the ▁ -> space / byte fuse / strip-one-leading-space decoder."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    probe = Tokenizer(models.BPE(unk_token="<unk>"))
    probe.normalizer = normalizers.Replace(" ", "▁")
    probe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=specials, limit_alphabet=40, show_progress=False)
    probe.train_from_iterator(CORPUS, trainer)
    vocab = dict(probe.get_vocab())
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in _merges(probe)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", clean_up_tokenization_spaces=False
    )


def _merges(tok) -> list:
    return json.loads(tok.to_str())["model"]["merges"]


def _decode(tok, ids):
    return tok.decode(ids, skip_special_tokens=True)


def _streams(tok, n: int, seed: int):
    """Random streams: half uniform over the vocabulary (specials, lone bytes), half the encoding of corpus text
    with random tokens spliced in (well-formed multi-byte characters split across tokens)."""
    rng = random.Random(seed)
    V = len(tok)
    for i in range(n):
        if i % 2:
            yield [rng.randrange(V) for _ in range(rng.randrange(1, 50))]
        else:
            ids = tok(" ".join(rng.sample(CORPUS, 3)), add_special_tokens=False).input_ids
            for _ in range(rng.randrange(0, 4)):
                ids.insert(rng.randrange(len(ids) + 1), rng.randrange(V))
            yield ids


@pytest.mark.parametrize("which", ["shipped", "byte_fallback"])
def test_incremental_text_equals_full_decode_at_every_prefix(which, shipped_tokenizer, byte_fallback_tokenizer):
    tok = shipped_tokenizer if which == "shipped" else byte_fallback_tokenizer
    if which == "byte_fallback":  # the fixture really splits characters into byte tokens
        ids = tok("語🎉", add_special_tokens=False).input_ids  # not in the training strings: 3 + 4 byte tokens
        assert sum(tok.convert_ids_to_tokens(i).startswith("<0x") for i in ids) == 7 and _decode(tok, ids) == "語🎉"
    multibyte = 0
    for stream in _streams(tok, 120, seed=1):
        ids: list[int] = []
        d = IncrementalDetokenizer(tok, ids)
        streamed = []
        for t in stream:
            ids.append(t)
            assert d.add(len(ids)) is None
            assert d.text() == _decode(tok, ids), (ids, d.text())
            piece = d.stream()
            assert "\ufffd" not in piece or "\ufffd" in _decode(tok, ids)  # no half character streamed
            streamed.append(piece)
        streamed.append(d.finish())
        assert "".join(streamed) == _decode(tok, ids) == d.text()
        multibyte += any(ord(c) > 0x7F and c != "\ufffd" for c in d.text())
    assert multibyte >= 20  # the streams did carry multi-byte characters


def test_window_decode_is_short(shipped_tokenizer):
    """The per-step decode covers a few tokens, not the whole output (the point of the exercise)."""
    tok = shipped_tokenizer
    ids: list[int] = []
    lengths = []

    class Spy:
        def decode(self, x, skip_special_tokens):
            lengths.append(len(x))
            return tok.decode(x, skip_special_tokens=skip_special_tokens)

    d = IncrementalDetokenizer(Spy(), ids)
    for t in tok(" ".join(CORPUS * 4), add_special_tokens=False).input_ids:
        ids.append(t)
        d.add(len(ids))
    assert len(ids) > 200 and max(lengths) <= 8


@pytest.mark.parametrize("which", ["shipped", "byte_fallback"])
def test_stop_strings_spanning_tokens(which, shipped_tokenizer, byte_fallback_tokenizer):
    """The stop is found at the token that completes it, and the text ends right before its first occurrence,
    as a full decode searched after every token would have it; streaming never sends any part of it."""
    tok = shipped_tokenizer if which == "shipped" else byte_fallback_tokenizer
    rng = random.Random(2)
    spanning = 0
    for stream in _streams(tok, 80, seed=3):
        full = _decode(tok, stream)
        if len(full) < 6:
            continue
        a = rng.randrange(len(full) - 3)
        stops = [full[a : a + rng.randrange(2, 6)], "never-in-the-text-§"]
        # oracle: the first prefix whose decode contains a stop string, cut at its earliest occurrence
        for n in range(1, len(stream) + 1):
            text = _decode(tok, stream[:n])
            hits = [text.find(s) for s in stops if s in text]
            if hits:
                break
        expected_n, expected_text = n, text[: min(hits)]
        ids: list[int] = []
        d = IncrementalDetokenizer(tok, ids, stops)
        streamed = []
        for t in stream:
            ids.append(t)
            found = d.add(len(ids))
            if found is not None:
                break
            streamed.append(d.stream())
        assert found in stops and len(ids) == expected_n
        assert "".join(streamed) + d.finish() == expected_text == d.text()
        spanning += len(_decode(tok, stream[: n - 1])) > full.find(found)  # began before its last token
    assert spanning >= 20
