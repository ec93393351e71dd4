"""Combine several `ats-vit bench speed --json` runs into one Markdown table.

Each timed cell becomes the median over the runs with the range beside it; GFLOPs, kept
tokens and peak memory come from the first run (they do not depend on timing). Runs must
share their config.

    python benchmarks/summarize.py speed1.json speed2.json speed3.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

TIMED = ("img_per_s", "speedup", "efficiency", "vs_eager", "vs_seed_ats")


def cell(values: list[float], spec: str) -> str:
    if any(math.isnan(v) for v in values):
        return "n/a"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{statistics.median(values):{spec}} ({min(values):{spec}} to {max(values):{spec}})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="JSON files written by `ats-vit bench speed --json`")
    args = parser.parse_args()
    records = []
    for path in args.runs:
        with open(path) as f:
            records.append(json.load(f))
    configs = [{k: v for k, v in r["config"].items() if k != "threads"} for r in records]
    if any(c != configs[0] for c in configs):
        parser.error("the runs were made with different configs")
    first = records[0]
    print(f"{len(records)} runs; machine: {first['machine']}\n")
    columns = ["batch", "model", "variant", "GFLOPs", "kept", "peak MiB", "img/s", "speed-up", "ideal"]
    columns += ["efficiency", "vs eager", "vs seed ATS"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for i, row in enumerate(first["rows"]):
        timed = {key: [r["rows"][i][key] for r in records] for key in TIMED}
        cells = [row["batch"], row["family"], row["variant"], f"{row['gflops']:.3f}", f"{row['kept']:.1f}"]
        peak = "n/a" if math.isnan(row["peak_mib"]) else f"{row['peak_mib']:.1f}"
        cells += [peak, cell(timed["img_per_s"], ".1f"), cell(timed["speedup"], ".2f")]
        cells += [f"{row['ideal']:.2f}", cell(timed["efficiency"], ".2f"), cell(timed["vs_eager"], ".2f")]
        cells += [cell(timed["vs_seed_ats"], ".2f")]
        print("| " + " | ".join(map(str, cells)) + " |")


if __name__ == "__main__":
    main()
