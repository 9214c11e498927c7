"""Re-baseline from a results file: ``python -m bench.update_baselines RESULTS.jsonl [--device h100] [--run ID]``.

Writes ``bench/baselines/<device_kind>.json`` (or ``--dir``) from the op records of RESULTS.jsonl, merged into
the existing file; the last record per (device kind, benchmark) wins. ``--run latest`` (the default) keeps
only each device kind's most recent run, so an old run appended to the same file never overwrites a new one.
Prints every ratio that changed. This and ``pytest bench --update-baselines`` are the only writers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.gates import BASELINE_DIR, load_baselines, update_baselines


def read_records(path: Path | str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def select_run(records: list[dict[str, Any]], run: str) -> list[dict[str, Any]]:
    """``all``, ``latest`` (each device kind's last run_id in file order) or one run_id."""
    if run == "all":
        return records
    if run != "latest":
        return [r for r in records if r.get("run_id") == run]
    last = {r["device_kind"]: r.get("run_id") for r in records}
    return [r for r in records if r.get("run_id") == last[r["device_kind"]]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.update_baselines", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a results.jsonl written by pytest bench")
    ap.add_argument("--device", default=None, help="only this device kind (cpu, h100, h200, ...)")
    ap.add_argument("--run", default="latest", help="latest (default), all, or a run_id")
    ap.add_argument("--dir", type=Path, default=None, help=f"baseline folder (default {BASELINE_DIR})")
    args = ap.parse_args(argv)

    records = select_run(read_records(args.results), args.run)
    before = {r["device_kind"]: load_baselines(r["device_kind"], args.dir) for r in records}
    written = update_baselines(records, args.dir, only=args.device)
    if not written:
        print(f"no op records{' for ' + args.device if args.device else ''} in {args.results}")
        return 1
    for kind, path in written.items():
        after = load_baselines(kind, args.dir)
        print(f"{path}: {len(after)} benchmarks")
        for key, entry in after.items():
            old = before.get(kind, {}).get(key, {}).get("ratios", {})
            for name, value in entry["ratios"].items():
                if old.get(name) != value:
                    prev = f"{old[name]:.3f}" if name in old else "new"
                    print(f"  {key} vs {name}: {prev} -> {value:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
