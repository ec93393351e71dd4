"""The demo's promised results, end to end, and fine-tuning from its checkpoint (about 7
minutes on 2 CPU cores).

Optional: run with `python -m pytest -m slow`.
"""

import json

import pytest

from ats_vit.budget import Budget
from ats_vit.checkpoint import load_model
from ats_vit.cli import main
from ats_vit.data import load_split, source_items, take
from ats_vit.evaluate import measure
from ats_vit.stats import paired_test


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_meets_its_targets(demo):
    rows = {r["label"]: r for r in json.loads((demo / "eval.json").read_text())["rows"]}
    dense = rows["dense"]
    assert dense["accuracy"] >= 0.95
    half, most = rows["budget-0.5 @ 0.5"], rows["budget-0.7 @ 0.7"]
    # the calibrated cost holds on the test split, and the accuracy stays near dense
    assert half["gflops_ratio"] == pytest.approx(0.5, rel=0.03)
    assert most["gflops_ratio"] == pytest.approx(0.7, rel=0.03)
    # the test split is 359 digits placed 3 times (+-1.6 points): "near dense" means no loss a
    # paired test over the digits can tell from noise, and never more than 1 point
    model, cfg = load_model(str(demo / "final.safetensors"))
    images, labels = take(load_split("demo", "test", cfg.image_size))
    items = source_items("demo", "test", len(labels))
    dense_hits = measure(model, images, None)[0] == labels
    for row, name in ((half, "budget-0.5.json"), (most, "budget-0.7.json")):
        hits = measure(model, images, Budget.load(demo / name))[0] == labels
        diff, p = paired_test(hits, dense_hits, items)
        assert diff == pytest.approx(row["accuracy"] - dense["accuracy"])
        assert diff >= -0.010 and (diff >= 0 or p >= 0.05), (name, diff, p)
    for name in ("final.safetensors", "metrics.csv", "accuracy_vs_gflops.png", "kept_tokens.png"):
        assert (demo / name).exists()


# issue 37's goal on the demo checkpoint (seed 0), not met: 2026-12-07 the recipe ended 0.84 points
# below dense at 0.4 and 1.86 at 0.3 (on the five demo seeds -0.52 at 0.4, docs/guides/training.md).
# strict: the day it passes, the marker must go. Only the accuracy goal is excused (`GoalMissed`): a
# failing command or a budget over its GFLOPs still fails the test.
class GoalMissed(Exception):
    pass


_MISSED = pytest.mark.xfail(
    raises=GoalMissed, strict=True, reason="fine-tuning goal missed on demo seed 0 (issue 37)"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "slack"), [pytest.param(0.4, 0.005, marks=_MISSED), pytest.param(0.3, 0.015, marks=_MISSED)]
)
def test_three_epochs_of_finetuning_recover_the_dense_accuracy(demo, target, slack):
    """The recipe of the README: calibrate ats-fuse, fine-tune 3 epochs, calibrate again."""
    ckpt = str(demo / "final.safetensors")
    budget, tuned = demo / f"ats-fuse-{target}.json", demo / f"ft-{target}"
    assert (
        main(["calibrate", ckpt, "--method", "ats-fuse", "--target", str(target), "--out", str(budget)]) == 0
    )
    assert main(["finetune", ckpt, "--budget", str(budget), "--epochs", "3", "--out", str(tuned)]) == 0
    again = tuned / "budget.json"
    tuned_ckpt = str(tuned / "final.safetensors")
    assert (
        main(["calibrate", tuned_ckpt, "--method", "ats-fuse", "--target", str(target), "--out", str(again)])
        == 0
    )
    out = tuned / "eval"
    assert main(["eval", tuned_ckpt, "--budget", str(again), "--timing-repeats", "0", "--out", str(out)]) == 0
    tuned_row = json.loads((out / "eval.json").read_text())["rows"][-1]
    dense = json.loads((demo / "eval.json").read_text())["rows"][0]
    assert tuned_row["gflops"] <= target * 1.03 * dense["gflops"]
    if tuned_row["accuracy"] < dense["accuracy"] - slack:
        raise GoalMissed(f"{tuned_row['accuracy']:.4f} < {dense['accuracy']:.4f} - {slack}")
