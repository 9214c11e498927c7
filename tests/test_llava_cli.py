"""`fastllava chat` takes serve.cli's options directly (`fastllava chat --image-file X`, which
`nargs=REMAINDER` rejected), and other subcommands still reject unknown options."""

from __future__ import annotations

import pytest

from fastllava.serve.main import demo_question, main


def test_chat_takes_image_file_first(tmp_path, capsys):
    image, question, truth = demo_question(seed=1)
    path = tmp_path / "shapes.png"
    image.save(path)
    argv = ["chat", "--image-file", str(path), "--query", question, "--device", "cpu", "--temperature", "0"]
    assert main([*argv, "--max-new-tokens", "16"]) in (0, None)
    assert capsys.readouterr().out.strip().splitlines()[-1].strip().lower() == truth.lower()


def test_other_subcommands_reject_unknown_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--image-file", "x.png"])
    assert "unrecognized arguments: --image-file" in capsys.readouterr().err


def test_run_llava_prints_what_llavas_run_llava_prints(tmp_path, capsys, monkeypatch):
    """``eval.run_llava`` and LLaVA's own ``run_llava.eval_model`` (its loader pointed at ours, on the CPU) print
    the same answer, the right one, for one image and for two placed with ``<image-placeholder>``."""
    import functools

    import torch

    llava_run = pytest.importorskip("llava.eval.run_llava")
    import fastllava
    from fastllava.default_model import default_model_path
    from fastllava.eval import run_llava

    monkeypatch.setattr(llava_run, "load_pretrained_model", functools.partial(fastllava.load_pretrained_model,
                                                                               device="cpu"))  # fmt: skip
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # LLaVA's script calls .cuda()
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", torch.nn.Linear.reset_parameters)  # disable_torch_init
    monkeypatch.setattr(torch.nn.LayerNorm, "reset_parameters", torch.nn.LayerNorm.reset_parameters)
    image, question, truth = demo_question(seed=2)
    other, _, _ = demo_question(seed=3)
    image.save(tmp_path / "a.png")
    other.save(tmp_path / "b.png")
    cases = [(str(tmp_path / "a.png"), question), (f"{tmp_path / 'a.png'},{tmp_path / 'b.png'}",
             f"<image-placeholder>\n{question}\n<image-placeholder>")]  # fmt: skip
    for files, query in cases:
        argv = ["--model-path", str(default_model_path()), "--image-file", files, "--query", query,
                "--temperature", "0", "--max_new_tokens", "16"]  # fmt: skip
        args = run_llava.parse_args(argv)
        ours = run_llava.eval_model(args)
        llava_run.eval_model(run_llava.parse_args(argv))
        printed = capsys.readouterr().out.splitlines()
        assert printed == [ours, ours]
    one = ["--model-path", str(default_model_path()), "--image-file", str(tmp_path / "a.png"), "--query", question]
    assert run_llava.eval_model(run_llava.parse_args([*one, "--temperature", "0"])).lower() == truth.lower()
