"""The ``fastllava`` command (from a checkout: ``python -m serve.main``).

fastllava demo                 # one question about a generated picture, answered by the embedded default model
fastllava chat [--image-file F] [--model-path DIR]   # interactive chat (serve.cli), default model unless told
fastllava serve [--model-path DIR] [--port 7860]     # controller + worker + web UI (serve.launcher); Ctrl-C stops
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def default_model_dir() -> Path:
    """The embedded default model: a tiny LLaVA built locally and cached (no download)."""
    from fastllava.default_model import default_model_path

    return default_model_path()


def demo_question(seed: int = 0):
    """A picture from the synthetic shapes set, a question about it, and the true answer."""
    import random

    from fastllava.data.synthetic import SUFFIX, draw_scene, question, question_kinds, random_scene

    rng = random.Random(seed)
    items = random_scene(rng)
    q, answer = question(items, rng.choice(question_kinds(items)))
    return draw_scene(items), q + SUFFIX, answer


def _demo(args) -> int:
    from . import cli

    path = Path(args.model_path) if args.model_path else default_model_dir()
    image, question, answer = demo_question(seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        img_file = Path(tmp) / "demo.png"
        image.save(img_file)
        print(f"model: {path}\nimage: a generated picture ({image.size[0]}x{image.size[1]}), true answer: {answer}")
        print(f"USER: {question}\nASSISTANT: ", end="", flush=True)
        return cli.main(
            ["--model-path", str(path), "--image-file", str(img_file), "--query", question, "--device", "cpu",
             "--temperature", "0", "--max-new-tokens", "16"]
        )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastllava", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="answer one question about a generated image with the default model")
    demo.add_argument("--model-path", default=None)
    demo.add_argument("--seed", type=int, default=0)
    # chat's options are serve.cli's: passed through as they are (argparse.REMAINDER rejected a leading option)
    sub.add_parser("chat", help="interactive chat (arguments as `python -m serve.cli`)", add_help=False)
    from . import launcher

    launcher.add_arguments(sub.add_parser("serve", help="controller + worker + web UI on the default model"))
    args, rest = p.parse_known_args(argv)
    if rest and args.command != "chat":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "demo":
        return _demo(args)
    if args.command == "serve":
        if args.model_path is None:  # the embedded default model: say what it can answer
            from fastllava.data.asking import DEFAULT_MODEL_HINT

            print(DEFAULT_MODEL_HINT, flush=True)
        return launcher.run_stack(args)
    from . import cli

    if "--model-path" not in rest:
        rest = ["--model-path", str(default_model_dir()), *rest]
    return cli.main(rest)


if __name__ == "__main__":
    sys.exit(main())
