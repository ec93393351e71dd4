"""The latency model: interpolation, monotonicity, caching, and latency budgets end to end.
Timings are never asserted: the tests check what the model computes from what it measured."""

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import fixed_latency, images, small_vit

import ats_vit.latency as latency
from ats_vit import family_of
from ats_vit.budget import Budget, BudgetError
from ats_vit.calibrate import VERIFY_TOLERANCE, Calibration
from ats_vit.calibrate.verify import next_aim
from ats_vit.latency import LatencyModel
from ats_vit.options import Rule, SamplingOptions


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    # a quiet machine, whatever else runs beside the tests: tables are reused unless a test says
    monkeypatch.setattr(latency.os, "getloadavg", lambda: (0.5, 0.5, 0.5), raising=False)
    return tmp_path / "cache"


def quick(model, batch=4, **kw):
    return LatencyModel(family_of(model), batch, repeats=1, min_seconds=0.0, progress=False, **kw)


def test_a_table_is_built_once_and_read_back():
    model = small_vit(peaked=6.0).eval()
    first = quick(model)
    assert first.path.is_file() and first.table.fit and set(first.table.rules) >= {"score", "fuse", "tome"}
    assert first.table.widths[0] == 2 and first.table.widths[-1] == 17  # one candidate .. all, + CLS

    def no_timing(*_args, **_kwargs):
        raise AssertionError("a cached table is not timed again")

    original = LatencyModel._time
    LatencyModel._time = no_timing
    try:
        again = quick(model)
    finally:
        LatencyModel._time = original
    assert json.dumps(again.table.to_dict()) == json.dumps(first.table.to_dict())
    other = quick(model, batch=8)  # another batch size is another table
    assert other.path != first.path


@pytest.mark.parametrize(
    "field, value", [("device", "another CPU"), ("code", "0" * 16)], ids=["machine", "code"]
)
def test_a_table_of_another_machine_or_older_code_is_not_used(cache, field, value):
    model = small_vit().eval()
    table = quick(model)
    raw = json.loads(table.path.read_text())
    assert raw["key"][field] != value
    raw["key"][field] = value
    table.path.write_text(json.dumps(raw))
    calls = []
    original = LatencyModel._build_dense

    def counting(self, points):
        calls.append(points)
        return original(self, points)

    LatencyModel._build_dense = counting
    try:
        quick(model)
    finally:
        LatencyModel._build_dense = original
    assert calls, "a key that does not match is measured afresh"


def test_the_code_key_is_a_hash_of_the_timed_sources(tmp_path):
    """Any change to the code a table times gives another key (so the table is timed afresh);
    code it does not time (the CLI, say) changes nothing."""
    import shutil

    root = tmp_path / "ats_vit"
    shutil.copytree(Path(latency.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__"))
    before = latency.code_digest(root)
    assert before == latency.code_digest(Path(latency.__file__).parent)
    (root / "cli.py").write_text((root / "cli.py").read_text() + "\n# a comment\n")
    assert latency.code_digest(root) == before
    for name in ("sampling.py", "families/timm.py"):
        edited = root / name
        original = edited.read_text()
        edited.write_text(original + "\n# a comment\n")
        assert latency.code_digest(root) != before, name
        edited.write_text(original)


def fixed_table(model, batch=4):
    """:func:`helpers.fixed_latency` on a quickly built table of ``model``."""
    return fixed_latency(quick(model, batch))


def test_predictions_interpolate_the_table_and_grow_with_tokens():
    model = small_vit().eval()
    lat = fixed_table(model)
    assert lat.dense_seconds() == pytest.approx(5e-3 + 4 * 17e-3)
    # a dense block on 10 tokens (between grid points) costs 10 ms; a sampling block 17 -> 9: 10 ms
    assert lat.layer_seconds(None, 10.0, 10.0) == pytest.approx(10e-3)
    assert lat.layer_seconds(Rule.SCORE, 17.0, 9.0) == pytest.approx(10e-3)
    previous = 0.0
    for kept in range(1, 17):
        counts = torch.full((4, 4), float(kept))
        counts[:, 0] = 16
        seconds = lat.seconds(counts, [None, Rule.SCORE, None, None])
        assert seconds > previous, "more tokens never cost less"
        previous = seconds


def test_a_padded_batch_runs_at_its_mean_count_when_packed():
    model = small_vit().eval()
    lat = fixed_table(model)
    even = torch.tensor([[16.0, 8, 8, 8]] * 4)
    uneven = torch.tensor([[16.0, 4, 4, 4], [16.0, 12, 12, 12]] * 2)  # the same mean, padded to 12
    assert lat.seconds(uneven, [None, Rule.SCORE, None, None]) == pytest.approx(
        lat.seconds(even, [None, Rule.SCORE, None, None])
    )


def test_latency_budgets_round_trip_and_are_checked_like_any(tmp_path):
    model = small_vit(peaked=6.0).eval()
    x = images(32, 1)
    search = Calibration(
        model, x, cost="latency", latency=fixed_table(model, batch=8), progress=False, verify=False
    )
    budget = search(0.8)
    cal = budget.calibration
    assert budget.cost == "latency" and cal["cost"] == "latency"
    assert cal["timing_batch"] == 8 and cal["device"] and cal["latency_ratio"] == pytest.approx(0.8, abs=0.05)
    assert Budget.load(budget.save(tmp_path / "b.json")) == budget
    made_for_three = Budget(0, budget.schedule(4, 16)[:3], depth=3, num_patches=16, cost="latency")
    with pytest.raises(BudgetError, match=r"made for a model with depth=3; ats_vit\.ViT has depth=4"):
        made_for_three.apply(model)
    with pytest.raises(BudgetError, match=r"target must be in \(0\.\d+, 1\]: the predicted time at batch 8"):
        search(0.05)


def test_a_latency_budget_that_misses_its_timing_is_searched_again(monkeypatch):
    model = small_vit(peaked=6.0).eval()
    search = Calibration(
        model, images(32, 1), cost="latency", latency=fixed_table(model, batch=8), progress=False
    )
    # the machine runs every budget 20% slower than predicted: the search must aim lower
    monkeypatch.setattr(
        Calibration, "measured_ratio", lambda self, budget: 1.2 * self.trials_by_budget(budget)
    )
    monkeypatch.setattr(
        Calibration,
        "trials_by_budget",
        lambda self, budget: next(t.cost for t in self.trials.values() if t.budget == budget),
        raising=False,
    )
    budget = search(0.8)
    aims = [t["aim"] for t in search.timings]
    assert aims[0] == 0.8 and len(aims) > 1 and aims[1] < aims[0]
    assert budget.calibration["measured_latency_ratio"] == pytest.approx(0.8, rel=0.1)


@pytest.mark.parametrize(
    "options, rule",
    [
        (SamplingOptions(), Rule.SCORE),
        (SamplingOptions("gumbel"), Rule.SCORE),
        (SamplingOptions("topk"), Rule.FIXED),
        (SamplingOptions("random"), Rule.FIXED),
        (SamplingOptions("official"), Rule.OFFICIAL),
        (SamplingOptions(dropped="fuse"), Rule.FUSE),
        (SamplingOptions("topk", dropped="fuse"), Rule.FUSE),
        (SamplingOptions("tome"), Rule.TOME),
        (SamplingOptions("pitome"), Rule.PITOME),
        (SamplingOptions("dct"), Rule.DCT),
    ],
)
def test_the_trace_records_what_each_layer_ran_and_the_prediction_takes_its_cells(options, rule):
    """One rule per sampling layer, shared by the FLOP count and the latency table: the trace
    records it, and halving that rule's cells (only) lowers the predicted time."""
    model = small_vit(peaked=6.0).eval()
    family = family_of(model)
    family.set_schedule((16, 8, 8, 8), options)
    with torch.inference_mode():
        trace = family.run(images(4, 1))[1].trace
    sampled = [r for r in trace.rules if r]
    assert sampled and set(sampled) == {rule} and trace.rules[0] is None
    lat = fixed_table(model)
    counts = trace.kept_per_layer()
    before = lat.seconds(counts, trace.rules)
    for other in Rule:
        if other is not rule:
            lat.table.rules[other.value] = [[c / 2 for c in row] for row in lat._grid(other)]
    assert lat.seconds(counts, trace.rules) == pytest.approx(before), "other rules' cells are not used"
    lat.table.rules[rule.value] = [[c / 2 for c in row] for row in lat._grid(rule)]
    assert lat.seconds(counts, trace.rules) < before


def test_a_search_that_timed_both_sides_of_its_target_aims_between_them(monkeypatch):
    """Timed ratio = 2 x predicted - 0.6 (steeper than the prediction): scaling the last aim by
    its error lands 10% off twice (0.8, then 0.625); interpolating between the two sides lands
    on 0.7."""
    model = small_vit(peaked=6.0).eval()
    search = Calibration(
        model, images(32, 1), cost="latency", latency=fixed_table(model, batch=8), progress=False
    )

    def timed(self, budget):
        predicted = next(t.cost for t in self.trials.values() if t.budget == budget)
        return 2 * predicted - 0.6

    monkeypatch.setattr(Calibration, "measured_ratio", timed)
    budget = search(0.7)
    assert len(search.timings) == 3
    first, second = (t["measured"] for t in search.timings[:2])
    assert (first - 0.7) * (second - 0.7) < 0, "the first two timings bracket the target"
    assert budget.calibration["measured_latency_ratio"] == pytest.approx(0.7, rel=VERIFY_TOLERANCE)
    assert next_aim([(0.7, 0.8), (0.6, 0.6)], 0.7) == pytest.approx(0.65)
    assert next_aim([(0.7, 0.8)], 0.7) == pytest.approx(0.7 * 0.7 / 0.8)


def test_aims_narrow_their_bracket_when_timings_are_out_of_order():
    """A demo search at 0.8 timed aim 0.8 at 1.024, 0.625 at 0.652 and 0.695 at 0.631 (the
    last landed on another kind of budget): bracketing by the best timing below aimed at 0.695
    again and again; bracketing by the highest aim below moves on."""
    aims = [(0.8, 1.024), (0.625, 0.652), (0.695, 0.631)]
    aim = next_aim(aims, 0.8)
    assert 0.695 < aim < 0.8
    assert aim == pytest.approx(0.695 + (0.8 - 0.631) * (0.8 - 0.695) / (1.024 - 0.631))
    # the lowest aim above lies below the highest aim below: halve the bracket
    assert next_aim([(0.6, 0.65), (0.7, 0.55)], 0.6) == pytest.approx(0.65)


def test_a_latency_pick_is_timed_once(monkeypatch):
    """When a re-aim chooses a budget that was timed already, the search stops: a second
    timing of it would measure the machine's noise, not the budget."""
    model = small_vit(peaked=6.0).eval()
    search = Calibration(
        model, images(32, 1), cost="latency", latency=fixed_table(model, batch=8), progress=False
    )
    monkeypatch.setattr(Calibration, "measured_ratio", lambda self, budget: 0.9)
    choose, first = Calibration.choose, {}

    def always_the_first(self, methods, target):
        return first.setdefault("pick", choose(self, methods, target))

    monkeypatch.setattr(Calibration, "choose", always_the_first)
    budget = search(0.7)
    assert len(search.timings) == 1
    assert budget.calibration["measured_latency_ratio"] == 0.9


def test_a_timed_search_picks_the_fastest_predicted_of_the_equally_accurate():
    """With a latency model, of the budgets near the target within one calibration image of
    the most accurate, the search keeps the fastest predicted one."""
    model = small_vit(peaked=6.0).eval()
    x = images(32, 1)
    timed = Calibration(model, x, latency=fixed_table(model, batch=8), progress=False)
    chosen = timed(0.7)
    near = [
        t for t in timed.trials.values() if abs(t.cost - 0.7) <= timed.search.window(0.7) and not t.estimated
    ]
    best = max(t.score for t in near)
    equal = [t for t in near if t.score >= best - 1 / len(x) - 1e-9]
    assert len(equal) > 1, "the test needs several equally accurate budgets"
    assert chosen.calibration["latency_ratio"] == min(t.seconds for t in equal)


def test_rule_cells_time_a_block_that_selects_even_when_the_model_is_dense(monkeypatch):
    """A rule's cells are timed on the model's middle block with its sampling module set to each
    cell's cap. A dense model (or a budget that leaves that block whole) marks the block's
    module as keeping everything; the cells must still select, or they time a dense block."""
    model = small_vit(peaked=6.0).eval()
    family = family_of(model)
    family.set_schedule(None, SamplingOptions())  # dense: every layer keeps all
    lat = quick(model)
    widths = []
    original = type(family).run_block

    def spy(self, block, x, **kw):
        out = original(self, block, x, **kw)
        widths.append((x.shape[1], out.shape[1]))
        return out

    monkeypatch.setattr(type(family), "run_block", spy)
    grid = lat._build_rule(Rule.SCORE)
    assert widths and all(n_out < n_in for n_in, n_out in widths), "every cell selects"
    assert all(ats.keeps_all for ats in family.sampling_layers()), "the model is left dense"
    assert not any(math.isnan(grid[i][j]) for i in range(len(grid)) for j in range(i))


def test_a_busy_moment_in_one_cell_never_makes_fewer_tokens_cost_more(monkeypatch):
    """Cells are medians on a shared machine; one that a busy stretch inflated above a wider
    one is lowered to it, so predictions never fall when tokens grow (dense rows and contexts,
    a rule's output counts and its input counts; a rule's diagonal, its dense cell, stays)."""
    model = small_vit().eval()
    lat = quick(model)
    widths = lat.table.widths

    def spiky(self, calls, _configure):
        def seconds(key):
            if key == "stem":
                return 1e-3
            if key == "model":
                return 1e-3 + self.family.depth * widths[-1] * 1e-4  # in place as alone: scale 1
            width = key[1] if isinstance(key, tuple) and isinstance(key[0], str) else key
            if isinstance(key, tuple) and isinstance(key[0], int):  # a rule's cell (in, out)
                return (widths[key[0]] + widths[key[1]]) * 1e-4 * (10 if key == (len(widths) - 1, 1) else 1)
            return width * 1e-4 * (10 if width == widths[1] else 1)

        return {key: seconds(key) for key in calls}

    monkeypatch.setattr(LatencyModel, "_time", spiky)
    table = lat._build_dense(len(widths))
    for row in (table.dense, *table.dense_in.values()):
        assert row == sorted(row) and row[1] == row[2]
    grid = lat._build_rule(Rule.SCORE)
    last = len(widths) - 1
    assert grid[last][1] == grid[last][2] == pytest.approx((widths[last] + widths[2]) * 1e-4)
    for i in range(len(widths)):
        cells = [grid[i][j] for j in range(i)]
        assert cells == sorted(cells)
    for j in range(len(widths)):
        column = [grid[i][j] for i in range(j + 1, len(widths))]
        assert column == sorted(column)


def test_two_processes_building_one_table_build_it_once(tmp_path):
    """Every process wrote the same `<digest>.tmp`, so two writers crashed each other and readers
    saw half a file: now one builds under a lock and the other reads what it built."""
    import subprocess
    import sys

    script = tmp_path / "build.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from helpers import small_vit\n"
        "from ats_vit import family_of\n"
        "import ats_vit.latency\n"
        "from ats_vit.latency import LatencyModel\n"
        "ats_vit.latency.BUSY_LOAD = float('inf')  # the lock is tested, not the load: a busy\n"
        "# machine would make the reader time afresh, whatever the lock did\n"
        "built = []\n"
        "real = LatencyModel._build_dense\n"
        "LatencyModel._build_dense = lambda self, points: built.append(1) or real(self, points)\n"
        "LatencyModel(family_of(small_vit().eval()), 4, repeats=1, min_seconds=0.02, progress=False)\n"
        "print('built' if built else 'read')\n"
    )
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err for _, err in outputs]
    assert sorted(out.strip() for out, _ in outputs) == ["built", "read"]
    assert not list((tmp_path / "cache" / "latency").glob("*.tmp")), "no temporary file is left behind"


@pytest.mark.parametrize("content", ['{"junk": 1}', '{"format": "ats-vit-latency/1", "dense": []}', "{half"])
def test_a_broken_cache_file_is_named_moved_aside_and_rebuilt(content, capsys):
    model = small_vit().eval()
    first = quick(model)
    first.path.write_text(content)
    again = quick(model)
    err = capsys.readouterr().err
    assert f"latency cache: {first.path}" in err and "moved to" in err and "timing afresh" in err
    assert again.table.widths == first.table.widths and list(first.path.parent.glob("*.bad-*.json"))


def test_a_table_timed_on_a_busy_machine_is_not_reused(monkeypatch, capsys):
    model = small_vit().eval()
    with monkeypatch.context() as m:
        m.setattr(latency.os, "getloadavg", lambda: (8.0, 8.0, 8.0), raising=False)  # 4 per CPU on 2 CPUs
        m.setattr(latency.os, "cpu_count", lambda: 2)
        busy = quick(model)
    assert busy.table.disturbed and max(busy.table.load) == 4.0
    built = []
    real = LatencyModel._build_dense
    monkeypatch.setattr(
        LatencyModel, "_build_dense", lambda self, points: built.append(1) or real(self, points)
    )
    quick(model)
    assert built, "timed afresh"
    assert "was timed while the machine was busy (load 4.0 per CPU); timing afresh" in capsys.readouterr().err
    quick(model)
    assert len(built) == 1, "the quiet table is reused"
