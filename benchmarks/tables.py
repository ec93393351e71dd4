"""Every results table in README.md and docs/, generated from benchmarks/results/*.json.

A table lives between two markers in a Markdown file:

    <!-- generated: demo -->
    ...
    <!-- end generated -->

`python benchmarks/tables.py` rewrites every such block from the JSON (and the CLI reference
from the argparse parser); `--check` rewrites nothing and exits 1, naming the blocks, when a
committed block differs from what the JSON gives (tests/test_tables.py runs the check, so a
number typed by hand, or a JSON changed without its tables, fails the suite).

Speed cells of several runs (separate processes) show the median and the run-to-run range;
a single run shows the median and its interquartile range over interleaved rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)

# results measured before 1.0 and not re-measured since (no commit in their JSON)
PROVENANCE = {
    "speed_h100_float32.json": "0.2 (71e789f)",
    "speed_h100_bfloat16.json": "0.2 (71e789f)",
    "speed_h100_compiled.json": "0.2 (df564f2)",
    "speed_cpu_compiled_A.json": "0.2 (65ed10e)",
    "speed_cpu_compiled_B.json": "0.2 (65ed10e)",
    "gpu_check_h100.log": "0.2 (71e789f)",
}
# methods removed (1.0; 1.1: ats-soft, tome-layers): their rows stay in older JSON, the tables
# leave them out
REMOVED_METHODS = ("hybrid", "ats", "ats-merge", "tome-early", "ats-soft", "tome-layers")
# `auto` in rows that do not record its members and switch threshold (before 1.1): 1.0's
AUTO_1_0 = ("ats-fuse+official+paper+tome", 0.5)


# ---------------------------------------------------------------- helpers


def load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / name).read_text())


def runs(pattern: str) -> list[dict[str, Any]]:
    """Every JSON matching ``pattern``, in name order (one per run)."""
    found = sorted(RESULTS.glob(pattern))
    if not found:
        raise FileNotFoundError(f"no benchmarks/results/{pattern}")
    return [json.loads(p.read_text()) for p in found]


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def spread(values: Sequence[float], fmt: str = ".2f", suffix: str = "×", speedup: bool = False) -> str:
    """The median of several runs and their range; for a speed-up whose range reaches 1,
    "not faster" (the runs do not tell it from dense)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "–"
    mid = statistics.median(values)
    if len(values) == 1:
        return f"{mid:{fmt}}{suffix}"
    text = f"{mid:{fmt}}{suffix} ({min(values):{fmt}}–{max(values):{fmt}})"
    if speedup and min(values) <= 1.0 and max(values) != 1.0:
        text += " not faster"
    return text


def where(record: dict[str, Any], name: str) -> str:
    """One line on what machine and code a result comes from."""
    machine = record.get("machine", {})
    if isinstance(machine, str):
        machine = {"cpu": machine}
    device = machine.get("gpu") or (
        f"CPU ({machine.get('cpu_capability', 'x86_64')}, {machine.get('threads', '?')} "
        f"thread{'' if machine.get('threads') == 1 else 's'})"
    )
    code = machine.get("commit") or PROVENANCE.get(name, "unknown code")
    return f"`benchmarks/results/{name}`: {device}, torch {machine.get('torch', '?')}, ats-vit {code}."


# ---------------------------------------------------------------- the tables


def demo() -> str:
    """The README's table: the demo's budgets, accuracy on its test split, cost, speed."""
    record = load("demo.json")
    rows = record["rows"]
    dense = rows[0]
    body = []
    for r in rows:
        budget = r["budget"]
        if budget is None:
            what = "dense"
        elif r["label"].startswith("keep"):
            what = f"the paper's ATS (cap {budget['caps'][0]} of 36 from layer {budget['start_layer']})"
        else:
            what = f"calibrated for {budget['target']:.0%} of the GFLOPs"
        vs = "" if budget is None else f"{100 * r['vs_dense_diff']:+.2f} (p = {r['vs_dense_p']:.2g})"
        body.append(
            [
                what,
                "" if budget is None else f"`{budget['method']}`",
                f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.1f}",
                vs,
                f"{r['gflops_ratio']:.0%}",
                f"{r['kept_per_layer'][-1]:.1f}",
                "1.00×" if budget is None else spread(r["speedup_runs"], speedup=True),
            ]
        )
    header = [
        "budget",
        "method",
        "accuracy % (95%)",
        "vs dense, points (paired p)",
        "GFLOPs",
        "tokens left (of 36)",
        f"speed-up, batch 64 ({len(dense['speedup_runs'])} runs)",
    ]
    cfg = record["config"]
    note = (
        f"`python benchmarks/demo.py --runs {cfg['runs']}` (`ats-vit demo --seed {cfg['seed']}`, then its "
        f"budgets timed again in separate processes): test split of {dense['images']} images of "
        f"{dense['items']} held-out digits (the ± and the exact paired test count digits); speed-up: "
        f"median of the runs' medians (range). " + where(record, "demo.json")
    )
    return table(header, body) + "\n\n" + note


def auto_ran(row: dict[str, Any]) -> tuple[str, float]:
    """The members and switch threshold of the `auto` a frontier row ran (1.0's before 1.1
    recorded them)."""
    return row.get("auto_members", AUTO_1_0[0]), float(row.get("switch_z", AUTO_1_0[1]))


def auto_label(rows: Sequence[dict[str, Any]]) -> str:
    """What the `auto` line of a table says: "(recommended)" when its rows ran today's `auto`
    (its members and switch threshold), else which `auto` they ran."""
    from ats_vit.calibrate import AUTO, SWITCH_Z

    ran = {auto_ran(r) for r in rows if r["method"] == "auto"}
    if not ran or ran == {("+".join(AUTO), float(SWITCH_Z))}:
        return " (recommended)"
    return (
        " (as run: "
        + "; ".join(
            " + ".join(f"`{m}`" for m in members.split("+")) + f", z = {z:g}" for members, z in sorted(ran)
        )
        + ")"
    )


def _method_grid(
    rows: list[dict[str, Any]],
    accuracy: Callable[[dict[str, Any]], str],
    p_key: str,
    auto: str = " (recommended)",
) -> tuple[list[float], dict[tuple[str, float], dict[str, Any]], list[list[str]]]:
    """(targets, (method, target) -> row, table body) of a frontier: a line per method, a
    column per target; a cell is ``accuracy(row)``, then ▲/▼ when ``row[p_key]`` < 0.05 (better
    or worse than `auto`), then @x when the method landed away from the target. ``auto``: what
    the `auto` line's name is followed by (:func:`auto_label`)."""
    targets = sorted({r["target"] for r in rows})
    cell = {(r["method"], r["target"]): r for r in rows}
    body = []
    for method in dict.fromkeys(r["method"] for r in rows):
        line = [f"`{method}`" + (auto if method == "auto" else "")]
        for t in targets:
            r = cell.get((method, t))
            if r is None:
                line.append("")
                continue
            text = accuracy(r)
            p = r.get(p_key)
            if p is not None and not math.isnan(p) and p < 0.05:
                text += " ▲" if r["vs_auto_diff"] > 0 else " ▼"
            if abs(r["gflops_ratio"] - t) > 0.02:
                text += f" @{r['gflops_ratio']:.2f}"
            line.append(text)
        body.append(line)
    return targets, cell, body


def _last_epochs(rows: list[dict[str, Any]], key: str, fmt: str, scale: float = 1.0, epochs: int = 3) -> str:
    """The mean over seeds of each of the last ``epochs`` values of a per-epoch curve."""
    per_epoch = zip(*(r[key][-epochs:] for r in rows), strict=True)
    return " → ".join(f"{statistics.fmean(v) * scale:{fmt}}" for v in per_epoch)


def checkpoints(*names: str) -> str:
    """Per recipe, mean over its seeds: whether training converged (the last epochs' validation
    accuracy and loss) and how concentrated the attention ATS scores by is, layer by layer."""
    records = {name: load(name) for name in names}
    recipes: dict[str, list[dict[str, Any]]] = {}
    for record in records.values():
        for row in record["rows"]:
            recipes.setdefault(row["recipe"], []).append(row)
    body, entropy_lines = [], []
    for recipe, rows in recipes.items():
        model = rows[0]["model"]
        tokens = (model["image_size"] // model["patch_size"]) ** 2
        minutes = [r["train_minutes"] for r in rows if r["train_minutes"] is not None]
        validated = all(r["val_accuracy_per_epoch"] for r in rows)
        val_last = [r["val_accuracy_per_epoch"][-1] * 100 for r in rows] if validated else []
        seed_sd = statistics.stdev(val_last) if len(val_last) > 1 else 0.0
        sampled = any(r.get("loss_sampled") for r in rows)
        body.append(
            [
                recipe,
                ", ".join(str(r["seed"]) for r in rows),
                f"{model['arch']}, {tokens} tokens, depth {model['depth']}, dim {model['dim']}",
                f"{rows[0]['epochs']} ({rows[0]['steps']} steps), {statistics.median(minutes):.0f} min",
                _last_epochs(rows, "loss_per_epoch", ".3f") + (" (sampled)" if sampled else ""),
                _last_epochs(rows, "val_accuracy_per_epoch", ".2f", 100.0) if validated else "not logged",
                (
                    f"{val_last[0]:.2f} (one seed)"
                    if len(val_last) == 1
                    else f"{statistics.fmean(val_last):.2f} ± {seed_sd:.2f}"
                )
                if validated
                else "–",
            ]
        )
        entropy = [statistics.fmean(v) for v in zip(*(r["attention_entropy"] for r in rows), strict=True)]
        scored = "CLS query's attention" if model["arch"] in ("ats_vit", "timm") else "attention received"
        entropy_lines.append(f"{recipe} ({scored}): " + " ".join(f"{e:.2f}" for e in entropy))
    header = [
        "recipe",
        "seeds",
        "model",
        "epochs, time / seed",
        "loss, last 3 epochs",
        "validation %, last 3 epochs",
        "validation %, end (± seeds)",
    ]
    note = (
        "Mean over seeds; loss: the epoch's mean training loss (label smoothing 0.1; *sampled*: "
        "runs from before `epochs.csv`, the mean of the loss logged every 20 steps); "
        "validation: the calibration split after each epoch (scored for these curves only). "
        f"Attention entropy per layer, first to last (mean over heads, {rows[0]['entropy_images']} "
        "calibration images and the seeds; 1 = uniform over the patches, 0 = all on one): "
        + "; ".join(entropy_lines)
        + ". "
        + " ".join(where(record, name) for name, record in records.items())
    )
    return table(header, body) + "\n\n" + note


def auto_rule(name: str) -> str:
    """`benchmarks/auto_rule.py`'s replay of `auto` on held-out checkpoints: one line per member
    list, its mean test accuracy over every (checkpoint, target) at each switch threshold, and,
    at the threshold the rule picked, per recipe and how often it was below its best member or
    switched."""
    from ats_vit.bench.frontier import recipe_of

    record = load(name)
    pick = record["pick"]
    recipes = list(dict.fromkeys(recipe_of(r["checkpoint"]) for r in record["rows"]))
    per_recipe: dict[tuple[str, float, str], list[float]] = {}
    for r in record["rows"]:
        per_recipe.setdefault((r["members"], r["z"], recipe_of(r["checkpoint"])), []).append(
            r["accuracy_pct"]
        )
    several = len(recipes) > 1
    zs = sorted({s["z"] for s in record["summary"]})
    summary = {(s["members"], s["z"]): s for s in record["summary"]}
    body = []
    for members in dict.fromkeys(s["members"] for s in record["summary"]):
        at_pick = summary[members, pick["z"]]
        body.append(
            [
                " + ".join(f"`{m}`" for m in members.split("+")),
                *(f"{summary[members, z]['mean_pct']:.3f}" for z in zs),
                *(
                    [f"{statistics.fmean(per_recipe[members, pick['z'], recipe]):.3f}" for recipe in recipes]
                    if several
                    else []
                ),
                str(at_pick["below_best"]),
                f"{at_pick['switches']} of {at_pick['points']}",
            ]
        )
    config = record["config"]
    names = [Path(c).parent.name for c in config["checkpoints"]]
    each = config.get("checkpoint_targets") or [config["targets"]] * len(names)
    groups: dict[tuple[float, ...], list[str]] = {}
    for checkpoint, targets in zip(names, each, strict=True):
        groups.setdefault(tuple(targets), []).append(checkpoint)
    at = "; ".join(
        f"{', '.join(ckpts) if len(groups) > 1 else 'every checkpoint'} at {', '.join(f'{t:g}' for t in ts)}"
        for ts, ckpts in groups.items()
    )
    note = (
        f"Held-out checkpoints {', '.join(names)} ({_counts(config['calib_images'])} calibration "
        f"images; targets: {at}): mean test accuracy of `auto`'s pick over all points at each "
        "switch threshold z"
        + (f", and at the picked z = {pick['z']:g} per recipe" if several else "")
        + f"; *below best* (at z = {pick['z']:g}): points where the pick is below the best member "
        "of its list by the exact paired test (p < 0.05); *left the first*: how often it switched. "
        f"The rule's pick on these checkpoints: {pick['members'].replace('+', ' + ')}, z = {pick['z']:g}. "
        + where(record, name)
    )
    header = [
        "members (first kept unless another is ahead)",
        *(f"z = {z:g}" for z in zs),
        *(f"{recipe} %" for recipe in (recipes if several else [])),
        "below best",
        "left the first",
    ]
    return table(header, body) + "\n\n" + note


def _counts(value: int | list[int]) -> str:
    """A count given once or per checkpoint: "320" when every checkpoint had the same."""
    if isinstance(value, int):
        return str(value)
    return str(value[0]) if len(set(value)) == 1 else ", ".join(map(str, value))


def frontier_seeds(recipe: str, *names: str) -> str:
    """One recipe's frontier pooled over its seeds (from one run, or one run per seed): the
    mean over seeds ± their standard deviation, ▲/▼ where the paired test over seeds x test
    items against `auto` is significant after Benjamini-Hochberg over this table's
    comparisons; the sanity checks a trained DeiT passes (ToMe, PiToMe where it ran, and top-k
    at least as accurate as random dropping at every target)."""
    from ats_vit.bench.frontier import pool_seeds, recipe_of

    records = {name: load(name) for name in names}
    record = next(iter(records.values()))
    rows = [
        r
        for rec in records.values()
        for r in rec["rows"]
        if recipe_of(r["checkpoint"]) == recipe and r["method"] not in REMOVED_METHODS
    ]
    raw = rows
    pooled = pool_seeds(rows)
    dense = next(r for r in pooled if r["method"] == "dense")
    one = dense["seeds"] == 1  # no spread across seeds yet: the cell is the checkpoint's accuracy
    rows = [r for r in pooled if r["method"] != "dense"]
    targets, cell, body = _method_grid(
        rows,
        lambda r: (
            f"{r['accuracy_pct']:.2f}"
            if r["seeds"] == 1
            else f"{r['accuracy_pct']:.2f} ± {r['seed_sd_pct']:.2f}"
        ),
        "vs_auto_p_adj",
        auto_label(raw),
    )
    # a method run on fewer seeds than dense (too slow to run on every seed) says on which
    fewer = {r["method"]: r["checkpoints"] for r in rows if r["seeds"] < dense["seeds"]}
    for line, method in zip(body, dict.fromkeys(r["method"] for r in rows), strict=True):
        if method in fewer:
            line[0] += f" ({', '.join(fewer[method])} only)"
    if all(("auto", t) in cell for t in targets):
        # one seed: its own median and range over the timing processes
        speed = {(r["method"], r["target"]): r["speedup_text"] for r in raw} if one else {}
        texts = [speed.get(("auto", t), cell["auto", t]["speedup_text"]) for t in targets]
        body.append(["`auto` speed-up, batch 64", *texts])
    tested = [r for r in rows if not math.isnan(r.get("vs_auto_p_adj", math.nan))]
    below = [r for r in tested if r["vs_auto_p_adj"] < 0.05 and r["vs_auto_diff"] > 0]
    above = [r for r in tested if r["vs_auto_p_adj"] < 0.05 and r["vs_auto_diff"] < 0]
    sanity = []
    for peer in ("tome", "pitome", "topk"):
        if not any((peer, t) in cell for t in targets):
            continue  # not run in this table
        worse = [
            t
            for t in targets
            if (peer, t) in cell
            and ("random", t) in cell
            and cell[peer, t]["accuracy"] < cell["random", t]["accuracy"]
        ]
        sanity.append(f"`{peer}` below `random` at " + (", ".join(f"{t:g}" for t in worse) or "no target"))
    intervals = [r["ci95_pct"] for r in rows]
    header = ["method", *(f"{t:g}" for t in targets)]
    span = f"{min(intervals):.1f}–{max(intervals):.1f} points"
    processes = record["config"]["timing_processes"]
    if one:
        seeds = (
            f"{recipe}: one seed so far ({dense['checkpoints'][0]}); dense {dense['accuracy_pct']:.2f}%. "
            "Cells: that checkpoint's test accuracy (no spread across seeds yet); the 95% interval over "
            f"its test items is {span}. Speed-up: median over {processes} separate processes "
            "(lowest–highest). "
        )
    else:
        seeds = (
            f"{recipe}: {dense['seeds']} seeds ({', '.join(dense['checkpoints'])}), each trained on its "
            f"own data draw; dense {dense['accuracy_pct']:.2f}% ± {dense['seed_sd_pct']:.2f} across seeds. "
            "Cells: mean over seeds ± their standard deviation"
            + ("; a line marked *only* ran on those seeds (one: no ±)" if fewer else "")
            + f"; the 95% interval within one checkpoint (test items) is {span}. Speed-up: median "
            f"over seeds of each seed's median over {processes} separate processes (lowest–highest seed). "
        )
    note = (
        seeds + "▲/▼: better/worse than `auto` at that target by "
        f"the exact paired test over seeds × test items, Benjamini-Hochberg adjusted over this table's "
        f"{len(tested)} comparisons (p < 0.05): `auto` above a peer {len(above)} times, below {len(below)}"
        + (" (" + "; ".join(f"`{r['method']}` at {r['target']:g}" for r in below) + ")" if below else "")
        + f". Sanity: {'; '.join(sanity)}. "
        + " ".join(where(rec, name) for name, rec in records.items())
    )
    return table(header, body) + "\n\n" + note


def _speed_summary(records: list[dict[str, Any]], name: str) -> str:
    """Efficiency (measured speed-up / FLOP ideal) per batch, family and rule, over runs."""
    by: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for record in records:
        for r in record["rows"]:
            by.setdefault((r["batch"], r["family"], r["variant"]), []).append(r)
    variants = list(dict.fromkeys((f, v) for (_, f, v) in by if v != "dense" and "static" not in v))
    batches = sorted({b for b, _, _ in by})
    body = []
    for family, variant in variants:
        first = by[(batches[0], family, variant)][0]
        line = [family, variant.removeprefix("ATS "), f"{first['kept']:.0f}", f"{first['ideal']:.2f}×"]
        line += [spread([r["efficiency"] for r in by[(b, family, variant)]], suffix="") for b in batches]
        body.append(line)
    header = ["model", "rule", "tokens kept", "FLOP ideal", *(f"efficiency, batch {b}" for b in batches)]
    cfg = records[0]["config"]
    note = (
        f"`ats-vit bench speed` ×{len(records)} ({cfg['model']}, random weights, layers from "
        f"{cfg['start_layer']} on capped at {cfg.get('cap', cfg.get('max_tokens'))} patch tokens, "
        f"{cfg['dtype']}): efficiency = "
        "speed-up over the same model's dense pass / the FLOP-ideal speed-up, median of the runs "
        "(range). " + where(records[0], name)
    )
    return table(header, body) + "\n\n" + note


def _speed_full(records: list[dict[str, Any]], name: str) -> str:
    by: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
    for record in records:
        for r in record["rows"]:
            by.setdefault((r["batch"], r["family"], r["variant"]), []).append(r)
    body = []
    for (batch, family, variant), rs in by.items():
        first = rs[0]
        seed = [r.get("vs_seed_ats", math.nan) for r in rs]
        body.append(
            [
                str(batch),
                family,
                variant,
                f"{first['gflops']:.3f}",
                f"{first['kept']:.1f}",
                spread([r["img_per_s"] for r in rs], ".1f", ""),
                spread([r["speedup"] for r in rs], speedup=True),
                f"{first['ideal']:.2f}",
                spread([r["efficiency"] for r in rs], suffix=""),
                spread(seed, suffix=""),
            ]
        )
    header = [
        "batch",
        "model",
        "variant",
        "GFLOPs",
        "kept",
        "img/s",
        "speed-up",
        "ideal",
        "efficiency",
        "vs seed ATS",
    ]
    note = f"Median of {len(records)} runs (range). " + where(records[0], name)
    return table(header, body) + "\n\n" + note


def speed_cpu() -> str:
    return _speed_summary(runs("speed_cpu_run*.json"), "speed_cpu_run*.json")


def speed_cpu_full() -> str:
    return _speed_full(runs("speed_cpu_run*.json"), "speed_cpu_run*.json")


def speed_h100() -> str:
    parts = []
    for name in ("speed_h100_float32.json", "speed_h100_bfloat16.json", "speed_h100_compiled.json"):
        record = load(name)
        body = [
            [
                str(r["batch"]),
                r["family"],
                r["variant"],
                f"{r['speedup']:.2f}×",
                f"{r['ideal']:.2f}",
                f"{r['efficiency']:.2f}",
            ]
            for r in record["rows"]
            if r["variant"] != "dense"
        ]
        title = f"**{record['config']['dtype']}{', compiled' if record['config']['compile'] else ''}**"
        parts.append(
            title + "\n\n" + table(["batch", "model", "variant", "speed-up", "ideal", "efficiency"], body)
        )
        parts.append("One run. " + where(record, name))
    return "\n\n".join(parts)


def speed_cpu_compiled() -> str:
    records = [load("speed_cpu_compiled_A.json"), load("speed_cpu_compiled_B.json")]
    rows = [
        [r for r in rec["rows"] if "compiled" in r["variant"] and r["variant"] != "dense compiled"]
        for rec in records
    ]
    body = []
    for i, r in enumerate(rows[0]):
        both = [rows[0][i], rows[1][i]]
        body.append(
            [
                str(r["batch"]),
                r["family"],
                r["variant"],
                spread([x["efficiency"] for x in both], suffix=""),
                spread([x["vs_eager"] for x in both]),
            ]
        )
    note = "Two runs (range). " + where(records[0], "speed_cpu_compiled_A.json")
    return table(["batch", "model", "variant", "efficiency", "vs eager"], body) + "\n\n" + note


def train_speed() -> str:
    records = runs("train_speed_demo_run*.json")
    names = [r["variant"] for r in records[0]["rows"]]
    body = []
    for i, name in enumerate(names):
        rs = [rec["rows"][i] for rec in records]
        body.append(
            [
                name,
                f"{rs[0]['gflops_ratio']:.0%}",
                spread([r["steps_per_s"] for r in rs], ".1f", ""),
                spread([r["speedup"] for r in rs], speedup=True),
                f"{rs[0]['ideal']:.2f}×",
                spread([r["efficiency"] for r in rs], suffix=""),
            ]
        )
    cfg = records[0]["config"]
    note = (
        f"`ats-vit bench train` ×{len(records)} on the demo checkpoint, batch {cfg['batch_size']}, "
        "budgets at 40% of the GFLOPs; median of the runs (range). "
        + where(records[0], "train_speed_demo_run*.json")
    )
    return (
        table(["budget", "GFLOPs", "steps/s", "speed-up", "FLOP ideal", "efficiency"], body) + "\n\n" + note
    )


def finetuned(key: str) -> str:
    """A fine-tuned row's key as a reader names it: ``lr 0.0005`` (the recipe's method, the
    only one before ``--methods``) is ats-fuse at lr 0.0005, ``tome lr 0.0005`` tome at it."""
    method, _, lr = key.rpartition("lr ")
    return f"{method.strip() or 'ats-fuse'} at lr {lr}"


def finetune_recipe(name: str) -> str:
    """`benchmarks/finetune_recipe.py`: fine-tuned at the target, per learning rate, against dense
    and against the recipe's learning rate, pooled over the checkpoints: the held-out ones
    that chose the learning rate, or (``--report``) the reported seeds that measure the recipe."""
    record = load(name)
    cfg = record["config"]
    report = cfg.get("report", False)
    recipes: dict[str, list[int]] = {}  # recipe -> its checkpoints' positions (NAME-sS)
    for i, path in enumerate(cfg["checkpoints"]):
        recipes.setdefault(Path(path).parent.name.rsplit("-s", 1)[0], []).append(i)

    def per_recipe(row: dict[str, Any]) -> str:
        means = {k: statistics.mean(row["per_checkpoint_pct"][i] for i in v) for k, v in recipes.items()}
        if row["key"] == "dense":
            return " / ".join(f"{m:.2f}" for m in means.values())
        dense = next(r for r in record["rows"] if r["key"] == "dense")
        return " / ".join(
            f"{m - statistics.mean(dense['per_checkpoint_pct'][i] for i in recipes[k]):+.2f}"
            for k, m in means.items()
        )

    body = [
        [
            r["model"],
            f"{r['accuracy_pct']:.2f}",
            f"{r['spread_pct']:.2f}",
            " / ".join(f"{a:.2f}" for a in r["per_checkpoint_pct"]),
            per_recipe(r),
            "" if r["key"] == "dense" else f"{r['vs_dense_pct']:+.2f} (p = {r['vs_dense_p_adj']:.2g})",
            ""
            if r["key"] in ("dense", record["recipe"])
            else f"{r['vs_recipe_pct']:+.2f} (p = {r['vs_recipe_p_adj']:.2g})",
        ]
        for r in record["rows"]
    ]
    checkpoints = ", ".join(Path(c).parent.name for c in cfg["checkpoints"])
    common = (
        f"({cfg['epochs']} epochs, {cfg['calib_images']} calibration images, each checkpoint's test "
        "split; the checkpoints pooled, each one's items their own; ± the standard deviation "
        "across checkpoints): vs dense"
    )
    if report:
        note = (
            f"`python benchmarks/finetune_recipe.py --report` on the reported seeds {checkpoints} "
            f"{common} and vs the recipe, exact paired test, Benjamini-Hochberg adjusted over each "
            "column. The recipe "
            f"({finetuned(record['recipe'])}) was chosen on the held-out seeds above, not on these. "
        )
    else:
        distill = cfg.get("distill") or []
        lrs, weights = (" ".join(f"{v:g}" for v in values) for values in (cfg["lrs"], distill))
        options = f" --lrs {lrs} --distill {weights}" if distill else ""
        methods = cfg.get("methods") or []
        if len(methods) > 1:
            options = f" --lrs {lrs} --methods {' '.join(methods)}"
        note = (
            f"`python benchmarks/finetune_recipe.py{options}` on the held-out checkpoints {checkpoints} "
            f"{common} and vs the recipe ({finetuned(record['recipe'])}), exact paired test, "
            f"Benjamini-Hochberg adjusted over each column. The rule keeps: {finetuned(record['pick'])}. "
        )
        if distill:  # the option measured no better and was removed: its code is the run's commit's
            note += "Distillation (`TrainConfig.distill`) was removed since: run it with the commit below. "
    header = [
        "model",
        "test %",
        "± across checkpoints",
        "per checkpoint %",
        f"per recipe ({' / '.join(recipes)}): dense %, else vs dense",
        "vs dense (adj. p)",
    ]
    header.append("vs the recipe (adj. p)")
    return table(header, body) + "\n\n" + note + where(record, name)


def calibration_speed() -> str:
    record = load("calibration_speed_demo.json")
    rows = record["rows"]
    if "way" not in rows[0]:  # before 1.1: the probe on or off
        rows = [dict(r, way="as it runs" if r["probe"] == "True" else "without the probe") for r in rows]
    body = [
        [
            f"{r['target']:g}",
            r["way"],
            f"`{r['method']}`",
            str(r["trials"]),
            f"{r['passes']:.0f}",
            f"{r['seconds']:.1f}",
            f"{r['speedup']:.2f}×",
            "yes" if r["same"] == "True" else "**no**",
        ]
        for r in rows
    ]
    note = (
        f"`benchmarks/calibration_speed.py` on the demo checkpoint (`{record['config']['method']}`, "
        f"{record['config']['runs']} interleaved runs: medians; *as it runs*: with the probe and, for "
        "`auto`, later members searched only where the first has no budget near the target; *every "
        "member*: the probe, every member searched; *neither shortcut*: the slowest way, which the "
        "speed-up and *same budget* compare with). " + where(record, "calibration_speed_demo.json")
    )
    header = ["target", "search", "kept", "trials", "forward passes", "seconds", "speed-up", "same budget"]
    return table(header, body) + "\n\n" + note


def latency_model() -> str:
    record = load("latency_model_demo.json")
    body = [
        [
            r["budget"],
            f"{r['predicted']:.3f}",
            f"{r['measured']:.3f}",
            ", ".join(f"{m:.3f}" for m in r["measured_runs"]),
            f"{r['error_pct']:+.1f}%",
        ]
        for r in record["rows"]
    ]
    errors = sorted(abs(r["error_pct"]) for r in record["rows"])
    note = (
        f"Predicted and timed time ratios to dense at batch {record['config']['batch_size']} "
        f"(`benchmarks/latency_model.py`, {record['config']['runs']} timing runs: median). Absolute error: "
        f"median {statistics.median(errors):.1f}%, largest {errors[-1]:.1f}%. "
        + where(record, "latency_model_demo.json")
    )
    return table(["budget", "predicted", "timed (median)", "runs", "error"], body) + "\n\n" + note


def latency_budgets() -> str:
    record = load("latency_budgets.json")
    body = [
        [
            r["case"],
            str(r["timing_batch"]),
            f"{r['asked']:.2f}×",
            f"`{r['method']}`",
            f"{r['gflops_ratio']:.0%}",
            f"{r['calibration_speedup']:.2f}×",
            spread(r["speedup_runs"], speedup=True),
            f"{r['off_pct']:+.1f}%",
        ]
        for r in record["rows"]
    ]
    header = ["case", "batch", "asked", "method", "GFLOPs", "calibration's timing", "eval runs", "off"]
    note = (
        "`benchmarks/latency_budgets.py`: `ats-vit calibrate --cost latency`, then `ats-vit eval` of the "
        f"budget in {record['config']['runs']} separate processes (median, range; off: median against "
        "the asked speed-up). " + where(record, "latency_budgets.json")
    )
    return table(header, body) + "\n\n" + note


def bucketed_attention() -> str:
    """`benchmarks/bucketed_attention.py`: adaptive counts timed with attention in buckets and
    over the whole padded grid, against the FLOP ideal."""
    record = load("bucketed_attention.json")
    body = [
        [
            r["checkpoint"],
            f"`{r['method']}`",
            f"{r['target']:g}",
            str(r["batch"]),
            f"{r['gflops_ratio']:.0%}",
            f"{r['padding_pct']:.0f}%",
            f"{r['ideal']:.2f}×",
            spread(r["buckets_runs"], speedup=True),
            spread(r["whole_runs"], speedup=True),
            f"{r['efficiency_buckets']:.2f} / {r['efficiency_whole']:.2f}",
            f"{r['gain']:.2f}×",
        ]
        for r in record["rows"]
    ]
    header = [
        "checkpoint",
        "method",
        "target",
        "batch",
        "GFLOPs",
        "padding",
        "FLOP ideal",
        "in buckets",
        "whole grid",
        "efficiency (buckets / whole)",
        "buckets vs whole",
    ]
    cfg = record["config"]
    note = (
        f"`python benchmarks/bucketed_attention.py`: each budget calibrated on {cfg['calib_images']} "
        f"images, then timed against dense in {cfg['processes']} separate processes of "
        f"{cfg['repeats']} interleaved rounds in random order (median speed-up and range over the "
        "processes; *padding*: the share of the sampled layers' token slots that is padding; "
        "*buckets vs whole*: the median per-process ratio of the two speed-ups). "
        + where(record, "bucketed_attention.json")
    )
    return table(header, body) + "\n\n" + note


def gpu_check() -> str:
    lines = (RESULTS / "gpu_check_h100.log").read_text().splitlines()
    pattern = re.compile(
        r"^(\w+) (.+?)\s+same tokens (\d+)/(\d+)\s+max \|logit diff\| (\S+)\s+bf16 finite (\w+)"
    )
    body = []
    for line in lines:
        m = pattern.match(line)
        if m:
            model, rule, same, total, diff, finite = m.groups()
            body.append(
                [model, rule.strip(), f"{same}/{total}", diff, "yes" if finite == "True" else "**no**"]
            )
    header = ["model", "rule", "same tokens as CPU", "max logit difference", "bfloat16 finite"]
    note = (
        "`python benchmarks/gpu_check.py` on an H100: `benchmarks/results/gpu_check_h100.log`, "
        f"ats-vit {PROVENANCE['gpu_check_h100.log']}."
    )
    return table(header, body) + "\n\n" + note


def cli() -> str:
    """`ats-vit --help` and every command's, as the parser prints them."""
    sys.path.insert(0, str(ROOT))
    import os

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal; the same width everywhere
    from ats_vit.cli import build_parser

    parser = build_parser()
    parts = ["```text\n" + parser.format_help().rstrip() + "\n```"]
    sub = next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for name, command in sub.choices.items():
        nested = [a for a in command._actions if hasattr(a, "choices") and isinstance(a.choices, dict)]
        parts.append(f"### `ats-vit {name}`\n\n```text\n" + command.format_help().rstrip() + "\n```")
        for kinds in nested:
            for kind, bench in kinds.choices.items():
                parts.append(
                    f"### `ats-vit {name} {kind}`\n\n```text\n" + bench.format_help().rstrip() + "\n```"
                )
    return "\n\n".join(parts)


TABLES: dict[str, Callable[[], str]] = {
    "demo": demo,
    "auto-rule": lambda: auto_rule("auto_rule.json"),
    "checkpoints": lambda: checkpoints(
        "checkpoints_demo_gap.json", "checkpoints_map.json", "checkpoints_glyphs196.json"
    ),
    "frontier-seeds-demo": lambda: frontier_seeds("demo", "frontier_demo_seeds.json"),
    "frontier-seeds-gap": lambda: frontier_seeds("gap", "frontier_gap_seeds.json"),
    "frontier-seeds-map": lambda: frontier_seeds("map", "frontier_map_seeds.json"),
    "frontier-seeds-glyphs196": lambda: frontier_seeds(
        "glyphs196", *sorted(p.name for p in RESULTS.glob("frontier_glyphs196_seeds_*.json"))
    ),
    "speed-cpu": speed_cpu,
    "speed-cpu-full": speed_cpu_full,
    "speed-cpu-compiled": speed_cpu_compiled,
    "speed-h100": speed_h100,
    "train-speed": train_speed,
    "finetune-recipe": lambda: finetune_recipe("finetune_recipe.json"),
    "finetune-seeds": lambda: finetune_recipe("finetune_seeds.json"),
    "finetune-distill": lambda: finetune_recipe("finetune_distill.json"),
    "finetune-methods": lambda: finetune_recipe("finetune_methods.json"),
    "calibration-speed": calibration_speed,
    "latency-model": latency_model,
    "latency-budgets": latency_budgets,
    "bucketed-attention": bucketed_attention,
    "gpu-check": gpu_check,
    "cli": cli,
}


# ---------------------------------------------------------------- figures

# the multi-seed frontier runs, one panel per recipe in the figure of the methods guide
SEED_RUNS = (
    "frontier_demo_seeds.json",
    "frontier_gap_seeds.json",
    "frontier_map_seeds.json",
    "frontier_glyphs196_seeds_1.json",
    "frontier_glyphs196_seeds_2.json",
    "frontier_glyphs196_seeds_3.json",
)


def frontier_seeds_figure(path: Path) -> None:
    """Every method's frontier per recipe, pooled over its seeds (mean accuracy with the mean
    within-checkpoint 95% interval, against the GFLOPs and the median speed-up); an `auto`
    that is not today's is drawn as "auto (1.0)"."""
    from ats_vit.bench.frontier import pool_seeds
    from ats_vit.calibrate import AUTO, SWITCH_Z
    from ats_vit.viz import plot_frontier

    today = ("+".join(AUTO), float(SWITCH_Z))
    rows = []
    for name in SEED_RUNS:
        for r in load(name)["rows"]:
            if r["method"] in REMOVED_METHODS:
                continue
            older = r["method"] == "auto" and auto_ran(r) != today
            rows.append(dict(r, method="auto (1.0)") if older else r)
    pooled = pool_seeds(rows)
    seeds = {r["recipe"]: r["seeds"] for r in pooled if r["method"] == "dense"}
    plot_frontier([dict(r, checkpoint=f"{r['recipe']}, {seeds[r['recipe']]} seeds") for r in pooled], path)


FIGURES: dict[str, Callable[[Path], None]] = {"docs/assets/frontier_seeds.png": frontier_seeds_figure}


# ---------------------------------------------------------------- rewriting the files


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def render(text: str, cache: dict[str, str]) -> str:
    """``text`` with every generated block rewritten (an unknown name is an error)."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"unknown generated block {name!r}; known: {', '.join(TABLES)}")
        if name not in cache:
            cache[name] = TABLES[name]().rstrip() + "\n"
        return match.group(1) + cache[name] + match.group(4)

    return BLOCK.sub(replace, text)


def stale() -> list[str]:
    """The files whose generated blocks differ from what the JSON gives."""
    cache: dict[str, str] = {}
    return [str(p.relative_to(ROOT)) for p in documents() if render(p.read_text(), cache) != p.read_text()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is out of date")
    p.add_argument("--figures", action="store_true", help="also redraw the figures generated from JSON")
    args = p.parse_args(argv)
    if args.check:
        changed = stale()
        if changed:
            print(f"out of date: {', '.join(changed)}; run python benchmarks/tables.py", file=sys.stderr)
            return 1
        print("every generated table matches its JSON")
        return 0
    from ats_vit._io import write_text_atomic

    cache: dict[str, str] = {}
    for path in documents():
        text = path.read_text()
        new = render(text, cache)
        if new != text:
            write_text_atomic(path, new)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.figures:  # not compared by --check: the same data draws other bytes on another matplotlib
        for name, draw in FIGURES.items():
            draw(ROOT / name)
            print(f"wrote {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
