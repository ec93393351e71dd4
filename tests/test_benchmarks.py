"""Every script in benchmarks/ runs on tiny sizes (a smoke test: no timing is asserted)."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent.parent / "benchmarks"
TINY_TIMM = ["--model", "vit_tiny_patch16_224"]


def run_script(name: str, *argv: str, monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", [name, *argv])
    try:
        runpy.run_path(str(SCRIPTS / name), run_name="__main__")
    except SystemExit as exit:
        return int(exit.code or 0)
    return 0


@pytest.fixture
def tiny_splits(monkeypatch):
    """The tiny checkpoint's data in place of the demo set."""
    import importlib

    from helpers import tiny_data

    splits = {"train": tiny_data(96), "calib": tiny_data(64, seed=1), "test": tiny_data(80, seed=2)}
    for name in ("ats_vit.data", "ats_vit.bench.frontier", "ats_vit.bench.train"):
        monkeypatch.setattr(
            importlib.import_module(name), "load_split", lambda spec, split, *a, **k: splits[split]
        )
    return splits


def test_every_script_has_a_smoke_test():
    tested = {"speed.py", "summarize.py", "frontier.py", "frontier_checkpoints.py", "gpu_check.py"}
    tested |= {"profile_sampling.py", "block_rows.py", "calibration_speed.py", "switch_rule.py"}
    tested |= {"fast_paths.py", "held_caps.py"}
    tested |= {"selection_cost.py", "latency_model.py", "latency_search.py"}
    assert {p.name for p in SCRIPTS.glob("*.py")} == tested


def test_speed_and_summarize(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    argv = [*TINY_TIMM, "--img-size", "32", "--start-layer", "1", "--max-tokens", "8", "--batch-sizes", "1"]
    argv += ["--repeats", "1", "--warmup", "0", "--min-seconds", "0", "--families", "ours", "timm"]
    for run in ("a", "b"):
        assert (
            run_script("speed.py", *argv, "--json", str(tmp_path / f"{run}.json"), monkeypatch=monkeypatch)
            == 0
        )
    assert (
        run_script(
            "summarize.py", str(tmp_path / "a.json"), str(tmp_path / "b.json"), monkeypatch=monkeypatch
        )
        == 0
    )
    assert "| 1 | ours | ATS inverse_transform |" in capsys.readouterr().out


def test_frontier(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits):
    pytest.importorskip("matplotlib")
    argv = [
        str(tiny_checkpoint),
        "--methods",
        "paper",
        "--targets",
        "0.7",
        "--data",
        "tiny",  # the fixture's data in place of the demo's: every image its own item
        "--json",
        str(tmp_path / "f.json"),
    ]
    assert run_script("frontier.py", *argv, "--plot", str(tmp_path / "f.png"), monkeypatch=monkeypatch) == 0
    assert len(json.loads((tmp_path / "f.json").read_text())["rows"]) == 2


def test_frontier_checkpoints(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    argv = [str(tmp_path), "--only", "p6", "--epochs", "1", "--train-images", "64"]
    assert run_script("frontier_checkpoints.py", *argv, monkeypatch=monkeypatch) == 0
    assert (tmp_path / "p6" / "final.safetensors").exists()


def test_gpu_check_on_the_cpu(monkeypatch, capsys):
    pytest.importorskip("timm")
    assert run_script("gpu_check.py", "--small", "--device", "cpu", monkeypatch=monkeypatch) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_profile_sampling(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    argv = [*TINY_TIMM, "--img-size", "64", "--batch-size", "2", "--repeats", "1", "--max-tokens", "6"]
    assert run_script("profile_sampling.py", *argv, "--start-layer", "1", monkeypatch=monkeypatch) == 0
    assert "packing A/B" in capsys.readouterr().out


def test_block_rows(monkeypatch, capsys):
    pytest.importorskip("timm")
    argv = [*TINY_TIMM, "--tokens", "17", "9", "--batch-sizes", "1", "--repeats", "1", "--min-seconds", "0"]
    assert run_script("block_rows.py", *argv, monkeypatch=monkeypatch) == 0
    assert "efficiency" in capsys.readouterr().out


def test_fast_paths(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Each path gives the same logits on and off (checked inside the script) and a speed-up
    per run for dense and each budget; the module's setting is restored; ToMe's plan refuses a
    budget of another rule."""
    import ats_vit.attention as attention
    import ats_vit.sampling as sampling
    from ats_vit.budget import Budget
    from ats_vit.checkpoint import load_model
    from ats_vit.families import family_of

    family = family_of(load_model(tiny_checkpoint)[0])
    tome = Budget.tome(2, depth=family.depth, num_patches=family.num_patches).save(tmp_path / "t.json")
    paper = Budget(1, (6, 3)).save(tmp_path / "paper.json")
    for path, budgets in (("tome-plan", [tome]), ("matmul-attention", [tome, paper])):
        out = tmp_path / f"{path}.json"
        argv = [str(tiny_checkpoint), "--path", path, "--budget", *map(str, budgets), "--batch-size", "8"]
        argv += ["--runs", "2", "--repeats", "1", "--min-seconds", "0", "--json", str(out)]
        assert run_script("fast_paths.py", *argv, monkeypatch=monkeypatch) == 0
        rows = json.loads(out.read_text())["rows"]
        assert [row["budget"] for row in rows] == ["dense", *(b.stem for b in budgets)]
        for row in rows:
            assert len(row["on_runs"]) == len(row["off_runs"]) == 2 and row["gain"] > 0
    assert sampling.TOME_FAST_PATH is True and attention.CPU_MATMUL_MAX_KEYS == 32
    argv = [str(tiny_checkpoint), "--path", "tome-plan", "--budget", str(paper), "--runs", "1"]
    assert run_script("fast_paths.py", *argv, monkeypatch=monkeypatch) == 2
    assert "--path tome-plan times ToMe budgets" in capsys.readouterr().err


def test_calibration_speed(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    from helpers import tiny_data

    import ats_vit.data

    monkeypatch.setattr(ats_vit.data, "load_split", lambda *a, **k: tiny_data(64, seed=1))
    argv = [str(tiny_checkpoint), "--targets", "0.7", "--runs", "1", "--json", str(tmp_path / "c.json")]
    assert run_script("calibration_speed.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["probe"] for r in rows] == ["True", "False"] and rows[0]["same"] == "True"


def test_switch_rule(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    out = tmp_path / "s.json"
    argv = [str(tiny_checkpoint), "--data", "tiny", "--calib-images", "48", "--zs", "0", "inf"]
    assert run_script("switch_rule.py", *argv, "--json", str(out), monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    summary = {r["z"]: r for r in rows if r.get("summary")}
    points = [r for r in rows if not r.get("summary")]
    assert set(summary) == {0.0, float("inf")} and len(points) == 2 * summary[0.0]["points"] > 0
    assert summary[float("inf")]["switches"] == 0, "z = inf never leaves the first member"
    for r in points:
        assert r["calib_pct"][r["chosen"]] == max(r["calib_pct"].values()) or r["z"] != 0.0
    assert "left the first" in capsys.readouterr().out


def test_selection_cost(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Replayed selections give the live logits (checked inside the script) for a fusing and
    a discarding budget; the rows relate speed-up, ideal and efficiency."""
    from ats_vit.budget import Budget

    fuse = Budget(1, (8, 4), dropped="fuse").save(tmp_path / "fuse.json")
    keep = Budget(1, (6, 3)).save(tmp_path / "discard.json")
    out = tmp_path / "cost.json"
    argv = [str(tiny_checkpoint), "--budget", str(fuse), str(keep), "--batch-size", "16", "--repeats", "1"]
    argv += ["--min-seconds", "0", "--json", str(out)]
    assert run_script("selection_cost.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == ["fuse", "discard"]
    for r in rows:
        assert 0 < r["gflops_ratio"] < 1 and r["ideal"] == pytest.approx(1 / r["gflops_ratio"])
        assert r["efficiency"] == pytest.approx(r["speedup"] / r["ideal"])
        assert r["replayed_efficiency"] == pytest.approx(r["replayed"] / r["ideal"])
    assert "replayed speed-up" in capsys.readouterr().out


def test_latency_model(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Predicted and measured ratios side by side, from budget files or a frontier JSON; the
    error is the prediction against the median of the runs."""
    from ats_vit.budget import Budget

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    fuse = Budget(1, (8, 4), dropped="fuse").save(tmp_path / "fuse.json")
    keep = Budget(1, (6, 3), sampler="topk").save(tmp_path / "topk.json")
    out = tmp_path / "lat.json"
    argv = [str(tiny_checkpoint), "--budget", str(fuse), str(keep), "--batch-size", "16", "--runs", "2"]
    argv += ["--repeats", "1", "--json", str(out)]
    assert run_script("latency_model.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == ["fuse", "topk"]
    for r in rows:
        assert len(r["measured_runs"]) == 2 and r["measured"] == pytest.approx(
            sorted(r["measured_runs"])[0] / 2 + sorted(r["measured_runs"])[1] / 2
        )
        assert r["error_pct"] == pytest.approx(100 * (r["predicted"] / r["measured"] - 1))
    assert "absolute error of the prediction" in capsys.readouterr().out
    frontier = tmp_path / "frontier.json"
    frontier.write_text(
        json.dumps(
            {
                "rows": [
                    {
                        "checkpoint": "tiny",
                        "method": "paper",
                        "target": 0.5,
                        "budget": Budget(1, (6, 3)).to_dict(),
                    },
                    {"checkpoint": "tiny", "method": "dense", "target": 1.0, "budget": None},
                ]
            }
        )
    )
    argv = [str(tiny_checkpoint), "--frontier", str(frontier), "--checkpoint-name", "tiny", "--runs", "1"]
    assert run_script("latency_model.py", *argv, "--repeats", "1", monkeypatch=monkeypatch) == 0
    assert "paper@0.5" in capsys.readouterr().out
    assert (
        run_script("latency_model.py", *argv[:3], "--checkpoint-name", "other", monkeypatch=monkeypatch) == 2
    )
    assert "must be one of ['tiny']" in capsys.readouterr().err


def test_selection_cost_replays_what_the_first_pass_chose(tiny_checkpoint, tiny_splits):
    """The replayed model runs no sampling code: its layers return the recorded selections."""
    import runpy

    from ats_vit.budget import Budget
    from ats_vit.checkpoint import load_model
    from ats_vit.sampling import AdaptiveTokenSampling

    replaying = runpy.run_path(str(SCRIPTS / "selection_cost.py"))["replaying"]
    model = Budget(1, (8, 4), dropped="fuse").apply(load_model(tiny_checkpoint)[0].eval())
    x = tiny_splits["test"].tensors[0][:8]
    replay = replaying(model, x)
    calls = []
    original = AdaptiveTokenSampling.forward
    AdaptiveTokenSampling.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        with torch.inference_mode():
            torch.testing.assert_close(replay(x), model(x))
    finally:
        AdaptiveTokenSampling.forward = original
    replayed = [m for m in replay.modules() if isinstance(m, AdaptiveTokenSampling) and "forward" in vars(m)]
    assert replayed and len(calls) == len(replayed), "only the live model runs its sampling layers"


@pytest.mark.parametrize(
    "script, argv",
    [
        ("block_rows.py", []),
        ("fast_paths.py", ["no-such-checkpoint.safetensors", "--budget", "b.json"]),
        ("selection_cost.py", ["no-such-checkpoint.safetensors", "--budget", "b.json"]),
        ("latency_model.py", ["no-such-checkpoint.safetensors", "--budget", "b.json"]),
        ("profile_sampling.py", []),
        ("calibration_speed.py", ["no-such-checkpoint.safetensors"]),
        ("switch_rule.py", ["no-such-checkpoint.safetensors"]),
    ],
)
def test_scripts_refuse_to_write_over_an_existing_json(tmp_path, monkeypatch, capsys, script, argv):
    """Refused at parse time, before any work (the checkpoints named do not even exist)."""
    existing = tmp_path / "run.json"
    existing.write_text("an earlier run")
    assert run_script(script, *argv, "--json", str(existing), monkeypatch=monkeypatch) == 2
    assert existing.read_text() == "an earlier run"
    assert "already exists: pass --overwrite" in capsys.readouterr().err


def test_latency_search(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Fresh latency searches per number of verification attempts, each pick timed afterwards;
    the module's own setting is restored, and the count of searches within 10% adds up."""
    from helpers import fixed_latency

    import ats_vit.calibrate as calibrate
    import ats_vit.latency as latency

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    built = latency.LatencyModel  # a hand-set table: the tiny model is too small to run faster sampled

    def fixed(family, batch, **_):
        return fixed_latency(built(family, batch, repeats=1, min_seconds=0.0, progress=False))

    monkeypatch.setattr(latency, "LatencyModel", fixed)
    default = calibrate.VERIFY_ATTEMPTS
    out = tmp_path / "search.json"
    argv = [str(tiny_checkpoint), "--target", "0.9", "--attempts", "1", "2", "--rounds", "1"]
    argv += ["--batch-size", "16", "--eval-runs", "2", "--repeats", "1", "--json", str(out)]
    assert run_script("latency_search.py", *argv, monkeypatch=monkeypatch) == 0
    assert default == calibrate.VERIFY_ATTEMPTS
    rows = json.loads(out.read_text())["rows"]
    assert [r["attempts"] for r in rows] == [1, 2]
    for r in rows:
        assert 1 <= len(r["timings"]) <= r["attempts"]
        assert r["predicted_calib"] > 0 and r["predicted_test"] > 0
        assert r["speedup"] == pytest.approx(sum(r["eval_speedups"]) / 2)
        assert r["off_pct"] == pytest.approx(100 * (r["speedup"] * 0.9 - 1))
    printed = capsys.readouterr().out
    hits = sum(abs(r["off_pct"]) <= 10 for r in rows if r["attempts"] == 1)
    assert f"1 attempts: {hits} of 1 searches within" in printed
    assert run_script("latency_search.py", *argv, monkeypatch=monkeypatch) == 2  # refuses to overwrite


def test_held_caps(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Both searches per target (decaying caps only, and with held caps), each pick's test
    accuracy against the decaying one's (paired), and its speed-up over dense per run."""
    from helpers import fixed_latency

    import ats_vit.latency as latency

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    built = latency.LatencyModel  # a hand-set table: the tiny model is too small to time

    def fixed(family, batch, **_):
        return fixed_latency(built(family, batch, repeats=1, min_seconds=0.0, progress=False))

    monkeypatch.setattr(latency, "LatencyModel", fixed)
    out = tmp_path / "held.json"
    argv = [str(tiny_checkpoint), "--data", "tiny", "--targets", "0.7", "--runs", "2", "--calib-images", "48"]
    argv += ["--timing-batch", "8", "--repeats", "1", "--min-seconds", "0", "--json", str(out)]
    assert run_script("held_caps.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["search"] for r in rows] == ["decaying", "held"]
    decaying = rows[0]
    assert decaying["vs_decaying_pct"] == 0.0 and decaying["p"] == 1.0
    for r in rows:
        assert len(r["speedups"]) == 2 and r["speedup"] == pytest.approx(sum(r["speedups"]) / 2)
        assert 0 <= r["test_pct"] <= 100 and 0 < r["gflops"] < 1 and r["predicted"] > 0
    assert "vs decaying" in capsys.readouterr().out
    assert run_script("held_caps.py", *argv, monkeypatch=monkeypatch) == 2  # refuses to overwrite
