"""Every results table in README.md and docs/ is what benchmarks/tables.py makes of the JSON in
benchmarks/results/, and every result file there is published (or is named as the evidence of a
choice)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location("tables", ROOT / "benchmarks" / "tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_match_their_json(tables):
    assert tables.stale() == [], "run `python benchmarks/tables.py` and commit what it writes"


def test_a_number_typed_by_hand_is_caught(tables):
    readme = (ROOT / "README.md").read_text()
    match = tables.BLOCK.search(readme)
    assert match and match["name"] == "demo"
    edited = readme.replace(match["body"], match["body"].replace("95.", "96.", 1))
    assert edited != readme
    assert tables.render(edited, {}) == readme, "rendering restores what the JSON says"


def test_every_table_is_published_and_every_block_is_known(tables):
    used = set()
    for page in tables.documents():
        used |= {m["name"] for m in tables.BLOCK.finditer(page.read_text())}
    assert used == set(tables.TABLES), (
        f"unused: {set(tables.TABLES) - used}; unknown: {used - set(tables.TABLES)}"
    )
    with pytest.raises(KeyError, match="unknown generated block 'nope'"):
        tables.render("<!-- generated: nope -->\n<!-- end generated -->", {})


def test_every_result_file_is_read_by_a_table_or_named_as_evidence(tables):
    source = (ROOT / "benchmarks" / "tables.py").read_text() + (ROOT / "benchmarks" / "README.md").read_text()
    for path in (ROOT / "benchmarks" / "results").iterdir():
        pattern_used = any(
            path.match(glob)
            for glob in (
                "speed_cpu_run*.json",
                "train_speed_demo_run*.json",
                "frontier_glyphs196_seeds_*.json",
            )
        )
        assert path.name in source or pattern_used, f"{path.name}: neither published nor named as evidence"


def test_speed_cells_show_the_median_and_the_range_of_the_runs(tables):
    assert tables.spread([1.2, 1.5, 1.3]) == "1.30× (1.20–1.50)"
    assert tables.spread([1.25]) == "1.25×"
    assert tables.spread([float("nan")]) == "–"


def test_the_demo_table_carries_every_run_of_the_json(tables):
    rows = json.loads((ROOT / "benchmarks" / "results" / "demo.json").read_text())["rows"]
    text = tables.demo()
    for row in rows[1:]:
        assert tables.spread(row["speedup_runs"]) in text
        assert f"{100 * row['accuracy']:.2f}" in text


def test_the_sanity_line_names_each_merging_peer_that_ran(tables, monkeypatch):
    """ToMe, PiToMe and top-k should stay at least as accurate as random dropping; a peer that
    was not run in a table is left out of the line rather than reported as passing."""
    name = "frontier_glyphs196_seeds_1.json"
    record = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    record["rows"] = [r for r in record["rows"] if r["method"] != "pitome"]
    monkeypatch.setattr(tables, "load", lambda _name: record)
    assert "`pitome`" not in tables.frontier_seeds("glyphs196", name), "not run: not in the line"
    random_at = {r["target"]: r for r in record["rows"] if r["method"] == "random"}
    extra = []
    for row in record["rows"]:
        if row["method"] == "tome":
            worse = random_at[row["target"]]["accuracy"] - 0.01 if row["target"] == 0.4 else row["accuracy"]
            extra.append({**row, "method": "pitome", "accuracy": worse, "accuracy_pct": 100 * worse})
    record["rows"] += extra
    assert "`pitome` below `random` at 0.4;" in tables.frontier_seeds("glyphs196", name)


def test_a_method_run_on_fewer_seeds_says_on_which(tables, monkeypatch):
    """A method too slow to run on every seed is pooled over the seeds it ran on, and its line
    names them; its cells carry no spread across seeds when it ran on one."""
    name = "frontier_glyphs196_seeds_1.json"
    record = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    second = [
        {**r, "checkpoint": "glyphs196-s9", "data": "glyphs@9"}
        for r in record["rows"]
        if r["method"] != "tome"
    ]
    record["rows"] += second
    monkeypatch.setattr(tables, "load", lambda _name: record)
    text = tables.frontier_seeds("glyphs196", name)
    tome = next(line for line in text.splitlines() if line.startswith("| `tome` "))
    assert "(glyphs196-s1 only)" in tome and "±" not in tome
    auto = next(line for line in text.splitlines() if line.startswith("| `auto` ("))
    assert "±" in auto and "only)" not in auto
    assert "2 seeds (glyphs196-s1, glyphs196-s9)" in text


def test_the_auto_line_says_which_auto_ran_when_it_is_not_todays(tables):
    """A table measured before `auto` changed says which members and threshold its `auto` had;
    rows that record today's `auto` are "(recommended)"."""
    from ats_vit.calibrate import AUTO, SWITCH_Z

    today = {"method": "auto", "auto_members": "+".join(AUTO), "switch_z": SWITCH_Z}
    assert tables.auto_label([today, {"method": "tome"}]) == " (recommended)"
    older = {"method": "auto", "auto_members": "tome+ats-fuse", "switch_z": -1.0}
    assert tables.auto_label([older]) == " (as run: `tome` + `ats-fuse`, z = -1)"
    before_1_1 = {"method": "auto"}  # rows from before auto was recorded: 1.0's
    expected = " (recommended)" if ("+".join(AUTO), SWITCH_Z) == tables.AUTO_1_0 else " (as run: `ats-fuse`"
    assert tables.auto_label([before_1_1]).startswith(expected)


def test_the_auto_rule_table_gives_each_recipe_its_mean_and_its_targets(tables):
    """Recipes measured at different targets (glyphs196 at its frontier's three) are named with
    their targets, and each recipe's mean is a column beside the mean over all points."""
    name = "auto_rule.json"
    record = json.loads((ROOT / "benchmarks" / "results" / name).read_text())
    text = tables.auto_rule(name)
    assert "| z = 0 | z = 0.5 | z = 1 | z = 1.645 | z = 2 | z = inf | demo % | gap % | glyphs196 % |" in text
    assert "gap-s101 at 0.4, 0.5, 0.6, 0.7, 0.8, 0.9; glyphs196-s100, glyphs196-s101 at 0.4, 0.6, 0.8" in text
    first = record["summary"][0]
    lists = list(dict.fromkeys(s["members"] for s in record["summary"]))
    assert len(text.splitlines()) == 2 + len(lists) + 2, "one line per member list"
    mine = [
        r["accuracy_pct"]
        for r in record["rows"]
        if (r["members"], r["z"]) == (first["members"], record["pick"]["z"])
        and r["checkpoint"].startswith("glyphs196")
    ]
    assert len(mine) == 6
    cells = text.splitlines()[2].split(" | ")
    means = {s["z"]: s["mean_pct"] for s in record["summary"] if s["members"] == first["members"]}
    assert cells[1:7] == [f"{means[z]:.3f}" for z in sorted(means)], "each z's mean over all points"
    assert cells[9] == f"{sum(mine) / len(mine):.3f}", "glyphs196's column is the mean of its own rows"


def test_the_frontier_figure_pools_each_recipe_and_names_an_older_auto(tables, monkeypatch, tmp_path):
    """One panel per recipe of the multi-seed runs, each pooled over its seeds; an `auto` that
    is not today's (rows from before 1.1 record no members: 1.0's) is drawn under another name
    than today's."""
    import ats_vit.viz

    drawn = {}
    monkeypatch.setattr(ats_vit.viz, "plot_frontier", lambda rows, path: drawn.update(rows=rows, path=path))
    load = tables.load

    def before_1_1(name):  # glyphs196 as if run before 1.1
        run = load(name)
        if "glyphs196" in name:
            keep = {"auto_members", "switch_z"}
            run["rows"] = [{k: v for k, v in r.items() if k not in keep} for r in run["rows"]]
        return run

    monkeypatch.setattr(tables, "load", before_1_1)
    tables.frontier_seeds_figure(tmp_path / "f.png")
    rows = drawn["rows"]
    panels = {r["checkpoint"]: r["seeds"] for r in rows if r["method"] == "dense"}
    assert panels == {"demo, 5 seeds": 5, "gap, 5 seeds": 5, "map, 5 seeds": 5, "glyphs196, 3 seeds": 3}
    autos = {(r["checkpoint"], r["method"]) for r in rows if r["method"].startswith("auto")}
    assert ("glyphs196, 3 seeds", "auto (1.0)") in autos and ("demo, 5 seeds", "auto") in autos
    assert not {r["method"] for r in rows} & set(tables.REMOVED_METHODS)


def test_a_fine_tuned_row_is_named_by_its_method(tables):
    """Rows of the runs before --methods carry no method in their key: the recipe's ats-fuse."""
    assert tables.finetuned("lr 0.0005") == "ats-fuse at lr 0.0005"
    assert tables.finetuned("tome lr 0.001") == "tome at lr 0.001"
    text = tables.finetune_recipe("finetune_methods.json")
    assert "--methods ats-fuse tome" in text and "vs the recipe (ats-fuse at lr 0.0005)" in text
    assert "| tome 0.4, fine-tuned at lr 0.0005 |" in text
