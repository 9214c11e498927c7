"""Plots and a markdown table from a results file: ``python -m bench.plot RESULTS.jsonl --out DIR``.

Writes, per device kind found (latest run of each unless ``--run all``):

* ``speedup_<kind>.png``   -- per benchmark, the candidate's speedup over each baseline (log scale; 1 = parity;
  against ``copy`` it is the fraction of copy bandwidth);
* ``memory_<kind>.png``    -- peak memory of every implementation per benchmark;
* ``throughput_<kind>.png`` -- tokens/s vs concurrency per series, from ``"kind": "throughput"`` records;
* ``packed_vs_padded_<kind>.png`` -- tokens/s packed vs padded, from ``"kind": "packed_vs_padded"`` records;
* ``summary.md``           -- the table bench/README.md's "Latest GPU results" uses.

matplotlib is imported only when plotting (``pip install matplotlib``); ``--table-only`` needs nothing.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.update_baselines import read_records, select_run

TABLE_BASELINES = ("eager", "compile", "liger", "copy")


def latest_ops(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """{device_kind: {key: last op record}}, in first-seen key order."""
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in records:
        if r.get("kind") == "op":
            out[r["device_kind"]][r["key"]] = r
    return out


def _gate_cell(r: dict[str, Any]) -> str:
    status = [o["status"] for o in r.get("gates", []) + r.get("stored", [])]
    if "fail" in status:
        return "FAIL: " + "; ".join(f["gate"] for f in r.get("failures", []))
    return f"pass ({status.count('pass')})" if "pass" in status else "-"


def summary_table(records: list[dict[str, Any]]) -> str:
    """Markdown: one table per device kind, one row per benchmark."""
    lines = []
    for kind, ops in latest_ops(records).items():
        first = next(iter(ops.values()))
        v = first.get("versions", {})
        lines += [
            f"### {first['device']} ({kind})",
            "",
            f"torch {v.get('torch')}, triton {v.get('triton')}, commit {str(first.get('commit'))[:10]}, "
            f"run {first.get('run_id')}; speedup = baseline time / ours (vs copy: fraction of copy bandwidth)",
            "",
            "| benchmark | shapes | dtype | ours ms (p20-p80) | peak MiB | "
            + " | ".join(f"vs {b}" for b in TABLE_BASELINES)
            + " | other | gates |",
            "|" + "---|" * (7 + len(TABLE_BASELINES)),
        ]
        for key, r in ops.items():
            ratios = r["ratios"]
            cols = [f"{ratios[b]:.2f}x" if b in ratios else "-" for b in TABLE_BASELINES]
            other = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items() if k not in TABLE_BASELINES) or "-"
            shapes = " ".join(f"{k}={json.dumps(v, separators=(',', ':'))}" for k, v in r["shapes"].items())
            lines.append(
                f"| {key} | {shapes} | {r['dtype']} | {r['median_ms']:.4f} ({r['p20_ms']:.4f}-{r['p80_ms']:.4f}) | "
                f"{r['peak_mem_bytes'] / 2**20:.1f} | " + " | ".join(cols) + f" | {other} | {_gate_cell(r)} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(kind: str, ops: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    keys = list(ops)
    names = sorted({b for r in ops.values() for b in r["ratios"]})
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(keys) * max(1, len(names)) ** 0.5 + 1.5))
    height = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        ys = [i + j * height for i, k in enumerate(keys) if name in ops[k]["ratios"]]
        xs = [ops[k]["ratios"][name] for k in keys if name in ops[k]["ratios"]]
        ax.barh(ys, xs, height=height, label=f"vs {name}")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(keys))], keys)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of ours (baseline time / ours); vs copy = fraction of copy bandwidth")
    ax.set_title(f"fastllava kernels on {next(iter(ops.values()))['device']} ({kind})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_memory(kind: str, ops: dict[str, dict[str, Any]], path: Path) -> None:
    plt = _plt()
    keys = list(ops)
    names = sorted({n for r in ops.values() for n in r["impls"]})
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(keys) * max(1, len(names)) ** 0.5 + 1.5))
    height = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        ys = [i + j * height for i, k in enumerate(keys) if name in ops[k]["impls"]]
        xs = [ops[k]["impls"][name]["peak_mem_bytes"] / 2**20 for k in keys if name in ops[k]["impls"]]
        ax.barh(ys, xs, height=height, label=name)
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(keys))], keys)
    ax.invert_yaxis()
    ax.set_xlabel(f"peak memory above inputs, MiB ({next(iter(ops.values()))['memory_method']})")
    ax.set_title(f"peak memory per call ({kind})")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_throughput(kind: str, recs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    names = sorted({r["name"] for r in recs})
    for r in recs:  # one benchmark (bench_engine: engine, hf_sequential, ...): the series name alone
        label = r["series"] if len(names) == 1 else f"{r['name']}: {r['series']}"
        series[label].append((r["concurrency"], r["tokens_per_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"throughput vs concurrency: {', '.join(names)} ({kind})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_packed_vs_padded(kind: str, recs: list[dict[str, Any]], path: Path) -> None:
    plt = _plt()
    labels = [f"{r['name']}: {r['label']}" for r in recs]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(labels)), 5))
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], [r["packed_tokens_per_s"] for r in recs], width=0.4, label="packed")
    ax.bar([x + 0.2 for x in xs], [r["padded_tokens_per_s"] for r in recs], width=0.4, label="padded")
    for x, r in zip(xs, recs, strict=True):
        speedup = r["packed_tokens_per_s"] / r["padded_tokens_per_s"]
        ax.annotate(f"{speedup:.2f}x", (x, r["packed_tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels, rotation=20, ha="right")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"packed vs padded ({kind})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(records: list[dict[str, Any]], out: Path, table_only: bool = False) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "summary.md"]
    written[0].write_text(summary_table(records), encoding="utf-8")
    if table_only:
        return written
    for kind, ops in latest_ops(records).items():
        plot_speedup(kind, ops, out / f"speedup_{kind}.png")
        plot_memory(kind, ops, out / f"memory_{kind}.png")
        written += [out / f"speedup_{kind}.png", out / f"memory_{kind}.png"]
    by_kind: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        if r.get("kind") in ("throughput", "packed_vs_padded"):
            by_kind[(r["kind"], r["device_kind"])].append(r)
    for (rec_kind, kind), recs in by_kind.items():
        path = out / f"{rec_kind}_{kind}.png"
        (plot_throughput if rec_kind == "throughput" else plot_packed_vs_padded)(kind, recs, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.plot", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--run", default="latest", help="latest (default: each device's last run), all, or a run_id")
    ap.add_argument("--table-only", action="store_true", help="write summary.md only (no matplotlib needed)")
    args = ap.parse_args(argv)
    records = select_run(read_records(args.results), args.run)
    if not records:
        print(f"no records in {args.results}")
        return 1
    for path in render(records, args.out, args.table_only):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
