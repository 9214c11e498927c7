"""``fastllava.model.make_delta`` / ``apply_delta`` / ``consolidate`` against LLaVA's own (llava-torch 1.2.2) on
the same tiny original-layout checkpoints: the written tensors are equal, and a delta round trip loads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fastllava import load_pretrained_model
from fastllava.model.apply_delta import apply_delta
from fastllava.model.consolidate import consolidate_ckpt
from fastllava.model.export import save_llava_original
from fastllava.model.make_delta import make_delta
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

pytest.importorskip("llava.model.make_delta")  # `pip install --no-deps llava-torch==1.2.2.post1`


def _weights(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A LLaVA target (linear projector, embeddings grown by 2 tokens) and its language-model base."""
    root = tmp_path_factory.mktemp("delta")
    cfg = tiny_config("llama", projector_type="linear")
    cfg.image_aspect_ratio = "pad"
    model = build_tiny_llava(cfg, seed=4).eval()
    target = save_llava_original(model, root / "llava-target", build_tokenizer(), tiny_image_processor(cfg),
                                 root / "clip")  # fmt: skip
    state = load_file(str(target / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):  # two added tokens (LLaVA's <im_start>, <im_end>)
        state[k] = torch.cat([state[k], torch.randn(2, state[k].shape[1], generator=g)])
    save_file(state, str(target / "model.safetensors"))
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "vocab_size": 514}))
    base = root / "llama-base"
    base.mkdir()
    noise = {
        k: v[:512] + 0.01 * torch.randn(v[:512].shape, generator=g) for k, v in state.items() if "mm_projector" not in k
    }
    save_file(noise, str(base / "model.safetensors"))
    base_cfg = {k: v for k, v in config.items() if not k.startswith("mm_")}
    (base / "config.json").write_text(
        json.dumps({**base_cfg, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    build_tokenizer().save_pretrained(str(base))
    return root, base, target


def test_make_and_apply_delta_match_llava(ckpts):
    from llava.model.apply_delta import apply_delta as llava_apply
    from llava.model.make_delta import make_delta as llava_make

    root, base, target = ckpts
    make_delta(base, target, root / "delta-ours")
    llava_make(str(base), str(target), str(root / "delta-llava"), None)
    ours, theirs = _weights(root / "delta-ours"), _weights(root / "delta-llava")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)

    apply_delta(base, root / "target-ours", root / "delta-ours")
    llava_apply(str(base), str(root / "target-llava"), str(root / "delta-llava"))
    ours, theirs = _weights(root / "target-ours"), _weights(root / "target-llava")
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    original = _weights(target)
    for k, v in ours.items():  # the round trip gives the target back, to float16 rounding
        torch.testing.assert_close(v.float(), original[k], atol=2e-3, rtol=2e-3)
    _, model, _, _ = load_pretrained_model(root / "target-ours", device="cpu")
    assert model.config.text.vocab_size == 514


def test_delta_shape_mismatch_is_an_error(ckpts, tmp_path):
    root, base, target = ckpts
    bad = tmp_path / "bad"
    bad.mkdir()
    state = _weights(target)
    state["model.norm.weight"] = torch.ones(7)
    save_file(state, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((target / "config.json").read_text())
    with pytest.raises(RuntimeError, match="model.norm.weight dimension mismatch"):
        make_delta(base, bad, tmp_path / "out")
    with pytest.raises(ValueError, match="never uploads"):
        make_delta(base, target, tmp_path / "out", hub_repo_id="me/delta")


def test_consolidate_matches_llava(ckpts, tmp_path):
    from llava.model.consolidate import consolidate_ckpt as llava_consolidate

    _, _, target = ckpts
    sharded = tmp_path / "llava-sharded"
    sharded.mkdir()
    state = _weights(target)
    names = sorted(state)
    index = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(sharded / fname))
        index.update(dict.fromkeys(part, fname))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    for f in target.iterdir():
        if f.suffix != ".safetensors":
            (sharded / f.name).write_bytes(f.read_bytes())
    consolidate_ckpt(sharded, tmp_path / "ours")
    llava_consolidate(str(sharded), str(tmp_path / "llava"))
    ours, theirs = _weights(tmp_path / "ours"), _weights(tmp_path / "llava")
    assert list((tmp_path / "ours").glob("*.safetensors")) == [tmp_path / "ours" / "model.safetensors"]
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["model_type"] == "llava_llama"


def test_consolidate_upgrades_a_v0_config_without_touching_src(ckpts, tmp_path):
    _, _, target = ckpts
    v0 = tmp_path / "llava-v0-7b"
    v0.mkdir()
    for f in target.iterdir():
        (v0 / f.name).write_bytes(f.read_bytes())
    config = json.loads((v0 / "config.json").read_text())
    (v0 / "config.json").write_text(
        json.dumps({**config, "model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    )
    before = (v0 / "config.json").read_text()
    consolidate_ckpt(v0, tmp_path / "upgraded")
    assert (v0 / "config.json").read_text() == before
    upgraded = json.loads((tmp_path / "upgraded" / "config.json").read_text())
    assert upgraded["model_type"] == "llava_llama" and upgraded["architectures"] == ["LlavaLlamaForCausalLM"]
    _, model, _, _ = load_pretrained_model(tmp_path / "upgraded", device="cpu")
    assert model.dtype == torch.float32 and model.config.projector_type == "linear"
