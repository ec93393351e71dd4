"""Every script in benchmarks/ runs on tiny sizes (a smoke test: no timing is asserted)."""

import csv
import json
import math
import os
import runpy
import shutil
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
    for name in ("ats_vit.data", "ats_vit.bench.train"):
        monkeypatch.setattr(
            importlib.import_module(name), "load_split", lambda spec, split, *a, **k: splits[split]
        )
    return splits


def test_every_script_has_a_smoke_test():
    tested = {"speed.py", "frontier.py", "frontier_checkpoints.py", "gpu_check.py", "tables.py"}
    tested |= {"calibration_speed.py", "latency_model.py", "demo.py", "latency_budgets.py", "imagenet.py"}
    tested |= {"auto_rule.py", "finetune_recipe.py", "bucketed_attention.py"}
    assert {p.name for p in SCRIPTS.glob("*.py")} == tested


def test_speed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("timm")
    argv = [*TINY_TIMM, "--img-size", "32", "--start-layer", "1", "--cap", "8", "--batch-sizes", "1"]
    argv += ["--min-seconds", "0", "--families", "ours", "timm"]
    assert run_script("speed.py", *argv, "--json", str(tmp_path / "a.json"), monkeypatch=monkeypatch) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert [(r["family"], r["variant"]) for r in rows] == [
        ("timm", "dense"),
        ("timm", "ATS inverse_transform"),
        ("timm", "ATS gumbel"),
        ("ours", "dense"),
        ("ours", "ATS inverse_transform"),
        ("ours", "ATS gumbel"),
    ]
    assert "efficiency" in capsys.readouterr().out


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
        "--timing-processes",
        "1",
        "--json",
        str(tmp_path / "f.json"),
    ]
    assert run_script("frontier.py", *argv, monkeypatch=monkeypatch) == 0
    assert (tmp_path / "f.png").is_file(), "the picture is written beside the JSON"
    assert len(json.loads((tmp_path / "f.json").read_text())["rows"]) == 2


def test_frontier_checkpoints(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    out, report = tmp_path / "runs", tmp_path / "checkpoints.json"
    argv = [str(out), "--only", "p6", "--epochs", "2", "--train-images", "64", "--seeds", "0", "2"]
    argv += ["--lr", "1e-3"]  # p6's recipe trains at 1.5e-3
    assert run_script("frontier_checkpoints.py", *argv, "--json", str(report), monkeypatch=monkeypatch) == 0
    for name, seed in (("p6", 0), ("p6-s2", 2)):
        assert (out / name / "final.safetensors").exists()
        config = json.loads((out / name / "config.json").read_text())
        assert config["seed"] == seed and config["lr"] == 1e-3
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed.endswith("--data demo@0 demo@2") and "p6-s2/final.safetensors" in printed
    rows = json.loads(report.read_text())["rows"]
    assert [(r["checkpoint"], r["seed"], r["data"]) for r in rows] == [
        ("p6", 0, "demo@0"),
        ("p6-s2", 2, "demo@2"),
    ]
    assert all(row["lr"] == 1e-3 for row in rows)
    assert run_script("frontier_checkpoints.py", str(out), "--lr", "0", monkeypatch=monkeypatch) == 2
    for row in rows:  # two epochs of 64 images at batch 64: a loss and a validation score each
        assert len(row["loss_per_epoch"]) == len(row["val_accuracy_per_epoch"]) == 2 and row["steps"] == 2
        assert len(row["attention_entropy"]) == 6 and all(0 < e <= 1 for e in row["attention_entropy"])
    # the report of finished runs again: refused over the JSON, given with --resume --overwrite
    assert run_script("frontier_checkpoints.py", *argv, "--json", str(report), monkeypatch=monkeypatch) == 2
    argv += ["--resume", "--overwrite", "--json", str(report)]
    assert run_script("frontier_checkpoints.py", *argv, monkeypatch=monkeypatch) == 0
    assert json.loads(report.read_text())["rows"] == rows
    # --resume also starts the runs OUT does not hold yet (and keeps the finished ones)
    from helpers import weights

    before = weights(out / "p6" / "final.safetensors")
    argv = [str(out), "--only", "p6", "--epochs", "2", "--train-images", "64", "--seeds", "0", "3"]
    argv += ["--lr", "1e-3"]  # a resume keeps the run's own settings: the same rate
    assert run_script("frontier_checkpoints.py", *argv, "--resume", monkeypatch=monkeypatch) == 0
    assert (out / "p6-s3" / "final.safetensors").exists()
    after = weights(out / "p6" / "final.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    with open(out / "p6" / "epochs.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2"]


def test_frontier_checkpoints_epochs_keep_the_warmup(tmp_path, monkeypatch):
    """--epochs changes a recipe's length only (to choose it on the selection seeds); the smoke
    option --train-images is what cuts the warm-up."""
    import ats_vit.train

    seen = []

    def record(cfg, *args, **kwargs):
        seen.append(cfg)
        raise KeyboardInterrupt  # stop before any training

    monkeypatch.setattr(ats_vit.train, "train", record)
    recipe = runpy.run_path(str(SCRIPTS / "frontier_checkpoints.py"))["RECIPES"]["demo"][1]
    assert recipe.warmup_steps > 1
    for extra, warmup in (([], recipe.warmup_steps), (["--train-images", "64"], 1)):
        argv = [str(tmp_path / "runs"), "--only", "demo", "--seeds", "100", "--epochs", "12", *extra]
        with pytest.raises(KeyboardInterrupt):
            run_script("frontier_checkpoints.py", *argv, monkeypatch=monkeypatch)
        assert (seen[-1].epochs, seen[-1].warmup_steps, seen[-1].lr) == (12, warmup, recipe.lr)


def test_auto_rule(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    argv = [str(tiny_checkpoint), "--data", "tiny", "--targets", "0.7", "--json", str(tmp_path / "a.json")]
    assert run_script("auto_rule.py", *argv, monkeypatch=monkeypatch) == 0
    record = json.loads((tmp_path / "a.json").read_text())
    lists, zs = record["config"]["member_lists"], record["config"]["zs"]
    assert len(record["summary"]) == len(lists) * len(zs) and record["pick"] in record["summary"]
    for row in record["rows"]:  # the pick is one of its list's members, scored on the test split
        assert row["chosen"] in row["members"].split("+") and 0 <= row["accuracy_pct"] <= 100
    assert "the rule keeps: members" in capsys.readouterr().out


def test_auto_rule_reads_a_measured_checkpoint_from_the_cache(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_splits
):
    argv = [str(tiny_checkpoint), "--data", "tiny", "--targets", "0.7", "--cache", str(tmp_path / "c")]
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert run_script("auto_rule.py", *argv, "--json", str(first), monkeypatch=monkeypatch) == 0
    assert len(list((tmp_path / "c").iterdir())) == 1
    import ats_vit.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("measured again instead of reading the cache")

    monkeypatch.setattr(ats_vit.evaluate, "measure", refuse)
    assert run_script("auto_rule.py", *argv, "--json", str(second), monkeypatch=monkeypatch) == 0
    assert json.loads(first.read_text())["rows"] == json.loads(second.read_text())["rows"]


def test_auto_rule_takes_one_calibration_count_or_one_per_checkpoint(monkeypatch, capsys):
    argv = ["a.safetensors", "b.safetensors", "--calib-images", "1", "2", "3"]
    assert run_script("auto_rule.py", *argv, monkeypatch=monkeypatch) == 2
    assert "--calib-images takes one value or one per checkpoint (2), got 3" in capsys.readouterr().err
    import runpy

    config = runpy.run_path(str(SCRIPTS / "auto_rule.py"))["Config"]
    cfg = config(("a", "b"), calib_images=(320, 1000))
    assert (cfg.calib_images_of(0), cfg.calib_images_of(1)) == (320, 1000)
    assert config(("a", "b")).calib_images_of(1) == 320


def test_auto_rule_takes_one_target_list_per_checkpoint(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys
):
    argv = ["a.safetensors", "b.safetensors", "--targets-per-checkpoint", "0.4,0.6"]
    assert run_script("auto_rule.py", *argv, monkeypatch=monkeypatch) == 2
    assert "--targets-per-checkpoint takes one list per checkpoint (2), got 1" in capsys.readouterr().err
    assert run_script("auto_rule.py", "a", "--targets-per-checkpoint", "0.4,x", monkeypatch=monkeypatch) == 2
    assert "expected comma-separated fractions" in capsys.readouterr().err
    ckpt = str(tiny_checkpoint)
    argv = [ckpt, ckpt, "--data", "tiny", "--targets-per-checkpoint", "0.7", "0.6,0.8"]
    assert run_script("auto_rule.py", *argv, "--json", str(tmp_path / "a.json"), monkeypatch=monkeypatch) == 0
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    first = [r for r in rows if r["members"] == rows[0]["members"] and r["z"] == rows[0]["z"]]
    assert [r["target"] for r in first] == [0.7, 0.6, 0.8], "each checkpoint at its own targets"


def test_auto_rule_picks_by_mean_then_the_earlier_list_then_the_larger_z():
    import runpy

    rule = runpy.run_path(str(SCRIPTS / "auto_rule.py"))
    first, second = ("+".join(m) for m in rule["MEMBER_LISTS"][:2])
    summary = [
        dict(members=second, z=0.0, mean_pct=90.00),
        dict(members=first, z=0.5, mean_pct=89.97),  # a tie (within 0.05): the earlier list
        dict(members=first, z=2.0, mean_pct=89.96),  # ... and of its ties the larger z
        dict(members=first, z=1.0, mean_pct=89.0),
    ]
    assert rule["pick"](summary) == summary[2]
    summary[0]["mean_pct"] = 90.2  # clearly ahead: the other list
    assert rule["pick"](summary) == summary[0]


def test_bucketed_attention(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    out = tmp_path / "b.json"
    argv = [str(tiny_checkpoint), "--data", "tiny", "--methods", "ats-fuse", "--targets", "0.7"]
    argv += ["--batch-sizes", "4", "16", "--processes", "2", "--repeats", "2", "--calib-images", "32"]
    assert run_script("bucketed_attention.py", *argv, "--json", str(out), monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["target"], r["batch"]) for r in rows] == [
        ("ats-fuse", 0.7, 4),
        ("ats-fuse", 0.7, 16),
    ]
    for row in rows:
        assert len(row["buckets_runs"]) == len(row["whole_runs"]) == 2  # one per timing process
        assert row["ideal"] == pytest.approx(1 / row["gflops_ratio"]) and 0 <= row["padding_pct"] < 100
        assert row["efficiency_buckets"] == pytest.approx(row["buckets"] / row["ideal"])
    assert "buckets / whole" in capsys.readouterr().out
    # a batch larger than the test split would time fewer images than it says: refused
    with pytest.raises(ValueError, match="fewer than --batch-sizes"):
        run_script("bucketed_attention.py", *argv, "--batch-sizes", "1000", monkeypatch=monkeypatch)
    assert run_script("bucketed_attention.py", *argv, "--data", "tiny", "tiny", monkeypatch=monkeypatch) == 2


def test_finetune_recipe(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    work, out = tmp_path / "work", tmp_path / "r.json"
    checkpoint = tmp_path / "tiny" / "final.safetensors"  # a copy: this test touches it
    checkpoint.parent.mkdir()
    shutil.copy(tiny_checkpoint, checkpoint)
    argv = [str(checkpoint), "--data", "tiny", "--target", "0.7", "--lrs", "5e-4", "1e-3"]
    argv += ["--epochs", "1", "--work", str(work), "--json", str(out)]
    assert run_script("finetune_recipe.py", *argv, monkeypatch=monkeypatch) == 0
    record = json.loads(out.read_text())
    rows = {r["key"]: r for r in record["rows"]}
    assert list(rows) == ["dense", "before", "lr 0.0005", "lr 0.001"]
    assert rows["dense"]["vs_dense_pct"] == 0 and rows["lr 0.0005"]["vs_recipe_p"] == 1.0
    tiny = len(tiny_splits["test"])
    for row in rows.values():  # pooled over the one checkpoint: its own accuracy
        assert row["accuracy_pct"] == pytest.approx(row["per_checkpoint_pct"][0])
        assert round(row["accuracy_pct"] * tiny / 100) == pytest.approx(
            row["accuracy_pct"] * tiny / 100, abs=1e-6
        )
    assert record["pick"] in rows and "the rule keeps:" in capsys.readouterr().out
    # the work folder is refused without --resume; with it the measured checkpoint is read back
    assert run_script("finetune_recipe.py", *argv, "--overwrite", monkeypatch=monkeypatch) == 2
    import ats_vit.train

    def refuse(*a, **k):
        raise AssertionError("a measured checkpoint was trained again")

    monkeypatch.setattr(ats_vit.train, "train", refuse)
    argv_again = [*argv, "--overwrite", "--resume"]
    assert run_script("finetune_recipe.py", *argv_again, monkeypatch=monkeypatch) == 0
    assert json.loads(out.read_text())["rows"] == record["rows"]
    # a resume with other settings (target, or a method never measured there) is refused
    with pytest.raises(ValueError, match="resume with the same settings"):
        run_script("finetune_recipe.py", *argv_again, "--target", "0.6", monkeypatch=monkeypatch)
    os.utime(checkpoint, ns=(0, 10**9))  # the checkpoint as if written again: its hits are stale
    with pytest.raises(ValueError, match="resume with the same settings"):
        run_script("finetune_recipe.py", *argv_again, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match=r"lacks \['tome before'"):
        both = [*argv_again, "--methods", "ats-fuse", "tome"]
        run_script("finetune_recipe.py", *both, monkeypatch=monkeypatch)


def test_finetune_recipe_methods(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """--methods fine-tunes with each method's own budget; the recipe's method keeps its keys."""
    work, out = tmp_path / "work", tmp_path / "r.json"
    argv = [str(tiny_checkpoint), "--data", "tiny", "--target", "0.7", "--lrs", "5e-4", "--epochs", "1"]
    # without the recipe's method there is nothing to compare with: refused
    no_recipe = [*argv, "--methods", "tome", "--work", str(work)]
    assert run_script("finetune_recipe.py", *no_recipe, monkeypatch=monkeypatch) == 2
    assert "must include the recipe's method ats-fuse" in capsys.readouterr().err
    both = [*argv, "--methods", "ats-fuse", "tome", "--work", str(work), "--json", str(out)]
    assert run_script("finetune_recipe.py", *both, monkeypatch=monkeypatch) == 0
    record = json.loads(out.read_text())
    rows = {r["key"]: r for r in record["rows"]}
    assert list(rows) == ["dense", "before", "lr 0.0005", "tome before", "tome lr 0.0005"]
    assert rows["tome lr 0.0005"]["model"] == "tome 0.7, fine-tuned at lr 0.0005"
    assert rows["tome before"]["model"] == "tome 0.7, calibrated, not fine-tuned"
    assert record["recipe"] == "lr 0.0005" and rows["lr 0.0005"]["vs_recipe_p"] == 1.0
    assert record["config"]["methods"] == ["ats-fuse", "tome"]
    # each method fine-tuned in its own run folder, with its own method's budget
    from ats_vit.checkpoint import load_model

    for method in ("ats-fuse", "tome"):
        run = work / f"0-{method}-lr0.0005"
        assert load_model(str(run / "final.safetensors"))[1].budget["method"] == method
    # --report is the recipe alone: another method there would be a choice made on reported seeds
    report = [*argv, "--report", "--methods", "ats-fuse", "tome", "--work", str(tmp_path / "w2")]
    assert run_script("finetune_recipe.py", *report, monkeypatch=monkeypatch) == 2


def test_finetune_recipe_report_measures_the_recipe_alone(
    tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys
):
    work, out = tmp_path / "work", tmp_path / "r.json"
    argv = [str(tiny_checkpoint), "--data", "tiny", "--target", "0.7", "--epochs", "1", "--report"]
    # another learning rate on reported seeds would be a choice made on them: refused
    argv_lrs = [*argv, "--lrs", "1e-3", "5e-4", "--work", str(work)]
    assert run_script("finetune_recipe.py", *argv_lrs, monkeypatch=monkeypatch) == 2
    assert "--report measures the recipe alone" in capsys.readouterr().err
    assert (
        run_script(
            "finetune_recipe.py", *argv, "--work", str(work), "--json", str(out), monkeypatch=monkeypatch
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert [r["key"] for r in record["rows"]] == ["dense", "before", "lr 0.0005"]
    assert record["config"]["report"] is True and record["pick"] is None
    assert "the rule keeps" not in capsys.readouterr().out


def test_finetune_recipe_keeps_its_learning_rate_unless_another_is_significantly_ahead():
    pick = runpy.run_path(str(SCRIPTS / "finetune_recipe.py"))["pick"]

    def row(key, ahead, p):
        return dict(key=key, accuracy_pct=90 + ahead, vs_recipe_pct=ahead, vs_recipe_p_adj=p)

    rows = [row("dense", 3.0, 0.001), row("before", 1.0, 0.01), row("lr 0.0005", 0.0, 1.0)]
    assert pick([*rows, row("lr 0.001", 0.8, 0.2)]) == "lr 0.0005"  # ahead, not significantly
    assert pick([*rows, row("lr 0.001", -0.8, 0.01)]) == "lr 0.0005"  # significantly behind
    assert pick([*rows, row("lr 0.001", 0.8, 0.01), row("lr 0.002", 0.5, 0.02)]) == "lr 0.001"
    # another method's fine-tuned model competes by the same rule; its un-tuned budget does not
    assert pick([*rows, row("tome before", 0.9, 0.01)]) == "lr 0.0005"
    assert pick([*rows, row("tome lr 0.0005", 0.6, 0.01), row("lr 0.001", 0.5, 0.02)]) == "tome lr 0.0005"


def test_gpu_check_on_the_cpu(monkeypatch, capsys):
    pytest.importorskip("timm")
    assert run_script("gpu_check.py", "--small", "--device", "cpu", monkeypatch=monkeypatch) == 0
    assert "FAIL" not in capsys.readouterr().out


def test_calibration_speed(tmp_path, monkeypatch, tiny_checkpoint, capsys):
    from helpers import tiny_data

    import ats_vit.data

    monkeypatch.setattr(ats_vit.data, "load_split", lambda *a, **k: tiny_data(64, seed=1))
    argv = [str(tiny_checkpoint), "--targets", "0.7", "--runs", "1", "--json", str(tmp_path / "c.json")]
    assert run_script("calibration_speed.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert [r["way"] for r in rows] == ["as it runs", "every member", "neither shortcut"]
    assert all(r["same"] == "True" for r in rows)
    # auto's later members are searched only where its first has nothing near the target
    assert rows[0]["trials"] < rows[1]["trials"] == rows[2]["trials"]
    assert rows[2]["passes"] == pytest.approx(rows[2]["trials"])  # no probe: every trial a whole pass
    from ats_vit.calibrate import choice

    assert math.isinf(choice.SWITCH_Z)  # restored


def test_latency_model(tmp_path, monkeypatch, tiny_checkpoint, tiny_splits, capsys):
    """Predicted and measured ratios side by side, from budget files or a frontier JSON; the
    error is the prediction against the median of the runs."""
    from helpers import timed_by_key

    import ats_vit.evaluate as evaluate
    from ats_vit.budget import Budget

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    # on a fake clock: dense 10 ms, the fused budget 6 ms, top-k 8 ms
    timed_by_key(monkeypatch, evaluate, {"0": 10e-3, "1": 6e-3, "2": 8e-3}.__getitem__)
    fuse = Budget(1, (8, 4), dropped="fuse").save(tmp_path / "fuse.json")
    keep = Budget(1, (6, 3), sampler="topk").save(tmp_path / "topk.json")
    out = tmp_path / "lat.json"
    argv = [str(tiny_checkpoint), "--budget", str(fuse), str(keep), "--batch-size", "16", "--runs", "2"]
    argv += ["--repeats", "1", "--json", str(out)]
    assert run_script("latency_model.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["budget"] for r in rows] == ["fuse", "topk"]
    for r, timed in zip(rows, (0.6, 0.8), strict=True):
        assert r["measured_runs"] == pytest.approx([timed, timed]) and r["measured"] == pytest.approx(timed)
        assert r["predicted"] > 0  # the tiny model is too small for a sampling layer to pay off
        assert r["error_pct"] == pytest.approx(100 * (r["predicted"] / timed - 1))
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


@pytest.mark.slow
def test_demo(tmp_path, monkeypatch, capsys):
    """The README's table: the demo once, its budgets timed again in a second process (about
    a minute with one epoch; `pytest -m slow`)."""
    pytest.importorskip("sklearn")
    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    out, record = tmp_path / "demo", tmp_path / "demo.json"
    argv = ["--out", str(out), "--epochs", "1", "--runs", "2", "--json", str(record)]
    assert run_script("demo.py", *argv, monkeypatch=monkeypatch) == 0
    rows = json.loads(record.read_text())["rows"]
    assert [r["label"] for r in rows] == ["dense", "budget-0.5 @ 0.5", "budget-0.7 @ 0.7", "keep 0.5"]
    second = json.loads((out / "eval-run2" / "eval.json").read_text())["rows"]
    for row, again in zip(rows, second, strict=True):
        assert row["speedup_runs"][1] == again["speedup"] and len(row["speedup_runs"]) == 2
        assert "vs_dense_p" in row and row["accuracy"] == again["accuracy"]
    assert run_script("demo.py", *argv, monkeypatch=monkeypatch) == 2  # the JSON exists


def test_latency_budgets(tmp_path, monkeypatch):
    """A latency budget calibrated, then timed by eval in separate processes, on an untrained
    model of the demo's sizes (the tiny one is too small for any rule to save time)."""
    pytest.importorskip("torchvision")  # image folders
    from helpers import image_folder_tree

    from ats_vit.checkpoint import save_checkpoint
    from ats_vit.models import ModelConfig, build_model

    monkeypatch.setenv("ATS_VIT_CACHE", str(tmp_path / "cache"))
    cfg = ModelConfig(num_classes=2, depth=4)
    save_checkpoint(tmp_path / "m.safetensors", build_model(cfg), cfg)
    data = image_folder_tree(tmp_path / "data", size=48, mode="L", per_class=8)
    record = tmp_path / "lat.json"
    argv = [str(tmp_path / "m.safetensors"), "--data", str(data), "--cases", "demo-0.8", "--runs", "2"]
    argv += ["--timing-repeats", "2", "--calib-images", "16", "--json", str(record)]
    assert run_script("latency_budgets.py", *argv, monkeypatch=monkeypatch) == 0
    (row,) = json.loads(record.read_text())["rows"]
    assert row["case"] == "demo-0.8" and row["asked"] == pytest.approx(1.25)
    assert row["budget"]["cost"] == "latency" and len(row["speedup_runs"]) == 2
    assert row["off_pct"] == pytest.approx(100 * (row["speedup"] * 0.8 - 1))


@pytest.mark.parametrize(
    "script, argv",
    [
        ("latency_model.py", ["no-such-checkpoint.safetensors", "--budget", "b.json"]),
        ("calibration_speed.py", ["no-such-checkpoint.safetensors"]),
    ],
)
def test_scripts_refuse_to_write_over_an_existing_json(tmp_path, monkeypatch, capsys, script, argv):
    """Refused at parse time, before any work (the checkpoints named do not even exist)."""
    existing = tmp_path / "run.json"
    existing.write_text("an earlier run")
    assert run_script(script, *argv, "--json", str(existing), monkeypatch=monkeypatch) == 2
    assert existing.read_text() == "an earlier run"
    assert "already exists: pass --overwrite" in capsys.readouterr().err


def _fake_imagenet_weights(root, path):
    """deit_tiny at 64 px with random features and a 2-class head fitted to the fake ImageNet's
    training images (least squares on the pooled features): dense classifies val/ perfectly, so
    the run's accuracies mean something."""
    import torch
    from safetensors.torch import save_file

    from ats_vit.data import load_split, take
    from ats_vit.sources import timm_source

    torch.manual_seed(0)
    source = timm_source("deit_tiny_patch16_224", img_size=64)
    model = source.model
    model.reset_classifier(2)
    x, y = take(load_split(str(root), "calib", 64, transform=source.transform))
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        design = torch.cat([features, torch.ones(len(x), 1)], 1)
        solution = torch.linalg.lstsq(design, torch.nn.functional.one_hot(y, 2).float()).solution
        model.head.weight.copy_(solution[:-1].T)
        model.head.bias.copy_(solution[-1])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_imagenet_reproduction_runs_end_to_end_on_a_fake_imagenet(tmp_path, monkeypatch, capsys):
    """`benchmarks/imagenet.py` on an ImageFolder with train/ and val/ (12 images each): every
    row is calibrated on train/, measured on val/, timed, written as JSON and printed as the
    table; ``--random-weights`` is the untrained path, ``--weights`` a local file."""
    pytest.importorskip("timm")
    from helpers import image_folder_tree

    from ats_vit.budget import Budget

    root = image_folder_tree(tmp_path / "imagenet", per_class=6, size=48)
    weights = _fake_imagenet_weights(root, tmp_path / "deit_tiny_fake.safetensors")
    out = tmp_path / "imagenet.json"
    argv = ["--data", str(root), "--model", "deit_tiny_patch16_224", "--img-size", "64"]
    argv += ["--calib-images", "8", "--batch-size", "8", "--workers", "0", "--timing-batch", "2"]
    argv += ["--timing-repeats", "2", "--targets", "0.6", "--time-targets", "0.97", "0.05"]
    assert (
        run_script(
            "imagenet.py", *argv, "--weights", str(weights), "--json", str(out), monkeypatch=monkeypatch
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "| row | GFLOPs (ratio) | top-1 % |" in printed and f"wrote {out}" in printed
    record = json.loads(out.read_text())
    rows = {r["label"]: r for r in record["rows"]}
    assert list(rows) == [
        "dense",
        "tome r=8",
        "tome r=13",
        "paper",
        "official 0.6",
        "pitome 0.6",
        "dct 0.6",
        "auto 0.6",
        "auto time 0.97",
    ]
    assert [r["label"] for r in record["left_out"]] == ["auto time 0.05"], "no model runs in 5% of its time"
    assert "target must be in" in record["left_out"][0]["reason"]
    assert rows["dense"]["accuracy"] == 1.0 and rows["dense"]["images"] == rows["dense"]["items"] == 12
    assert record["weights"] == str(weights) and record["config"]["model"] == "deit_tiny_patch16_224"
    assert rows["tome r=8"]["budget"] == Budget.tome(8, 12, 16).to_dict()
    assert rows["paper"]["budget"] == Budget.paper(0.55, 3, 12, 16).to_dict()
    for label in ("official 0.6", "pitome 0.6", "dct 0.6", "auto 0.6"):
        assert rows[label]["gflops_ratio"] == pytest.approx(0.6, abs=0.03), label
    assert rows["official 0.6"]["budget"]["method"] == "official"
    assert rows["pitome 0.6"]["budget"]["sampler"] == "pitome"
    assert rows["dct 0.6"]["budget"]["sampler"] == "dct"
    assert rows["auto time 0.97"]["budget"]["calibration"]["cost"] == "latency"
    for row in rows.values():
        assert row["speedup"] > 0
        assert row["label"] == "dense" or 0 <= row["vs_dense_p"] <= 1
        assert row["published"] is None, "no published number for deit_tiny at 64 px"
    # under torchrun: rank 0 calibrates, both ranks evaluate half of val/ each, no time rows
    from helpers import torchrun

    ddp_out = tmp_path / "imagenet_ddp.json"
    torchrun(SCRIPTS / "imagenet.py", 29577, *argv, "--weights", str(weights), "--json", str(ddp_out))
    ddp = {r["label"]: r for r in json.loads(ddp_out.read_text())["rows"]}
    # the one-process run's rows but its time targets (nothing is timed across processes)
    assert list(ddp) == [label for label in rows if not label.startswith("auto time")]
    assert ddp["dense"]["images"] == 12 and ddp["dense"]["accuracy"] == 1.0
    assert all(math.isnan(r["speedup"]) for r in ddp.values()), "no timing across processes"
    for label in ("tome r=8", "paper"):
        assert (
            ddp[label]["accuracy"] == rows[label]["accuracy"]
            and ddp[label]["budget"] == rows[label]["budget"]
        )
    # the untrained path, and a run that would write over the first one
    assert (
        run_script("imagenet.py", *argv, "--random-weights", "--json", str(out), monkeypatch=monkeypatch) == 2
    )
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    bad = ["--data", str(tmp_path), "--json", str(tmp_path / "x.json")]
    assert run_script("imagenet.py", *bad, monkeypatch=monkeypatch) == 2
    assert "must hold train/<class>/... and val/<class>/..." in capsys.readouterr().err
