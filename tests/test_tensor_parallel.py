"""Tensor parallelism on CPU (gloo, 2 ranks): the shard layout covers every weight exactly once, and greedy
tokens of the engine over a 2-rank model equal the unsharded model's on tiny llama / mistral / qwen2
checkpoints (2 K/V heads, and 1 K/V head: fewer than ranks, replicated), text-only and with images, in both
checkpoint layouts; each rank holds about half of the language model's bytes."""

from __future__ import annotations

import random

import pytest
import torch

from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.distributed import ShardLayout, parameter_bytes
from fastllava.engine import EngineConfig, EngineImage, LLMEngine, SamplingParams
from fastllava.model.builder import load_pretrained_model
from fastllava.model.export import save_llava_hf, save_llava_original
from fastllava.packing import image_tiles
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor


def _text_cfg(heads=4, kv=2, inter=128, vocab=513):
    cfg = tiny_config("llama").text
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size, cfg.vocab_size = heads, kv, inter, vocab
    return cfg


@pytest.mark.parametrize("world,kv", [(2, 2), (2, 1), (4, 2), (4, 4)])
def test_layout_covers_each_weight_once(world, kv):
    """Column slices tile q/k/v/gate/up (k/v: every rank gets the K/V head its q heads read), row slices tile
    o/down, vocabulary slices (padded, vocab 513 is odd) tile embed/lm_head; the row bias is counted once."""
    cfg = _text_cfg(kv=kv)
    D, hq = cfg.head_dim, cfg.num_attention_heads
    full = {
        "q_proj.weight": torch.arange(hq * D * 8.0).view(hq * D, 8),
        "k_proj.weight": torch.arange(kv * D * 8.0).view(kv * D, 8),
        "o_proj.weight": torch.arange(8 * hq * D * 1.0).view(8, hq * D),
        "gate_proj.weight": torch.arange(cfg.intermediate_size * 2.0).view(-1, 2),
        "down_proj.weight": torch.arange(cfg.intermediate_size * 2.0).view(2, -1),
        "down_proj.bias": torch.ones(2),
        "embed_tokens.weight": torch.arange(cfg.vocab_size * 3.0).view(-1, 3),
    }
    prefix = {"embed_tokens.weight": "language_model."}
    parts = {k: [] for k in full}
    for rank in range(world):
        lay = ShardLayout.for_config(cfg, rank, world)
        for k, t in full.items():
            sub = "self_attn." if k[0] in "qko" else "mlp."
            name = prefix.get(k, f"language_model.layers.3.{sub}") + k
            parts[k].append(lay.slice(name).take(t))
        # GQA: this rank's q heads read the K/V head it holds
        first_q = rank * lay.num_heads
        assert lay.kv_head_start == first_q // (hq // kv)
    assert torch.equal(torch.cat(parts["q_proj.weight"]), full["q_proj.weight"])
    assert torch.equal(torch.cat(parts["o_proj.weight"], 1), full["o_proj.weight"])
    assert torch.equal(torch.cat(parts["gate_proj.weight"]), full["gate_proj.weight"])
    assert torch.equal(torch.cat(parts["down_proj.weight"], 1), full["down_proj.weight"])
    assert torch.equal(sum(parts["down_proj.bias"]), full["down_proj.bias"])
    emb = torch.cat(parts["embed_tokens.weight"])
    assert torch.equal(emb[: cfg.vocab_size], full["embed_tokens.weight"]) and not emb[cfg.vocab_size :].any()
    k_parts = torch.cat(parts["k_proj.weight"])
    if world <= kv:  # split
        assert torch.equal(k_parts, full["k_proj.weight"])
    else:  # replicated: ranks [h * world/kv, (h+1) * world/kv) hold K/V head h
        heads = full["k_proj.weight"].view(kv, D, 8)
        assert torch.equal(k_parts.view(world, D, 8), heads.repeat_interleave(world // kv, 0))


@pytest.mark.parametrize(
    "change,message",
    [(dict(heads=6), "num_attention_heads=6"), (dict(kv=3, heads=12), "num_key_value_heads=3"),
     (dict(inter=130), "intermediate_size=130")],
)  # fmt: skip
def test_layout_refuses_sizes_that_do_not_split(change, message):
    with pytest.raises(ValueError, match=message):
        ShardLayout.for_config(_text_cfg(**change), 0, 4)


# ------------------------------------------------------------------------------------ end to end

CASES = [  # family, K/V heads, anyres, checkpoint layout
    ("llama", 2, False, "hf"),
    ("mistral", 1, True, "hf"),
    ("qwen2", 1, False, "original"),
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _checkpoint(tmp_path_factory, tokenizer, family, kv, anyres, layout):
    cfg = tiny_config(family, anyres=anyres)
    cfg.text.num_key_value_heads = kv
    model = build_tiny_llava(cfg, seed=3, std=0.2)
    out = tmp_path_factory.mktemp(f"tp-{family}-{kv}")
    save = save_llava_hf if layout == "hf" else save_llava_original
    save(model, out, tokenizer, tiny_image_processor(cfg))
    return out


def _requests(cfg, seed=0):
    """Text-only, one-image and two-image prompts of varied lengths, greedy, 10 tokens each."""
    rng = random.Random(seed)
    sizes = [(32, 32), (32, 64), (64, 32)] if cfg.is_anyres else [(32, 32)]
    images = []
    for i in range(3):
        g = torch.Generator().manual_seed(i)
        hw = sizes[i % len(sizes)]
        px = torch.randn(image_tiles(cfg, hw), 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
        images.append(EngineImage(px, hw))
    prompts, imgs = [], []
    for i in range(6):
        ids = [1] + [rng.randrange(5, cfg.text.vocab_size) for _ in range(rng.randrange(3, 20))]
        chosen = [] if i % 3 == 0 else rng.sample(images, i % 3)
        for _ in chosen:
            ids.insert(rng.randrange(1, len(ids) + 1), IMAGE_TOKEN_INDEX)
        prompts.append(ids)
        imgs.append(chosen)
    return prompts, imgs


def _generate(model, tokenizer, prompts, imgs, **config):
    config = EngineConfig(num_blocks=128, block_size=8, max_num_batched_tokens=96, **config)
    engine = LLMEngine(model, tokenizer, config)
    outs = engine.generate(prompts, imgs, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs], engine


@pytest.mark.parametrize("family,kv,anyres,layout", CASES)
def test_two_ranks_generate_the_same_tokens(tmp_path_factory, tokenizer, family, kv, anyres, layout):
    path = _checkpoint(tmp_path_factory, tokenizer, family, kv, anyres, layout)
    _, whole, _, _ = load_pretrained_model(path, device="cpu")
    prompts, imgs = _requests(whole.config)
    expected, _ = _generate(whole, tokenizer, prompts, imgs)
    _, tp, _, _ = load_pretrained_model(path, device="cpu", tensor_parallel_size=2)
    try:
        got, engine = _generate(tp, tokenizer, prompts, imgs)
        assert got == expected
        assert engine.runner.kv.k[0].shape[2] == 1  # this rank's K/V heads only (kv=2: split; kv=1: replicated)
        # memory: each rank holds about half the language model; rank 0 also holds the vision tower + projector
        lm = parameter_bytes(whole.language_model)
        rank0, rank1 = tp.parameter_bytes()
        assert abs(rank1 - lm / 2) < 0.1 * lm / 2, (rank1, lm)
        assert abs(rank0 - (parameter_bytes(whole) - lm / 2)) < 0.1 * lm / 2, (rank0, lm)
    finally:
        tp.close()
    assert all(p.returncode == 0 for p in tp.followers)


def test_two_ranks_decode_from_static_buffers(tmp_path_factory, tokenizer):
    """The bucketed decode under tensor parallelism (each rank runs its own DecodeGraphs from the inputs rank 0
    sends; ``static_decode_buffers``: the graphs' path without capture) gives tp 1 eager's greedy tokens, with
    batches padded to their bucket (6 and 5 decodes run as 8)."""
    path = _checkpoint(tmp_path_factory, tokenizer, "llama", 2, False, "hf")
    _, whole, _, _ = load_pretrained_model(path, device="cpu")
    prompts, imgs = _requests(whole.config)
    expected, _ = _generate(whole, tokenizer, prompts, imgs)
    _, tp, _, _ = load_pretrained_model(path, device="cpu", tensor_parallel_size=2)
    try:
        got, engine = _generate(tp, tokenizer, prompts, imgs, static_decode_buffers=True, cuda_graph_max_batch_size=8)
        graphs = engine.runner.decode_graphs
        assert graphs.buckets == [1, 2, 4, 8] and graphs.model is tp.local  # rank 0's over its shard
        assert graphs.num_padded_rows > 0
        assert got == expected
    finally:
        tp.close()
    assert all(p.returncode == 0 for p in tp.followers)


def test_engine_config_checks_the_models_size(tmp_path_factory, tokenizer):
    path = _checkpoint(tmp_path_factory, tokenizer, "llama", 2, False, "hf")
    _, whole, _, _ = load_pretrained_model(path, device="cpu")
    with pytest.raises(ValueError, match="tensor_parallel_size=2 but the model is sharded over 1"):
        LLMEngine(whole, config=EngineConfig(num_blocks=8, tensor_parallel_size=2))


def _first_logits(model, tokenizer) -> torch.Tensor:
    engine = LLMEngine(model, tokenizer, EngineConfig(num_blocks=32, block_size=8))
    engine.runner.keep_logits = True
    prompt = tokenizer("What color is the shape? red")["input_ids"]
    engine.add_request("a", prompt, params=SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    engine.step()
    return engine.runner.last_logits[1][0].clone()


def test_nf4_shards_quantize_their_own_blocks(tmp_path_factory, tokenizer):
    """load_4bit with 2 ranks: every rank's linears are NF4 of its own slices (whole blocks); the logits are as
    close to full precision as one-rank NF4's (the blocks differ, so not bit-equal), and far closer than chance."""
    path = _checkpoint(tmp_path_factory, tokenizer, "llama", 2, False, "hf")
    _, whole, _, _ = load_pretrained_model(path, device="cpu")
    _, nf4, _, _ = load_pretrained_model(path, device="cpu", load_4bit=True)
    _, tp, _, _ = load_pretrained_model(path, device="cpu", load_4bit=True, tensor_parallel_size=2)
    try:
        assert type(tp.language_model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        ref = _first_logits(whole, tokenizer)
        err_one = (_first_logits(nf4, tokenizer) - ref).abs().max()
        err_tp = (_first_logits(tp, tokenizer) - ref).abs().max()
    finally:
        tp.close()
    assert 0 < err_tp < 2 * err_one < 0.5 * ref.abs().max(), (err_tp, err_one)
