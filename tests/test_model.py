"""The model's own contracts: packed == per-sample, generate batched == alone, sampling, loader errors, CLI.

The oracles here are per-sample runs of the same model (for packing and batching), the float64 definition
of the sampling distribution, and the exact error text a user needs.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fastllava import load_pretrained_model
from fastllava.constants import IMAGE_TOKEN_INDEX
from fastllava.engine.sampling import sample, uniform_noise
from fastllava.image_io import ImageLoadError, load_image
from fastllava.model.checkpoint import CheckpointError
from fastllava.model.export import save_llava_hf
from fastllava.packing import ImageInput, pack
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

ROOT = Path(__file__).resolve().parents[1]


def _pixels(cfg, n_tiles=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    return torch.randn(n_tiles, 3, s, s, generator=g)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cfg = tiny_config("llama")
    model = build_tiny_llava(cfg, seed=0).eval()
    return cfg, model


@pytest.mark.parametrize("anyres", [False, True])
def test_packed_forward_equals_each_sequence_alone(anyres):
    cfg = tiny_config("llama", anyres=anyres)
    model = build_tiny_llava(cfg, seed=1).eval()
    sizes = [(40, 90), (70, 30), (32, 32)]

    def img(i):
        from fastllava.packing import image_tiles

        return ImageInput(_pixels(cfg, image_tiles(cfg, sizes[i]), seed=i), sizes[i])

    seqs = [
        [1, 20, IMAGE_TOKEN_INDEX, 30, 31, 32],
        [1, 40],  # two tokens, text only
        [1, IMAGE_TOKEN_INDEX, 50, IMAGE_TOKEN_INDEX, 51],
        [7],  # a 1-token sequence
    ]
    images = [[img(0)], [], [img(1), img(2)], []]
    with torch.no_grad():
        batch = pack(seqs, images, cfg)
        packed = model.logits(model.forward_packed(batch))
        starts = batch.cu_seqlens.tolist()
        for i, (s, im) in enumerate(zip(seqs, images, strict=True)):
            alone = pack([s], [im], cfg)
            ref = model.logits(model.forward_packed(alone))
            torch.testing.assert_close(packed[starts[i] : starts[i + 1]], ref, atol=1e-5, rtol=1e-5)


def test_generate_batched_equals_alone(tiny):
    cfg, model = tiny
    tok = build_tokenizer()
    prompts = ["USER: <image>\nWhat color is it? ASSISTANT:", "hello there", "USER: <image>\nsize? ASSISTANT:"]
    from fastllava.mm_utils import tokenizer_image_token

    ids = [tokenizer_image_token(p, tok) for p in prompts]
    imgs = [_pixels(cfg, seed=3)[0], _pixels(cfg, seed=4)[0]]
    alone = []
    img_iter = iter(imgs)
    for x in ids:
        im = [next(img_iter)] if IMAGE_TOKEN_INDEX in x else None
        out = model.generate(
            torch.tensor([x]), images=torch.stack(im) if im else None, max_new_tokens=12, eos_token_id=[]
        )
        alone.append(out[0].tolist())
    width = max(map(len, ids))
    padded = torch.full((len(ids), width), 3)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):  # left padding, as batched HF generation uses
        padded[i, width - len(x) :] = torch.tensor(x)
        mask[i, width - len(x) :] = 1
    batched = model.generate(padded, attention_mask=mask, images=torch.stack(imgs), max_new_tokens=12, eos_token_id=[])
    assert batched.tolist() == alone


def test_generate_stops_at_eos_and_stop_strings(tiny):
    cfg, model = tiny
    tok = build_tokenizer()
    ids = torch.tensor([[1, 60, 61]])
    free = model.generate(ids, max_new_tokens=10, eos_token_id=[])[0].tolist()
    eos = free[3]
    stopped = model.generate(ids, max_new_tokens=10, eos_token_id=eos)[0].tolist()
    assert stopped == free[: free.index(eos) + 1]
    text = tok.decode(free, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():
        out = model.generate(ids, max_new_tokens=10, eos_token_id=[], stop_strings=[stop], tokenizer=tok)[0].tolist()
        assert stop in tok.decode(out, skip_special_tokens=True) and len(out) < len(free)


def test_sampling_matches_the_filtered_distribution():
    """Empirical frequencies of `sample` follow softmax(logits / T) restricted to top-k / top-p."""
    torch.manual_seed(0)
    V, N = 6, 20000
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
    temp, top_p, top_k = 0.7, 0.9, 4
    rows = logits.expand(N, V)
    out = sample(
        rows,
        torch.full((N,), temp),
        torch.full((N,), top_p),
        torch.full((N,), top_k, dtype=torch.long),
        torch.arange(N),  # a different seed per row
        torch.zeros(N, dtype=torch.long),
    )
    p = torch.softmax(logits.double() / temp, -1)
    keep = torch.zeros(V, dtype=torch.bool)
    keep[:top_k] = True
    keep &= (p.cumsum(0) - p) < top_p
    expected = torch.where(keep, p, torch.zeros_like(p))
    expected /= expected.sum()
    freq = torch.bincount(out, minlength=V).double() / N
    assert (freq - expected).abs().max() < 0.015, (freq, expected)
    assert freq[~keep].sum() == 0


def test_sampling_is_seeded_and_batch_invariant():
    logits = torch.randn(5, 50)
    args = lambda n: (torch.full((n,), 1.0), torch.full((n,), 1.0), torch.zeros(n, dtype=torch.long))
    seeds, steps = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 0, 7, 7, 9])
    together = sample(logits, *args(5), seeds, steps)
    alone = [sample(logits[i : i + 1], *args(1), seeds[i : i + 1], steps[i : i + 1]).item() for i in range(5)]
    assert together.tolist() == alone
    greedy = sample(logits, torch.zeros(5), *args(5)[1:], seeds, steps)
    assert torch.equal(greedy, logits.argmax(-1))
    u = uniform_noise(torch.tensor([1, 1]), torch.tensor([0, 1]), 1000)
    assert 0 < u.min() and u.max() < 1 and not torch.equal(u[0], u[1])


# ------------------------------------------------------------------------------------------ errors


def _saved(tmp_path, tiny):
    cfg, model = tiny
    save_llava_hf(model, tmp_path, build_tokenizer(), tiny_image_processor(cfg))
    return tmp_path


def test_missing_weight_file_is_a_clear_error(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weight file in"):
        load_pretrained_model(path, device="cpu")


def test_missing_shard_is_named(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    keys = list(load_file(str(path / "model.safetensors")))
    index = {"weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_pretrained_model(path, device="cpu")


def test_missing_tensors_are_listed(tmp_path, tiny):
    from safetensors.torch import save_file

    path = _saved(tmp_path, tiny)
    state = load_file(str(path / "model.safetensors"))
    state.pop("language_model.model.layers.1.mlp.up_proj.weight")
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 weight.*layers.1.mlp.up_proj"):
        load_pretrained_model(path, device="cpu")


def test_pickled_bin_needs_opt_in(tmp_path, tiny):
    path = _saved(tmp_path, tiny)
    state = load_file(str(path / "model.safetensors"))
    torch.save(state, path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"pickled \.bin.*allow_pickle=True"):
        load_pretrained_model(path, device="cpu")
    _, model, _, _ = load_pretrained_model(path, device="cpu", allow_pickle=True)
    torch.testing.assert_close(
        model.language_model.embed_tokens.weight, state["language_model.model.embed_tokens.weight"]
    )


def test_hub_ids_are_refused_offline():
    with pytest.raises(CheckpointError, match="not a local folder"):
        load_pretrained_model("llava-hf/llava-1.5-7b-hf", device="cpu")


def test_corrupt_and_oversized_images_are_clear_errors(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, format="PNG")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(buf.getvalue()[:40])
    with pytest.raises(ImageLoadError, match="corrupt|truncated|cannot"):
        load_image(str(corrupt))
    with pytest.raises(ImageLoadError, match=r"600.*500"):
        load_image(buf.getvalue(), max_pixels=500)


# ------------------------------------------------------------------------------------------ CLI


def test_cli_one_shot_matches_library_and_interactive(tmp_path, tiny):
    cfg, model = tiny
    path = _saved(tmp_path / "tiny-llava-v1", tiny)
    img = tmp_path / "img.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(img)
    base = [
        sys.executable,
        "-m",
        "fastllava.serve.cli",
        "--model-path",
        str(path),
        "--image-file",
        str(img),
        "--device",
        "cpu",
    ]
    base += ["--temperature", "0", "--max-new-tokens", "8"]
    one = subprocess.run([*base, "--query", "What is it?"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    from fastllava.serve.cli import Chat, parse_args

    tok, m, proc, _ = load_pretrained_model(path, device="cpu")
    img_pil = load_image(str(img))
    args = parse_args(["--model-path", str(path), "--temperature", "0", "--max-new-tokens", "8"])
    chat = Chat(tok, m, proc, "llava_v1", img_pil, args)
    expected = chat.ask("What is it?")
    assert one.stdout.strip() == expected
    # two turns interactively; the second prompt carries the first answer (LLaVA's history)
    inter = subprocess.run(
        base, cwd=tmp_path, input="What is it?\nAnd now?\n\n", capture_output=True, text=True, timeout=120
    )
    assert inter.returncode == 0, inter.stderr
    assert inter.stdout.count("ASSISTANT:") == 2 and expected in inter.stdout
    assert chat.ask("And now?") in inter.stdout
    assert "exit..." in inter.stdout


def test_cli_bad_arguments_name_the_field(tmp_path, capsys):
    from fastllava.serve.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--model-path", "x", "--max-new-tokens", "-3"])
    assert e.value.code == 2 and "--max-new-tokens" in capsys.readouterr().err
    assert main(["--model-path", "x", "--image-file", str(tmp_path / "nope.png")]) == 2
    assert "--image-file" in capsys.readouterr().err
