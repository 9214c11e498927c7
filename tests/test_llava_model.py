"""LLaVA's model surface on ours, checked against LLaVA's own code (``llava-torch``) and transformers.

* ``image_sizes``: LLaVA's call (``images=``, ``image_sizes=[image.size]``) means PIL's (W, H) for every
  checkpoint layout, and transformers' call (``**processor(...)``: ``pixel_values=``, (H, W) sizes, padded NeXT
  tiles) works too; both give transformers' logits on a tiny llava-hf NeXT checkpoint.
* ``get_vision_tower()``, ``encode_images``, ``prepare_inputs_labels_for_multimodal`` and
  ``initialize_vision_tokenizer`` against LLaVA's ``LlavaLlamaForCausalLM`` holding the same weights.
* LLaVA's own ``model_worker.ModelWorker.generate_stream`` running our model (its ``load_pretrained_model``
  pointed at ours): streamer, ``stopping_criteria``, ``inputs=``, ``num_patches``.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from fastllava import load_pretrained_model
from fastllava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from fastllava.mm_utils import process_images, tokenizer_image_token
from fastllava.model.export import save_llava_original
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

transformers = pytest.importorskip("transformers")
pytest.importorskip("llava.model")  # LLaVA 1.2.2 (`pip install --no-deps llava-torch==1.2.2.post1`)

from test_model_hf import _save_hf_checkpoint  # noqa: E402  (tiny llava-hf checkpoints saved by transformers)


def _image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------ image_sizes


def test_image_sizes_mean_pil_size_on_a_llava_hf_next_checkpoint(tmp_path):
    """The issue's case: 142x88 image, llava-hf NeXT. LLaVA's call with image.size gives transformers' token
    count and logits (it gave 91 tokens vs 87 when image_sizes were read as (H, W) for hf layouts)."""
    hf, proc = _save_hf_checkpoint(tmp_path, "llama", next_=True)
    image = _image(142, 88, 0)
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    inputs = proc(text=prompt, images=[image], return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits[0]
    tokenizer, model, image_processor, _ = load_pretrained_model(tmp_path, device="cpu")
    ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    pixels = process_images([image], image_processor, model.config)
    with torch.no_grad():
        got = model(ids, images=pixels, image_sizes=[image.size]).logits[0]
        # the same call with the sizes transposed is another image geometry: a different token count
        other = model(ids, images=pixels, image_sizes=[image.size[::-1]]).logits[0]
    assert got.shape == want.shape
    assert other.shape != want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_transformers_style_call_takes_pixel_values(tmp_path):
    """``model(**processor(...))`` and ``model.generate(**processor(...))`` as with transformers: expanded image
    tokens, ``pixel_values`` padded to the most tiles in the batch, ``image_sizes`` as (H, W)."""
    hf, proc = _save_hf_checkpoint(tmp_path, "llama", next_=True, seed=1)
    images = [_image(142, 88, 1), _image(40, 90, 2)]  # different tile counts: pixel_values is padded
    prompts = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nAnd here? Tell me more. ASSISTANT:"]
    inputs = proc(text=prompts, images=images, return_tensors="pt", padding=True)
    assert inputs["pixel_values"].dim() == 5
    _, model, _, _ = load_pretrained_model(tmp_path, device="cpu")
    with torch.no_grad():
        want = hf(**inputs).logits
        got = model(**inputs).logits
    keep = inputs["attention_mask"].bool()
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=0)
    single = proc(text=prompts[0], images=images[:1], return_tensors="pt")
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(**single, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=3)
        new = model.generate(**single, max_new_tokens=12, eos_token_id=[])
    assert new[0].tolist() == ref[0, single["input_ids"].shape[1] :].tolist()
    with pytest.raises(ValueError, match="not both"):
        model(single["input_ids"], images=single["pixel_values"], pixel_values=single["pixel_values"])


# ------------------------------------------------------------------ LLaVA's model internals, vs LLaVA


@pytest.fixture(scope="module", params=["pad", "anyres"])
def pair(request, tmp_path_factory):
    """Our model and LLaVA's ``LlavaLlamaForCausalLM`` loaded from the same original-layout checkpoint."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    root = tmp_path_factory.mktemp(request.param)
    cfg = tiny_config("llama", anyres=request.param == "anyres")
    src = build_tiny_llava(cfg, seed=5).eval()
    with torch.no_grad():
        if cfg.use_image_newline:
            src.image_newline.normal_(0, 1)
    path = save_llava_original(src, root / "llava-tiny", build_tokenizer(), tiny_image_processor(cfg), root / "clip")
    theirs = LlavaLlamaForCausalLM.from_pretrained(str(path)).eval()
    theirs.get_vision_tower().load_model()
    tokenizer, ours, processor, _ = load_pretrained_model(path, device="cpu")
    return SimpleNamespace(ours=ours, theirs=theirs, tokenizer=tokenizer, processor=processor, path=path)


def _pixels(pair, images):
    px = process_images(images, pair.processor, pair.ours.config)
    return list(px) if pair.ours.config.is_anyres else px


def test_vision_tower_and_encode_images_match_llava(pair):
    ours, theirs = pair.ours, pair.theirs
    vt, ref = ours.get_vision_tower(), theirs.get_vision_tower()
    assert vt.is_loaded and ref.is_loaded
    for name in ("num_patches", "num_patches_per_side", "hidden_size"):
        assert getattr(vt, name) == getattr(ref, name), name
    assert (vt.config.image_size, vt.config.patch_size) == (ref.config.image_size, ref.config.patch_size)
    assert vt.image_processor.crop_size == ref.image_processor.crop_size
    vt.load_model()  # a no-op: the weights came with the model
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(vt(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.encode_images(x), theirs.encode_images(x), atol=1e-5, rtol=1e-5)
        feats = theirs.get_model().vision_tower(x)
        torch.testing.assert_close(
            ours.get_model().mm_projector(feats), theirs.get_model().mm_projector(feats), atol=1e-5, rtol=1e-5
        )
    assert ours.get_model().embed_tokens is ours.get_input_embeddings()


def test_prepare_inputs_labels_for_multimodal_matches_llava(pair):
    """LLaVA's 6-tuple on a right-padded batch of two prompts with labels, images of two sizes."""
    tok = pair.tokenizer
    prompts = ["A chat. USER: <image>\nWhat is it? ASSISTANT: a cat", "USER: <image>\nHi ASSISTANT:"]
    rows = [tokenizer_image_token(p, tok, IMAGE_TOKEN_INDEX) for p in prompts]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[mask == 0] = IGNORE_INDEX
    images = [_image(61, 45, 3), _image(30, 70, 4)]
    sizes = [im.size for im in images]
    px = _pixels(pair, images)
    with torch.no_grad():
        want = pair.theirs.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, px, sizes)
        got = pair.ours.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, px, sizes)
    assert got[0] is None and want[0] is None and got[1] is None and want[1] is None and got[3] is None
    assert torch.equal(got[2], want[2]) and got[2].dtype == want[2].dtype
    torch.testing.assert_close(got[4], want[4], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[5], want[5])
    # without images, or one decode token: inputs come back untouched
    out = pair.ours.prepare_inputs_labels_for_multimodal(ids, None, mask, None, labels, None)
    assert out[0] is ids and out[4] is None and out[5] is labels


def test_generate_with_llavas_keywords_and_streamer(pair):
    """``generate(inputs=..., images=, image_sizes=, streamer=, stopping_criteria=, use_cache=)`` as LLaVA's
    worker calls it; the streamer's text is the decoded output; a criterion that fires stops the row."""
    from llava.mm_utils import KeywordsStoppingCriteria

    tok, model = pair.tokenizer, pair.ours
    image = _image(50, 40, 6)
    prompt = "USER: <image>\nDescribe. ASSISTANT:"
    ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    kw = dict(images=_pixels(pair, [image]), image_sizes=[image.size], max_new_tokens=10, eos_token_id=[])
    streamer = transformers.TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    full = model.generate(inputs=ids, streamer=streamer, use_cache=True, do_sample=False, **kw)
    assert full.shape == (1, 10)
    assert "".join(streamer) == tok.decode(full[0], skip_special_tokens=True)
    seen = []

    def after_three(output_ids, scores):  # transformers' calling convention: prompt + new ids, last logits
        seen.append((output_ids.shape, scores.shape))
        return output_ids.shape[1] >= ids.shape[1] + 3

    stopped = model.generate(ids, stopping_criteria=[after_three], **kw)
    assert torch.equal(stopped[0], full[0, :3])
    assert seen[0] == ((1, ids.shape[1] + 1), (1, model.config.text.vocab_size))
    # LLaVA's own criterion stops where the newest tokens decode to its keyword
    keyword = tok.decode(full[0, :4], skip_special_tokens=True)[-3:]
    crit = KeywordsStoppingCriteria([keyword], tok, ids)
    stopped = model.generate(ids, stopping_criteria=[crit], **kw)
    assert keyword in tok.decode(stopped[0]) and stopped.shape[1] <= 4


def test_initialize_vision_tokenizer_matches_llava(pair):
    for start_end, patch in ((True, False), (True, True), (False, True)):
        args = SimpleNamespace(
            mm_use_im_patch_token=patch, mm_use_im_start_end=start_end, tune_mm_mlp_adapter=True,
            pretrain_mm_mlp_adapter=None,
        )  # fmt: skip
        ours = build_tiny_llava(copy.deepcopy(pair.ours.config), seed=5)  # resizing updates its vocab_size
        ours.load_state_dict(pair.ours.state_dict())
        theirs = type(pair.theirs).from_pretrained(str(pair.path))
        tok_a, tok_b = build_tokenizer(), build_tokenizer()
        ours.initialize_vision_tokenizer(args, tok_a)
        theirs.initialize_vision_tokenizer(args, tok_b)
        assert len(tok_a) == len(tok_b) and tok_a.get_vocab() == tok_b.get_vocab()
        a_in, b_in = ours.get_input_embeddings().weight, theirs.get_input_embeddings().weight
        a_out, b_out = ours.get_output_embeddings().weight, theirs.get_output_embeddings().weight
        assert a_in.shape == b_in.shape and a_out.shape == b_out.shape
        n_old = pair.ours.config.text.vocab_size
        assert ours.config.text.vocab_size == len(tok_a) == theirs.config.vocab_size
        # old rows kept; the start/end rows are the mean of the old rows in both (LLaVA overwrites its init)
        compare = slice(0, None) if start_end and not patch else slice(0, n_old)
        torch.testing.assert_close(a_in[compare], b_in[compare])
        torch.testing.assert_close(a_out[compare], b_out[compare])
        assert (a_in.requires_grad, a_out.requires_grad) == (b_in.requires_grad, b_out.requires_grad)


# ------------------------------------------------------------------ LLaVA's own model worker on ours


def test_llava_model_worker_runs_our_model(monkeypatch, tmp_path):
    """LLaVA's ``ModelWorker`` (no controller) with ``load_pretrained_model`` pointed at ours: its
    ``generate_stream_gate`` answers a question about an image, and the text equals our own generate's."""
    import llava.utils

    import fastllava

    # LLaVA's build_logger (run when model_worker is imported) writes under LOGDIR and swaps sys.stdout/stderr
    monkeypatch.setattr(llava.utils, "LOGDIR", str(tmp_path))
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    import llava.serve.model_worker as mw

    from fastllava.conversation import conv_templates
    from fastllava.default_model import default_model_path
    from fastllava.serve.main import demo_question

    monkeypatch.setattr(mw, "load_pretrained_model", fastllava.load_pretrained_model)
    path = default_model_path()
    worker = mw.ModelWorker(
        "http://127.0.0.1:1", "http://127.0.0.1:2", "w0", True, str(path), None, None, False, False, "cpu"
    )
    image, question, truth = demo_question(seed=0)  # a picture of the embedded model's synthetic set
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    conv = conv_templates["mistral_instruct"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    params = {
        "prompt": prompt,
        "images": [base64.b64encode(buf.getvalue()).decode()],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 16,
        "stop": conv.sep2,
    }
    chunks = [json.loads(c[:-1]) for c in worker.generate_stream_gate(params)]
    assert chunks and all(c["error_code"] == 0 for c in chunks)
    answer = chunks[-1]["text"][len(prompt) :].strip()
    # ours, directly (the worker casts pixels to float16 first: do the same)
    tok, model = worker.tokenizer, worker.model
    ids = tokenizer_image_token(prompt, tok, IMAGE_TOKEN_INDEX, return_tensors="pt")[None]
    px = process_images([image], model.get_vision_tower().image_processor, model.config).half()
    new = model.generate(ids, images=px, image_sizes=[image.size], max_new_tokens=16)
    want = tok.decode(new[0], skip_special_tokens=True).split(conv.sep2)[0].strip()
    assert answer == want
    assert answer.lower() == truth.lower()  # the embedded model reads the picture


def test_logits_match_llavas_own_model(pair):
    """LLaVA's ``LlavaLlamaForCausalLM`` (its prepare_inputs + transformers' Llama) and ours, same checkpoint:
    the same logits for a padded two-prompt batch with images of two sizes (LLaVA's call: ``image.size``)."""
    tok = pair.tokenizer
    rows = [
        tokenizer_image_token(p, tok, IMAGE_TOKEN_INDEX) for p in ["USER: <image>\nWhat? ASSISTANT:", "<image>\nHi"]
    ]
    width = max(map(len, rows))
    ids = torch.full((2, width), tok.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)], mask[b, : len(r)] = torch.tensor(r), 1
    images = [_image(70, 33, 7), _image(40, 40, 8)]
    px, sizes = _pixels(pair, images), [im.size for im in images]
    with torch.no_grad():
        want = pair.theirs(input_ids=ids, attention_mask=mask, images=px, image_sizes=sizes).logits
        got = pair.ours(ids, attention_mask=mask, images=px, image_sizes=sizes).logits
    _, _, new_mask, _, _, _ = pair.theirs.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, px, sizes)
    keep = new_mask.bool()
    assert got.shape == want.shape
    torch.testing.assert_close(got[keep], want[keep], atol=1e-4, rtol=1e-4)
