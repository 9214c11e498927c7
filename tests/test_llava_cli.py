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
