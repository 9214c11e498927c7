"""Training's label masks (``fastllava.data.preprocess``) against LLaVA's own ``preprocess_v1`` /
``preprocess_llama_2`` / ``preprocess_mpt`` / ``preprocess_plain`` (llava-torch 1.2.2), on random conversations.

LLaVA's offsets assume a Llama-style tokenizer, so one is trained here (BPE over "▁"-marked words, byte fallback,
BOS prepended, like Llama's), in both of LLaVA's ``legacy`` modes. ``llava.train.train`` is imported with
``llava.train.llava_trainer`` stubbed (it imports a name transformers 5 dropped). Where LLaVA finds a
tokenization mismatch it silently sets every label to IGNORE_INDEX; ours raises ``SampleError("mismatch")``
instead (the named difference); everywhere else the ids and labels are equal.
"""

from __future__ import annotations

import random
import sys
import types

import pytest
import torch

from fastllava.constants import IGNORE_INDEX
from fastllava.data.preprocess import SampleError, preprocess

transformers = pytest.importorskip("transformers")
pytest.importorskip("llava.conversation")  # `pip install --no-deps llava-torch==1.2.2.post1`

WORDS = "the a red blue green circle square triangle left right top is are there how many what color shape".split()
TEMPLATES = {"vicuna_v1": "preprocess_v1", "llava_llama_2": "preprocess_llama_2", "mpt": "preprocess_mpt"}


def _llama_style_tokenizer(legacy: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    # legacy Llama puts "▁" before the text after a special token too ("always"); non-legacy only at the start
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always" if legacy else "first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    corpus = [
        "A chat between a curious human and an artificial intelligence assistant. USER: What is shown? ASSISTANT: A "
        "red circle on the left.",
        "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> Describe it. [/INST] Two squares.",
        "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\nHow many?<|im_end|><|im_start|>assistant",
        " ".join(WORDS),
    ] * 40
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "▁"]  # every character of the prompts: no <unk>
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=alphabet)  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>", pad_token="<pad>", model_max_length=2048)  # fmt: skip
    t.legacy = legacy  # what LLaVA's v1 / mpt offsets read
    return t


@pytest.fixture(scope="module")
def llava_train():
    stub = types.ModuleType("llava.train.llava_trainer")
    stub.LLaVATrainer = object
    saved = sys.modules.get("llava.train.llava_trainer")
    sys.modules["llava.train.llava_trainer"] = stub
    try:
        import llava.train.train as train
    finally:
        if saved is None:
            sys.modules.pop("llava.train.llava_trainer", None)
        else:
            sys.modules["llava.train.llava_trainer"] = saved
    return train


def _conversation(rng: random.Random, has_image: bool) -> list[dict]:
    turns = []
    for r in range(rng.randint(1, 3)):
        q = " ".join(rng.choices(WORDS, k=rng.randint(2, 9))).capitalize() + "?"
        a = " ".join(rng.choices(WORDS, k=rng.randint(1, 12))).capitalize() + "."
        if r == 0 and has_image:
            q = "<image>\n" + q
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return turns


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_label_masks_match_llavas_preprocess(template, legacy, llava_train, monkeypatch, capsys):
    import llava.conversation as llava_conv

    tok = _llama_style_tokenizer(legacy)
    monkeypatch.setattr(llava_conv, "default_conversation", llava_conv.conv_templates[template])
    fn = getattr(llava_train, TEMPLATES[template])
    rng = random.Random(hash((template, legacy)) % 1000)
    equal = mismatched = 0
    for i in range(30):
        has_image = i % 2 == 0
        turns = _conversation(rng, has_image)
        theirs = fn([[dict(t) for t in turns]], tok, has_image=has_image)
        t_ids, t_labels = theirs["input_ids"][0].tolist(), theirs["labels"][0].tolist()
        warned = "tokenization mismatch" in capsys.readouterr().out
        if warned:  # LLaVA zeroes the sample; ours refuses it by name
            assert all(x == IGNORE_INDEX for x in t_labels)
            with pytest.raises(SampleError, match="mismatch"):
                preprocess(turns, tok, template, has_image)
            mismatched += 1
            continue
        ours = preprocess(turns, tok, template, has_image)
        assert ours.input_ids == t_ids
        assert ours.labels == t_labels, (template, legacy, turns)
        equal += 1
    print(f"{template} legacy={legacy}: {equal} equal, {mismatched} LLaVA mismatches")
    assert equal + mismatched == 30
    # LLaVA's mpt offsets do not fit this tokenizer in legacy mode: LLaVA zeroes every sample, ours refuses each
    assert equal > 0 if (template, legacy) != ("mpt", True) else mismatched > 0


def test_plain_matches_llavas_preprocess_plain(llava_train):
    import llava.conversation as llava_conv

    tok = _llama_style_tokenizer(True)
    rng = random.Random(5)
    for _ in range(20):
        caption = " ".join(rng.choices(WORDS, k=rng.randint(1, 15))).capitalize() + "."
        turns = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": caption}]
        llava_conv.default_conversation = llava_conv.conv_templates["plain"]
        theirs = llava_train.preprocess_plain([[dict(t) for t in turns]], tok)
        ours = preprocess(turns, tok, "plain", True)
        assert ours.input_ids == theirs["input_ids"][0].tolist()
        assert ours.labels == theirs["labels"][0].tolist()
    assert torch.tensor(ours.labels).ne(IGNORE_INDEX).sum() > 0
