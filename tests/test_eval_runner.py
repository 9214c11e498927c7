"""The model_vqa family end to end on a tiny checkpoint and the synthetic shapes set.

Oracles: LLaVA's one-at-a-time ``generate`` loop (``StaticBackend(batch_size=1)``) for the batched engine answers,
at temperature 0 and, with per-question seeds, when sampling; ``train.evaluate``'s packed full-recompute greedy
decoder for the embedded benchmark; a run killed with SIGKILL, resumed, against an uninterrupted run.
The tiny model has random weights scaled up (std 0.2) so that its answers differ from question to question.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastllava.default_model import ASSET_DIR
from fastllava.eval import answers as A
from fastllava.eval import embedded, model_vqa, model_vqa_mmbench, model_vqa_science, summary
from fastllava.eval.questions import load_mmbench, load_science_qa, load_vqa_jsonl
from fastllava.eval.runner import EngineBackend, GenParams, StaticBackend, answer_all
from fastllava.model.builder import load_pretrained_model
from fastllava.model.export import save_llava_hf
from fastllava.tiny import build_tiny_llava, build_tokenizer, tiny_config, tiny_image_processor

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    cfg = tiny_config("llama")
    d = tmp_path_factory.mktemp("eval-model") / "tiny-llava-v1"
    save_llava_hf(build_tiny_llava(cfg, seed=1, std=0.2), d, build_tokenizer(), tiny_image_processor(cfg))
    return d


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """24 held-out synthetic questions as LLaVA question jsonl (+ the split's eval.json)."""
    d = tmp_path_factory.mktemp("shapes")
    embedded.held_out_split(d, seed=3, n_eval=24)
    return d


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_pretrained_model(str(ckpt), device="cpu")


def _answers(backend, questions, **kw) -> list[str]:
    got = {i: t for i, t, _ in answer_all(questions, backend, GenParams(**kw))}
    return [got[i] for i in range(len(questions))]


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_batched_equals_one_at_a_time(loaded, shapes, temperature):
    tok, model, proc, _ = loaded
    qs = load_vqa_jsonl(str(shapes / "llava_questions.jsonl"), str(shapes / "images"))
    kw = {"temperature": temperature, "max_new_tokens": 5, "seed": 5}
    one = _answers(StaticBackend(model, tok, proc, "llava_v1", batch_size=1), qs, **kw)
    engine = _answers(EngineBackend(model, tok, proc, "llava_v1", batch_size=5), qs, **kw)
    assert len(set(one)) > 3  # the oracle is not degenerate: answers depend on the question
    assert engine == one
    if temperature == 0:
        assert _answers(StaticBackend(model, tok, proc, "llava_v1", batch_size=7), qs, **kw) == one


def _run(ckpt, shapes, answers_file, *extra, module=model_vqa, read=True):
    argv = ["--model-path", str(ckpt), "--question-file", str(shapes / "llava_questions.jsonl"),
            "--image-folder", str(shapes / "images"), "--answers-file", str(answers_file), "--temperature", "0",
            "--max_new_tokens", "6", "--no-progress", *extra]  # fmt: skip
    assert module.main(argv) == 0
    return A.read_jsonl(answers_file) if read else None


def test_answers_file_format_and_order(ckpt, shapes, tmp_path):
    rows = _run(ckpt, shapes, tmp_path / "a.jsonl", "--batch-size", "4")
    questions = A.read_jsonl(shapes / "llava_questions.jsonl")
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in questions]
    for r, q in zip(rows, questions, strict=True):
        assert list(r) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        assert r["prompt"] == q["text"] and r["model_id"] == "tiny-llava-v1" and r["metadata"] == {}
        assert len(r["answer_id"]) == 22
    assert len({r["answer_id"] for r in rows}) == len(rows)


def test_killed_run_resumes(ckpt, shapes, tmp_path):
    """SIGKILL a run (one-at-a-time, so lines appear one by one), break its last line, resume with the engine."""
    reference = _run(ckpt, shapes, tmp_path / "ref.jsonl", "--max_new_tokens", "48")
    out = tmp_path / "killed.jsonl"
    cmd = [sys.executable, "-m", "eval.model_vqa", "--model-path", str(ckpt),
           "--question-file", str(shapes / "llava_questions.jsonl"), "--image-folder", str(shapes / "images"),
           "--answers-file", str(out), "--temperature", "0", "--max_new_tokens", "48", "--backend", "static",
           "--batch-size", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = A.read_jsonl(out)
    assert 3 <= len(before) < len(reference), "the run should have been killed part-way"
    with open(out, "a") as f:  # a line cut in half, as a kill during a write leaves it
        f.write('{"question_id": "eval-99", "prompt": "How ma')
    after = _run(ckpt, shapes, out, "--max_new_tokens", "48")
    assert [r["question_id"] for r in after] == [r["question_id"] for r in reference]  # none lost, none twice
    assert after[: len(before)] == before  # what was written is kept as it was
    assert [r["text"] for r in after] == [r["text"] for r in reference]


def test_chunks_merge_and_torchrun(ckpt, shapes, tmp_path, monkeypatch):
    whole = _run(ckpt, shapes, tmp_path / "whole.jsonl")
    parts = [tmp_path / f"3_{i}.jsonl" for i in range(3)]
    for i, p in enumerate(parts):
        _run(ckpt, shapes, p, "--num-chunks", "3", "--chunk-idx", str(i))
    assert [len(A.read_jsonl(p)) for p in parts] == [8, 8, 8]
    A.main(["merge", "--output", str(tmp_path / "merge.jsonl"), *map(str, parts)])
    merged = A.read_jsonl(tmp_path / "merge.jsonl")
    assert [(r["question_id"], r["text"]) for r in merged] == [(r["question_id"], r["text"]) for r in whole]
    # torchrun: ranks write their chunk files; rank 0 waits for every rank, then merges in question order
    final = tmp_path / "tr" / "merge.jsonl"
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        _run(ckpt, shapes, final, read=rank == 0)
    assert [(r["question_id"], r["text"]) for r in A.read_jsonl(final)] == [
        (r["question_id"], r["text"]) for r in whole
    ]
    assert not list((tmp_path / "tr").rglob("*.done"))


def test_chunking_is_llavas():
    items = list(range(10))
    assert [list(A.get_chunk(items, 4, i)) for i in range(4)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert list(A.get_chunk(items[:2], 4, 3)) == []  # ceil(2/4) = 1 per chunk: only two chunks exist


def test_mmbench_questions_and_cli(ckpt, tmp_path):
    qs = load_mmbench(str(FIX / "mmbench/mmbench_dev.tsv"), all_rounds=True, single_pred_prompt=True)
    assert [(q.question_id, q.extra["round_id"]) for q in qs] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)]
    assert qs[0].prompt == "The square is small.\nWhat color is the square?\nA. red\nB. green\nC. blue\nD. yellow"
    assert qs[1].prompt.endswith("A. green\nB. blue\nC. yellow\nD. red") and qs[1].extra["option_char"] == list("BCDA")
    assert qs[0].text == qs[0].prompt + "\nAnswer with the option's letter from the given choices directly."
    assert qs[4].prompt == "What color is the image?\nA. green\nB. red"  # "nan" hint and options are skipped
    out = tmp_path / "mmb.jsonl"
    argv = ["--model-path", str(ckpt), "--question-file", str(FIX / "mmbench/mmbench_dev.tsv"),
            "--answers-file", str(out), "--all-rounds", "--single-pred-prompt", "--temperature", "0",
            "--max_new_tokens", "3", "--no-progress"]  # fmt: skip
    assert model_vqa_mmbench.main(argv) == 0
    rows = A.read_jsonl(out)
    assert len(rows) == 6 and list(rows[0])[:3] == ["question_id", "round_id", "prompt"]
    assert rows[1]["options"] == ["green", "blue", "yellow", "red"]
    assert model_vqa_mmbench.main(argv) == 0  # a second run finds every round done
    assert len(A.read_jsonl(out)) == 6


def test_science_qa_questions_and_cli(ckpt, shapes, tmp_path):
    img = A.read_jsonl(shapes / "llava_questions.jsonl")[0]["image"]
    records = [
        {"id": "s1", "image": img, "conversations": [{"from": "human", "value": "<image>\nWhich shape?\nA. x\nB. y"}]},
        {"id": "s2", "conversations": [{"from": "human", "value": "Which is a metal?\nA. iron\nB. wood"}]},
    ]
    (tmp_path / "sqa.json").write_text(json.dumps(records))
    qs = load_science_qa(str(tmp_path / "sqa.json"), str(shapes / "images"), single_pred_prompt=True)
    assert qs[0].prompt.startswith("<image>\nWhich shape?") and qs[0].image is not None
    assert qs[1].prompt == qs[1].text and qs[1].image is None and qs[1].text.endswith("directly.")
    argv = ["--model-path", str(ckpt), "--question-file", str(tmp_path / "sqa.json"), "--image-folder",
            str(shapes / "images"), "--answers-file", str(tmp_path / "sqa.jsonl"), "--single-pred-prompt",
            "--conv-mode", "llava_v1", "--temperature", "0", "--max_new_tokens", "4", "--no-progress"]  # fmt: skip
    assert model_vqa_science.main(argv) == 0
    assert [r["question_id"] for r in A.read_jsonl(tmp_path / "sqa.jsonl")] == ["s1", "s2"]


@torch.no_grad()
def _recompute_greedy(model, tok, proc, prompts, images, max_new_tokens):
    """The oracle: greedy decoding with no KV cache and no engine, every step one packed forward over each whole
    sequence so far (what ``train.evaluate`` did before it used the engine)."""
    from fastllava.mm_utils import process_images, tokenizer_image_token
    from fastllava.packing import ImageInput, pack

    seqs = [tokenizer_image_token(p, tok) for p in prompts]
    pixels = process_images(images, proc, model.config)
    inputs = [[ImageInput(px.unsqueeze(0), (im.height, im.width))] for px, im in zip(pixels, images, strict=True)]
    out, done = [[] for _ in prompts], [False] * len(prompts)
    for _ in range(max_new_tokens):
        batch = pack([s + o for s, o in zip(seqs, out, strict=True)], inputs, model.config).to(model.device)
        nxt = model.logits(model.forward_packed(batch)[batch.last_token_index()]).argmax(-1).tolist()
        for i, t in enumerate(nxt):
            done[i] = done[i] or t == tok.eos_token_id
            if not done[i]:
                out[i].append(t)
    return [tok.decode(o, skip_special_tokens=True) for o in out]


def test_embedded_matches_train_evaluate(ckpt, shapes, loaded, tmp_path):
    """The embedded benchmark's answers and accuracy equal ``train.evaluate``'s, and its answers a greedy packed
    recompute's (no KV cache, no engine)."""
    from fastllava.train.evaluate import evaluate, greedy_answers

    m = embedded.run_embedded(str(ckpt), out=tmp_path / "emb", data_dir=shapes, seed=3, n_eval=24,
                              conv_mode="llava_v1", max_new_tokens=4, extra_args=["--no-progress"])  # fmt: skip
    tok, model, proc, _ = loaded
    acc, _kinds, n = evaluate(model, tok, proc, shapes / "eval.json", shapes / "images", "llava_v1")
    assert m["samples"] == n == 24 and m["accuracy"] == pytest.approx(100 * acc)
    from fastllava.conversation import conv_templates
    from fastllava.image_io import load_image

    records = json.loads((shapes / "eval.json").read_text())
    prompts, images = [], []
    for r in records:
        conv = conv_templates["llava_v1"].copy()
        conv.append_message(conv.roles[0], r["conversations"][0]["value"])
        conv.append_message(conv.roles[1], None)
        prompts.append(conv.get_prompt())
        images.append(load_image(str(shapes / "images" / r["image"])))
    oracle = [t.strip() for t in _recompute_greedy(model, tok, proc, prompts, images, max_new_tokens=4)]
    ours = [r["text"] for r in A.read_jsonl(tmp_path / "emb" / "answers.jsonl")]
    assert len(set(oracle)) > 3 and ours == oracle
    assert [t.strip() for t in greedy_answers(model, tok, proc, prompts, images, max_new_tokens=4)] == oracle
    assert (tmp_path / "emb" / "summary.md").read_text().startswith("| run | Embedded")


def test_summary_table_and_chart(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "pope.json").write_text(json.dumps({"benchmark": "pope", "f1": 85.9}))
    (a / "mme.json").write_text(json.dumps({"benchmark": "mme", "perception": 1510.7, "cognition": 355.7}))
    (a / "notes.json").write_text(json.dumps({"anything": 1}))  # not a metrics file: ignored
    (b / "m.json").write_text(json.dumps({"benchmark": "embedded", "accuracy": 97.25}))
    written = summary.summarize({"llava": a, "ours": b}, tmp_path / "out")
    md = written["md"].read_text().splitlines()
    assert md[0] == "| run | Embedded | MME-C | MME-P | POPE (F1) |"
    assert md[2] == "| llava | - | 355.7 | 1510.7 | 85.9 |" and md[3] == "| ours | 97.2 | - | - | - |"
    assert json.loads(written["json"].read_text())["ours"] == {"Embedded": 97.25}
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "png" not in summary.summarize({"one": b}, tmp_path / "single")


def test_beam_search_is_refused(ckpt, shapes, tmp_path):
    argv = ["--model-path", str(ckpt), "--question-file", str(shapes / "llava_questions.jsonl"),
            "--answers-file", str(tmp_path / "x.jsonl"), "--num_beams", "3"]  # fmt: skip
    assert model_vqa.main(argv) == 2
    assert not os.path.exists(tmp_path / "x.jsonl")


def test_default_model_reproduces_train_evaluate(tmp_path):
    """The shipped default model on the embedded benchmark (model_vqa through the engine): the accuracy its
    training run recorded (``eval_result.json``) and that ``train.evaluate`` computes, per kind too."""
    from fastllava.default_model import default_model_path
    from fastllava.train.evaluate import evaluate
    from fastllava.train.recipes.default import TEMPLATE

    assert default_model_path() == ASSET_DIR
    data = tmp_path / "shapes"
    m = embedded.run_embedded(
        out=tmp_path / "emb", data_dir=data, seed=0, n_eval=500, conv_mode=TEMPLATE, extra_args=["--no-progress"]
    )
    tok, model, proc, _ = load_pretrained_model(str(ASSET_DIR), device="cpu")
    acc, kinds, n = evaluate(model, tok, proc, data / "eval.json", data / "images", TEMPLATE)
    assert m["samples"] == n == 500 and m["accuracy"] == pytest.approx(100 * acc)
    assert m["per_kind"] == pytest.approx({k: 100 * v for k, v in kinds.items()})
    recorded = json.loads((ASSET_DIR / "eval_result.json").read_text())
    assert m["accuracy"] == pytest.approx(100 * recorded["accuracy"]) and m["accuracy"] >= 95


def test_repeated_question_ids_resume_and_merge(tmp_path):
    """A question file may repeat an id: each occurrence is answered once, on resume and through a merge."""
    from fastllava.eval.questions import Question

    qs = [Question("a", "t1", "t1"), Question("b", "t2", "t2"), Question("a", "t3", "t3")]
    f = tmp_path / "ans.jsonl"
    f.write_text(json.dumps({"question_id": "a", "text": "x", "answer_id": "1"}) + "\n")
    assert [q.text for q in A.remaining(qs, A.load_done(f))] == ["t2", "t3"]
    g = tmp_path / "more.jsonl"
    g.write_text("".join(json.dumps({"question_id": k, "text": k, "answer_id": i}) + "\n"
                         for k, i in (("b", "2"), ("a", "3"), ("a", "1"))))  # fmt: skip
    n = A.merge_files([f, g], tmp_path / "m.jsonl", order=[q.key for q in qs])
    assert n == 3  # answer "1" appears in both files: kept once
    assert [r["answer_id"] for r in A.read_jsonl(tmp_path / "m.jsonl")] == ["1", "2", "3"]  # a, b, a


def test_question_too_long_for_the_engine_is_recorded_not_fatal(loaded, shapes):
    from fastllava.engine import EngineConfig

    tok, model, proc, _ = loaded
    qs = load_vqa_jsonl(str(shapes / "llava_questions.jsonl"), str(shapes / "images"))[:3]
    qs[1].text = "why " * 200  # far past the 128-token context below
    backend = EngineBackend(model, tok, proc, "llava_v1", batch_size=2,
                            engine_config=EngineConfig(max_num_seqs=2, max_model_len=128))  # fmt: skip
    got = {i: (t, meta) for i, t, meta in answer_all(qs, backend, GenParams(temperature=0, max_new_tokens=4))}
    assert sorted(got) == [0, 1, 2]
    assert got[1][0] == "" and "does not fit" in got[1][1]["error"]
    assert got[0][1] == {} and got[2][1] == {}
