"""fastllava: LLaVA rebuilt for speed.

Packaging note: the repository keeps `kernels/`, `csrc/`, `serve/`, `train/` and `eval/` at its top level,
but they are installed *inside* the `fastllava` namespace (`fastllava.kernels`, `fastllava.serve`, ...), so
installing fastllava never shadows HuggingFace's own `kernels` distribution or any other generic `serve` /
`train` / `eval` module. From a checkout, `fastllava/__init__.py` makes the same names resolve, so
`python -m serve.controller` and `torchrun train/train.py` keep working there.
"""

from setuptools import find_packages, setup

SUBPACKAGES = ("kernels", "csrc", "serve", "train", "eval")

extras = {
    "train": ["deepspeed", "liger-kernel", "tensorboard", "matplotlib"],
    "serve": ["fastapi", "uvicorn", "gradio", "httpx", "openai", "prometheus-client"],
    "quant": ["bitsandbytes"],
    "flash": ["flash-attn"],
    "xformers": ["xformers"],
    "eval": ["openai", "matplotlib"],
    "dev": [
        "triton",  # Triton kernels run under TRITON_INTERPRET=1 in the CPU tests
        "pytest",
        "pytest-benchmark",
        "pytest-timeout",
        "ruff==0.17.6",  # pinned: formatting and lint rules change between releases
        "matplotlib",
        "bitsandbytes",
        "liger-kernel",
        # the ZeRO-2/3 training tests (CPU accelerator, gloo). Its only torch requirement is torch>=2.0, so with
        # torch==2.13.0 (CPU) installed first it neither pulls a CUDA torch nor replaces ours; sdist-only, no ops built
        "deepspeed==0.19.8",
        "fastapi",
        "uvicorn",
        "httpx",
        "openai",
        "prometheus-client",
        "gradio",
        "playwright",
        "requests",  # LLaVA's own register_worker / test_message / model_worker, run by tests/test_llava_*.py
        "hypothesis",  # property-based fuzzing of the servers' request schema (tests/test_serve_hardening.py)
    ],
}
extras["all"] = sorted({d for k, v in extras.items() if k not in ("flash", "xformers", "dev") for d in v})

setup(
    name="fastllava",
    version="0.1.0",
    description="LLaVA rebuilt for speed: packed training, Triton kernels, continuous-batching serving",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastllava", "fastllava.*"])
    + [f"fastllava.{p}{'.' + sub if sub else ''}" for p in SUBPACKAGES for sub in ["", *find_packages(where=p)]],
    package_dir={"fastllava": "fastllava", **{f"fastllava.{p}": p for p in SUBPACKAGES}},
    package_data={
        "fastllava.csrc": ["*.cu", "*.cpp", "*.h"],
        "fastllava": ["assets/**/*"],
        "fastllava.serve": ["examples/*"],  # the web UI's examples
        "fastllava.eval": ["webpage/*"],  # the answers-side-by-side page (eval.generate_webpage_data_from_table)
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.5",
        "transformers>=4.45",
        "safetensors",
        "tokenizers",
        "pillow",
        "numpy",
        "tqdm",
        "peft",
        "accelerate",
    ],
    extras_require=extras,
    entry_points={
        "console_scripts": [
            "fastllava=fastllava.serve.main:main",
            "fastllava-cli=fastllava.serve.cli:main",
        ]
    },
)
