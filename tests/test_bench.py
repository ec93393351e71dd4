import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import NUM_PATCHES, FakeClock, images, small_vit, timed_by_key

from ats_vit.bench import (
    FrontierConfig,
    SpeedConfig,
    TrainSpeedConfig,
    frontier,
    peak_memory,
    speed,
    train_speed,
)
from ats_vit.bench.frontier import pack_hits, pool_seeds, unpack_hits
from ats_vit.budget import Budget
from ats_vit.calibrate import AUTO, SWITCH_Z
from ats_vit.checkpoint import load_model
from ats_vit.cli import main
from ats_vit.data import take
from ats_vit.evaluate import measure
from ats_vit.stats import adjust_bh, binomial_ci95, paired_test
from ats_vit.timing import Timing, speedup, time_round_robin

TINY_SPEED = dict(
    model="vit_tiny_patch16_224",
    img_size=64,
    start_layer=1,
    cap=8,
    batch_sizes=(2,),
    warmup=0,
    repeats=1,
    min_seconds=0.0,
)


def test_peak_memory_counts_the_tensors_a_call_creates():
    before = torch.ones(10_000)  # exists before the call: not counted

    def fn():
        before.view(100, 100).add_(1)  # a view and an in-place op on an old tensor: nothing new
        a = torch.randn(1000, 1000)  # 4 MB
        b = a @ a  # 4 MB more: the peak
        del a
        c = b + before.sum()  # 4 MB after a was freed, + the 4-byte sum alive beside b and c
        return c.view(-1)  # a view: no new storage

    assert peak_memory(fn) == 2 * 4_000_000 + 4


def test_time_round_robin_interleaves_and_keeps_every_round():
    calls = []
    timings = time_round_robin({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3
    assert set(timings) == {"a", "b"} and all(len(t.samples) == 3 for t in timings.values())
    clock = FakeClock()
    timings = time_round_robin({"slow": clock.call(0.01), "fast": clock.call(0.002)}, 0, 2, clock=clock)
    assert timings["slow"].samples == pytest.approx((0.01, 0.01))
    assert speedup(timings["slow"], timings["fast"]).median == pytest.approx(5.0)


def test_shuffled_rounds_vary_the_order_reproducibly_and_time_each_function_as_its_own():
    """With ``shuffle``, no function always follows the same neighbour; the same seed gives the
    same orders, and each function's samples are still its own calls."""

    def orders(seed):
        calls = []
        fns = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
        time_round_robin(fns, 0, 12, shuffle=seed)
        return [tuple(calls[i : i + 4]) for i in range(0, len(calls), 4)]

    rounds = orders(7)
    assert all(sorted(r) == list("abcd") for r in rounds), "every function once per round"
    assert len(set(rounds)) > 1 and rounds == orders(7)
    clock = FakeClock()
    fns = {"slow": clock.call(0.01), "fast": clock.call(0.002)}
    timings = time_round_robin(fns, 1, 4, clock=clock, shuffle=3)
    assert timings["slow"].samples == pytest.approx((0.01,) * 4)
    assert timings["fast"].samples == pytest.approx((0.002,) * 4)


def test_setup_runs_before_each_call_untimed():
    """time_budgets sets one shared model to each budget before its pass: that is not timed."""
    clock, calls = FakeClock(), []

    def setting(name):
        def fn():
            calls.append(name)
            clock.now += 1.0  # a slow setup that must not show in the timing

        return fn

    fns = {"a": clock.call(0.01), "b": clock.call(0.02)}
    timings = time_round_robin(fns, 1, 2, clock=clock, setup={"a": setting("a"), "b": setting("b")})
    assert calls == ["a", "b"] * 3, "before every warm-up and timed call"
    assert timings["a"].samples == pytest.approx((0.01, 0.01))
    assert timings["b"].samples == pytest.approx((0.02, 0.02))


def test_time_budgets_times_the_forward_passes_not_the_configuring(monkeypatch):
    """Each pass takes 1 ms (dense) or 0.5 ms (the budget) on a fake clock and each
    configuring 50 ms: the timings hold the passes alone, in their order."""
    import ats_vit.evaluate as evaluate

    model = small_vit()
    clock = timed_by_key(monkeypatch, evaluate, {"0": 1e-3, "1": 5e-4}.__getitem__)
    set_to = []
    real = evaluate.configure

    def slow_configure(family, budget):
        set_to.append(budget)
        real(family, budget)
        clock.now += 0.05

    monkeypatch.setattr(evaluate, "configure", slow_configure)
    budget = Budget.paper(0.5, 1, depth=4, num_patches=NUM_PATCHES)
    dense, sampled = evaluate.time_budgets(model, [None, budget], images(2), repeats=3)
    assert set_to == [None, budget] * 4, "set before the warm-up and each timed pass"
    assert dense.samples == pytest.approx((1e-3,) * 3) and sampled.samples == pytest.approx((5e-4,) * 3)


def test_short_calls_repeat_until_they_fill_min_seconds_and_the_bar_grows():
    clock = FakeClock()
    bar = SimpleNamespace(n=0, total=2)
    bar.update = lambda n=1: setattr(bar, "n", bar.n + n)
    timings = time_round_robin({"short": clock.call(0.125)}, 0, 2, progress=bar, min_seconds=1.0, clock=clock)
    assert len(timings["short"].samples) == 8, "1 s of 0.125 s calls"
    assert bar.n == bar.total == 8, "the progress bar grows with the extra rounds"


def test_timing_summaries():
    t = Timing((1.0, 2.0, 3.0, 4.0, 100.0))
    assert t.median == 3.0 and t.quartiles() == (2.0, 4.0)
    assert t.spread == pytest.approx(2 / 3) and t.wide
    assert not Timing((1.0, 1.01, 0.99)).wide
    assert t.per_second(10).median == pytest.approx(10 / 3)
    with pytest.raises(ValueError, match="speed-ups pair rounds"):
        speedup(Timing((1.0,)), t)


def test_speed_rows_compare_each_family_to_its_dense_model(monkeypatch):
    """On a fake clock a dense pass takes 4 ms and an ATS one 2 ms (the seed's 3 ms): every
    ratio is then known exactly and names which timing each row was given."""
    pytest.importorskip("timm")
    pytest.importorskip("vit_pytorch")
    import importlib

    bench_speed = importlib.import_module("ats_vit.bench.speed")  # the package's `speed` is a function

    def seconds(key: str) -> float:
        return 4e-3 if key.endswith("/dense") else 3e-3 if key.startswith("seed/") else 2e-3

    timed_by_key(monkeypatch, bench_speed, seconds)
    rows = speed(SpeedConfig(**TINY_SPEED))
    names = [(r["family"], r["variant"]) for r in rows]
    assert names == [
        ("timm", "dense"),
        ("timm", "ATS inverse_transform"),
        ("timm", "ATS gumbel"),
        ("seed", "dense"),
        ("seed", "ATS gumbel (seed)"),
        ("ours", "dense"),
        ("ours", "ATS inverse_transform"),
        ("ours", "ATS gumbel"),
    ]
    dense = {r["family"]: r for r in rows if r["variant"] == "dense"}
    # the same sizes give the same dense cost in all three implementations
    assert dense["timm"]["gflops"] == pytest.approx(dense["ours"]["gflops"]) == dense["seed"]["gflops"]
    for r in rows:
        base = dense[r["family"]]
        assert r["peak_mib"] > 0
        seconds_per_pass = seconds(f"{r['family']}/{r['variant']}")
        assert r["img_per_s"] == pytest.approx(TINY_SPEED["batch_sizes"][0] / seconds_per_pass)
        if r["variant"] == "dense":
            assert r["speedup"] == 1.0 and r["kept"] == 16 and r["ideal"] == 1.0
        else:
            expected = 4e-3 / seconds_per_pass
            for key in ("speedup", "speedup_q1", "speedup_q3"):
                assert r[key] == pytest.approx(expected), key
            assert r["gflops"] < base["gflops"] and 1 <= r["kept"] <= 8 and r["ideal"] > 1
            assert r["efficiency"] == pytest.approx(expected / r["ideal"])
            assert r["vs_seed_ats"] == pytest.approx(3e-3 / seconds_per_pass)


def test_speed_without_the_seed_has_no_seed_ratio():
    pytest.importorskip("timm")
    rows = speed(SpeedConfig(**{**TINY_SPEED, "families": ("ours",), "samplers": ("topk",)}))
    assert [r["variant"] for r in rows] == ["dense", "ATS topk"]
    assert rows[1]["kept"] == 8 and all(math.isnan(r["vs_seed_ats"]) for r in rows)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(samplers=("fast",)), "samplers must be a non-empty subset"),
        (dict(families=()), "families must be a non-empty subset"),
        (dict(batch_sizes=(0,)), "batch_sizes must be positive"),
        (dict(repeats=0), "repeats must be >= 1"),
        (dict(min_seconds=-1.0), "min_seconds must be >= 0"),
        (dict(device="tpu"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
        (dict(device="mps"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_speed_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SpeedConfig(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_speed_on_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        SpeedConfig(device="cuda")


def test_speed_start_layer_must_fit_the_model():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match=r"start_layer must be in \[0, 12\)"):
        speed(SpeedConfig(**{**TINY_SPEED, "start_layer": 12, "families": ("timm",)}))


@pytest.fixture
def tiny_splits(monkeypatch):
    """The tiny checkpoint's data in place of the demo set: calibration and test differ."""
    from helpers import tiny_data

    splits = {"train": tiny_data(96), "calib": tiny_data(64, seed=1), "test": tiny_data(80, seed=2)}
    import importlib

    def load(spec, split, size, **kw):
        return splits[split]

    for name in ("ats_vit.data", "ats_vit.bench.train"):
        monkeypatch.setattr(importlib.import_module(name), "load_split", load)
    return splits


def test_frontier_calibrates_each_method_and_reports_the_test_split(
    tiny_checkpoint, tiny_splits, monkeypatch
):
    """On a fake clock the dense pass takes 6 ms and the i-th budget (i + 1) ms, so each row's
    speed-up says which timing it was given."""
    import ats_vit.evaluate as evaluate

    timed_by_key(monkeypatch, evaluate, lambda key: 6e-3 if key == "0" else 1e-3 * (int(key) + 1))
    cfg = FrontierConfig(
        (str(tiny_checkpoint),),
        data=("tiny",),  # the fixture's data: every image its own item
        methods=("auto", "topk"),
        targets=(0.6, 0.85),
        timing_batch=8,
        timing_repeats=2,
        timing_processes=0,  # in this process, on the fake clock
    )
    rows = frontier(cfg)
    assert rows[0]["method"] == "dense" and rows[0]["gflops_ratio"] == 1.0 and rows[0]["speedup"] == 1.0
    assert rows[0]["test_images"] == rows[0]["test_items"] == 80
    methods = [(r["method"], r["target"]) for r in rows[1:]]
    assert methods == [("auto", 0.6), ("auto", 0.85), ("topk", 0.6), ("topk", 0.85)]
    for r in rows[1:]:
        assert r["gflops_ratio"] == pytest.approx(r["target"], abs=0.08), "held-out cost near the target"
        # 80 independent items: the bootstrap interval is about the binomial one
        assert r["ci95"] == pytest.approx(binomial_ci95(r["accuracy"], 80), abs=0.03)
        assert Budget.from_dict(r["budget"]).method in (*AUTO, "topk")
        # auto's rows record which auto ran (the tables label older ones by it)
        ran = (r["auto_members"], r["switch_z"]) if r["method"] == "auto" else None
        assert ran == (("+".join(AUTO), SWITCH_Z) if r["method"] == "auto" else None)
    for i, r in enumerate(rows[1:], start=1):
        for key in ("speedup", "speedup_low", "speedup_high"):
            assert r[key] == pytest.approx(6 / (i + 1)), (key, r["method"], r["target"])
        assert r["speedup_text"] == f"{6 / (i + 1):.2f}x ({6 / (i + 1):.2f}-{6 / (i + 1):.2f})"
        assert torch.equal(unpack_hits(r["hits"], 80), measured_hits(tiny_checkpoint, r, tiny_splits))
    for r in rows[3:]:  # paired with auto at the same target, on the same images
        auto = next(a for a in rows if a["method"] == "auto" and a["target"] == r["target"])
        assert r["vs_auto_diff"] == pytest.approx(r["accuracy"] - auto["accuracy"])
        assert 0 < r["vs_auto_p"] <= r["vs_auto_p_adj"] <= 1
    tested = [r["vs_auto_p"] for r in rows if not math.isnan(r["vs_auto_p"])]
    assert [r["vs_auto_p_adj"] for r in rows if not math.isnan(r["vs_auto_p"])] == adjust_bh(tested)


def measured_hits(checkpoint, row, splits):
    """Which test images ``row``'s budget gets right, measured again."""
    model, _ = load_model(str(checkpoint))
    model.eval()
    x, y = take(splits["test"])
    budget = None if row["budget"] is None else Budget.from_dict(row["budget"])
    return measure(model, x, budget, batch_size=256)[0] == y


def test_hits_pack_and_unpack_exactly():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 8, 9, 1000):
        hits = torch.rand(n, generator=gen) < 0.5
        assert torch.equal(unpack_hits(pack_hits(hits), n), hits)
    assert len(pack_hits(torch.ones(1000, dtype=torch.bool))) == 168  # 125 bytes in base64
    with pytest.raises(ValueError, match="hits hold 8 images, not 9"):
        unpack_hits(pack_hits(torch.ones(3, dtype=torch.bool)), 9)


def _seed_rows(checkpoint, auto_hits, topk_hits, speedups=(1.5, 1.4, 1.6)):
    """Rows of one checkpoint as `frontier` writes them: dense, auto and topk at 0.5."""
    n = len(auto_hits)
    rows = []
    for method, hits in (
        ("dense", torch.ones(n, dtype=torch.bool)),
        ("auto", auto_hits),
        ("topk", topk_hits),
    ):
        up = 1.0 if method == "dense" else speedups[1]  # the median of the seed's processes
        rows.append(
            dict(
                checkpoint=checkpoint,
                data="tiny",
                method=method,
                target=1.0 if method == "dense" else 0.5,
                gflops_ratio=1.0 if method == "dense" else 0.5,
                accuracy=hits.double().mean().item(),
                ci95=0.01,
                test_images=n,
                hits=pack_hits(hits),
                speedup=up,
                speedup_low=1.0 if method == "dense" else speedups[0],
                speedup_high=1.0 if method == "dense" else speedups[2],
            )
        )
    return rows


def test_pool_seeds_averages_over_seeds_and_tests_over_seeds_times_items():
    """Three seeds of one recipe: the mean and spread over seeds, and the paired test over all
    (seed, item) pairs, which finds a difference no single seed's 40 items can."""
    gen = torch.Generator().manual_seed(0)
    rows, mine, theirs = [], [], []
    for seed, name in enumerate(("glyphs", "glyphs-s1", "glyphs-s2")):
        auto = torch.rand(40, generator=gen) < 0.8
        topk = auto.clone()
        topk[torch.nonzero(auto).flatten()[:4]] = False  # topk loses 4 images on every seed
        rows += _seed_rows(name, auto, topk, speedups=(1.0, 1.3 + 0.1 * seed, 2.0))
        mine.append(topk)
        theirs.append(auto)
    rows += _seed_rows("other", torch.ones(40, dtype=torch.bool), torch.ones(40, dtype=torch.bool))
    pooled = {(r["recipe"], r["method"]): r for r in pool_seeds(rows)}
    topk = pooled["glyphs", "topk"]
    accs = [t.double().mean().item() for t in mine]
    assert topk["seeds"] == 3 and topk["checkpoints"] == ["glyphs", "glyphs-s1", "glyphs-s2"]
    assert topk["accuracy"] == pytest.approx(sum(accs) / 3)
    assert topk["seed_sd"] == pytest.approx(torch.tensor(accs, dtype=torch.float64).std().item())
    diff, p = paired_test(torch.cat(mine), torch.cat(theirs), torch.arange(120))
    assert (topk["vs_auto_diff"], topk["vs_auto_p"]) == (pytest.approx(diff), pytest.approx(p))
    assert diff == pytest.approx(-0.1) and p < 0.05
    assert all(paired_test(m, t, torch.arange(40))[1] > 0.05 for m, t in zip(mine, theirs, strict=True))
    # the median and range of the seeds' medians (a single slow process of a seed does not count)
    assert (topk["speedup"], topk["speedup_low"], topk["speedup_high"]) == pytest.approx((1.4, 1.3, 1.5))
    assert topk["speedup_text"] == "1.40x (1.30-1.50)"
    assert pooled["other", "topk"]["seeds"] == 1 and math.isnan(pooled["other", "topk"]["seed_sd"])
    assert (
        math.isnan(pooled["glyphs", "auto"]["vs_auto_p"]) and pooled["glyphs", "auto"]["vs_recommended"] == ""
    )
    tested = [r for r in pooled.values() if not math.isnan(r["vs_auto_p"])]
    assert [r["vs_auto_p_adj"] for r in tested] == adjust_bh([r["vs_auto_p"] for r in tested])
    assert "▼" in topk["vs_recommended"]
    old = [{k: v for k, v in r.items() if k != "hits"} for r in rows]
    with pytest.raises(ValueError, match="hold no per-image hits"):
        pool_seeds(old)


def test_a_speed_up_whose_range_reaches_one_is_not_faster():
    one = torch.ones(4, dtype=torch.bool)
    rows = _seed_rows("a", one, one, (0.9, 1.2, 1.3)) + _seed_rows("a-s1", one, one, (0.9, 0.98, 1.3))
    assert pool_seeds(rows)[1]["speedup_text"] == "not faster (0.98-1.20)"
    assert pool_seeds(rows)[0]["speedup_text"] == "1.00x (1.00-1.00)", "dense is the reference"


def test_frontier_config_errors(tiny_checkpoint):
    with pytest.raises(ValueError, match="methods must be a non-empty subset"):
        FrontierConfig((str(tiny_checkpoint),), methods=("magic",))
    with pytest.raises(ValueError, match=r"targets must be GFLOP fractions in \(0, 1\]"):
        FrontierConfig((str(tiny_checkpoint),), targets=(1.5,))
    with pytest.raises(ValueError, match="at least one checkpoint"):
        FrontierConfig(())


def test_binomial_interval():
    assert binomial_ci95(0.5, 100) == pytest.approx(0.098, abs=1e-3)
    assert binomial_ci95(1.0, 100) < 1e-4
    with pytest.raises(ValueError, match="n must be >= 1"):
        binomial_ci95(0.5, 0)


def test_cli_bench_frontier_writes_table_json_and_plot(tiny_checkpoint, tiny_splits, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    argv = ["bench", "frontier", str(tiny_checkpoint), "--data", "tiny", "--methods", "paper", "random"]
    argv += ["--targets", "0.7", "--timing-repeats", "1", "--timing-batch", "8", "--timing-processes", "2"]
    argv += ["--json", str(tmp_path / "frontier.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "paper" in out and "random" in out and "±" in out and "pooled" not in out
    record = json.loads((tmp_path / "frontier.json").read_text())
    assert record["config"]["targets"] == [0.7] and record["config"]["timing_processes"] == 2
    assert len(record["rows"]) == 3
    for row in record["rows"]:  # each timed in two fresh processes: their medians and range
        assert len(row["speedup_runs"]) == 2 and all(x > 0 for x in row["speedup_runs"])
        assert row["speedup_low"] == min(row["speedup_runs"]) and row["speedup_high"] == max(
            row["speedup_runs"]
        )
    assert record["rows"][0]["speedup_runs"] == [1.0, 1.0]
    assert (tmp_path / "frontier.png").stat().st_size > 0


def test_cli_bench_frontier_pools_the_seeds_of_a_recipe(tiny_checkpoint, tiny_splits, tmp_path, capsys):
    """Two checkpoints named NAME and NAME-s1: one pooled row per method and target."""
    seeded = tmp_path / f"{tiny_checkpoint.parent.name}-s1"
    shutil.copytree(tiny_checkpoint.parent, seeded)
    checkpoints = [str(tiny_checkpoint), str(seeded / tiny_checkpoint.name)]
    argv = ["bench", "frontier", *checkpoints, "--data", "tiny", "--methods", "auto", "topk"]
    argv += ["--targets", "0.6", "--timing-repeats", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "seeds of one recipe (NAME, NAME-s1, ...) pooled:" in out and "± seeds" in out


def test_cli_bench_speed_prints_the_table_and_reports_bad_values(tmp_path, capsys):
    pytest.importorskip("timm")
    command = "bench speed --model vit_tiny_patch16_224 --img-size 64 --start-layer 1 --cap 8 "
    command += "--batch-sizes 1 --min-seconds 0 --families ours"
    argv = command.split()
    assert main([*argv, "--json", str(tmp_path / "speed.json")]) == 0
    assert "efficiency" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "speed.json").read_text())["rows"]) == 3
    assert main([*argv[:-2], "--start-layer", "40"]) == 2
    assert "start_layer must be in [0, 12)" in capsys.readouterr().err


def test_train_speed_times_dense_and_each_budget_in_one_run(
    tiny_checkpoint, tiny_splits, tmp_path, monkeypatch
):
    """A dense step takes 10 ms on a fake clock and a budgeted one 8 ms: 1.25x, and 100 and
    125 steps per second."""
    import importlib

    bench_train = importlib.import_module("ats_vit.bench.train")

    timed_by_key(monkeypatch, bench_train, {"dense": 10e-3, "fuse": 8e-3}.__getitem__)
    budget = Budget(1, (8, 4), dropped="fuse").save(tmp_path / "fuse.json")
    cfg = TrainSpeedConfig(str(tiny_checkpoint), (str(budget),), batch_size=16, warmup=1, repeats=2)
    cfg.min_seconds = 0.0
    rows = train_speed(cfg)
    assert [r["variant"] for r in rows] == ["dense", "fuse"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["gflops_ratio"] == 1.0
    assert rows[0]["steps_per_s"] == pytest.approx(100.0) and rows[1]["steps_per_s"] == pytest.approx(125.0)
    assert rows[1]["speedup"] == pytest.approx(1.25) and rows[1]["efficiency"] == pytest.approx(
        1.25 / rows[1]["ideal"]
    )
    assert 0 < rows[1]["gflops_ratio"] < 1 and rows[1]["ideal"] > 1
    with pytest.raises(ValueError, match="at least one budget file"):
        TrainSpeedConfig(str(tiny_checkpoint), ())


def test_train_speed_gives_budgets_with_the_same_stem_their_own_rows(tiny_checkpoint, tiny_splits, tmp_path):
    """Two budget files named alike in different folders got one row (the second overwrote the
    first): each now keeps its row, named by its path."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Budget(1, (8, 4), dropped="fuse").save(tmp_path / "a" / "b.json")
    second = Budget(1, (4, 2), dropped="fuse").save(tmp_path / "b" / "b.json")
    paths = (str(first), str(second))
    cfg = TrainSpeedConfig(str(tiny_checkpoint), paths, batch_size=16, warmup=1, repeats=1)
    cfg.min_seconds = 0.0
    rows = train_speed(cfg)
    assert [r["variant"] for r in rows] == ["dense", str(first), str(second)]
    assert rows[1]["gflops_ratio"] > rows[2]["gflops_ratio"]
    with pytest.raises(ValueError, match="more than once"):
        train_speed(TrainSpeedConfig(str(tiny_checkpoint), (str(first), str(first))))


def test_benchmarks_leave_the_thread_count_alone_unless_it_changes(monkeypatch):
    """Setting torch's thread count, even to the count in use, slows its fused CPU attention;
    so speed() sets it only when asked for another count."""
    pytest.importorskip("timm")
    from ats_vit.bench.common import use_threads

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    use_threads(torch.get_num_threads())
    speed(SpeedConfig(**{**TINY_SPEED, "families": ("ours",)}))
    assert calls == []
    use_threads(torch.get_num_threads() + 1)
    assert calls == [torch.get_num_threads() + 1]


def test_a_failing_timing_process_is_a_clear_error(tiny_checkpoint, monkeypatch):
    import importlib
    import subprocess

    frontier_module = importlib.import_module("ats_vit.bench.frontier")  # the module, not the function

    def failed(command, **kwargs):
        assert command[1:3] == ["-m", "ats_vit.bench._timer"]
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="Traceback ...\nMemoryError: boom")

    monkeypatch.setattr(frontier_module.subprocess, "run", failed)
    with pytest.raises(RuntimeError, match=r"timing process 0 failed:\n(.|\n)*MemoryError: boom"):
        frontier_module.time_in_processes(str(tiny_checkpoint), [None], torch.zeros(2, 3, 32, 32), 1, 2)
