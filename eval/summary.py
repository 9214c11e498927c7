"""Results summary: one table per run (markdown + JSON), and a bar chart when several runs are compared.

    python -m eval.summary --run llava-7b=results/llava-7b --run ours=results/ours --out results/summary
    # -> results/summary/summary.md, summary.json, and summary.png (with two or more runs)

A run is a folder of metric JSON files (or one file) as the scorers write them (``--metrics`` / ``--output``:
each has a ``"benchmark"`` key). Each benchmark contributes the number LLaVA's papers report for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def headline(metrics: dict) -> dict[str, float]:
    """The reported number(s) of one scorer's output, keyed by column name."""
    b = metrics.get("benchmark")
    if b == "pope":
        return {"POPE (F1)": metrics["f1"]}
    if b == "scienceqa":
        return {"SQA": metrics["acc"], "SQA-IMG": metrics["img_acc"]}
    if b == "mme":
        return {"MME-P": metrics["perception"], "MME-C": metrics["cognition"]}
    if b == "seed":
        return {"SEED-IMG": metrics.get("image", metrics["accuracy"])}
    if b == "mmvet":
        return {"MM-Vet": metrics["total"]}
    if b == "llava_bench":
        return {"LLaVA-Bench": metrics["all"]["relative"]}
    names = {"textvqa": "TextVQA", "vqav2": "VQAv2", "gqa": "GQA", "embedded": "Embedded"}
    if b in names:
        return {names[b]: metrics["accuracy"]}
    raise ValueError(f"unknown benchmark in metrics: {b!r}")


def load_run(path: str | Path) -> dict[str, float]:
    """All headline numbers of a run folder (or a single metrics file)."""
    path = Path(path)
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    row: dict[str, float] = {}
    for f in files:
        data = json.loads(f.read_text())
        if isinstance(data, dict) and "benchmark" in data:
            row.update(headline(data))
    return row


def to_markdown(table: dict[str, dict[str, float]]) -> str:
    cols = sorted({c for row in table.values() for c in row})
    lines = ["| run | " + " | ".join(cols) + " |", "| --- |" + " ---: |" * len(cols)]
    for run, row in table.items():
        lines.append(f"| {run} | " + " | ".join(f"{row[c]:.1f}" if c in row else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict[str, dict[str, float]], out: str | Path) -> Path:
    """Grouped bars: one group per benchmark, one bar per run (each benchmark on its own axis, scales differ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = sorted({c for row in table.values() for c in row})
    fig, axes = plt.subplots(1, len(cols), figsize=(2.2 * len(cols) + 1, 3.2), squeeze=False)
    for ax, col in zip(axes[0], cols, strict=True):
        runs = [r for r in table if col in table[r]]
        ax.bar(range(len(runs)), [table[r][col] for r in runs], color=[f"C{i}" for i in range(len(runs))])
        ax.set_xticks(range(len(runs)), runs, rotation=45, ha="right", fontsize=7)
        ax.set_title(col, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def summarize(runs: dict[str, str | Path], out_dir: str | Path) -> dict[str, Path]:
    """Write summary.md / summary.json (and summary.png for two or more runs); returns the paths written."""
    table = {name: load_run(p) for name, p in runs.items()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"md": out / "summary.md", "json": out / "summary.json"}
    written["md"].write_text(to_markdown(table))
    written["json"].write_text(json.dumps(table, indent=1))
    if len(table) > 1:
        written["png"] = plot(table, out / "summary.png")
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="NAME=PATH (a folder of metric JSONs or one file)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    runs = {}
    for spec in a.run:
        name, sep, path = spec.partition("=")
        runs[name if sep else Path(spec).stem] = path if sep else spec
    written = summarize(runs, a.out)
    print(written["md"].read_text(), end="")
    print("wrote " + ", ".join(str(v) for v in written.values()))


if __name__ == "__main__":
    main()
