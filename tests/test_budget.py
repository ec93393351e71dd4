import json

import pytest
import torch

from ats_vit import ViT
from ats_vit.budget import AUTO, METHODS, RECOMMENDED, Budget, BudgetError, Calibration, calibrate, measure

SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=4, heads=2, dim_head=16, mlp_dim=64)


def peaky_vit(**kw) -> ViT:
    """Random weights with sharpened queries: CLS attention is peaked, as in trained models."""
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "max_tokens_per_depth": (16,) * 4, **kw}).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: block.attn.inner_dim] *= 6.0
    return model


def images(b: int, seed: int) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_budget_round_trips_through_json(tmp_path):
    budget = Budget(1, (12, 8, 4), temperature=1.5, dropped="merge", depth=4, num_patches=16, target=0.6)
    path = budget.save(tmp_path / "b" / "budget.json")
    assert json.loads(path.read_text())["format"] == "ats-vit-budget/1"
    assert Budget.load(path) == budget


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start_layer=-1, max_tokens=(4,)), "start_layer must be an int >= 0"),
        (dict(start_layer=0, max_tokens=()), "max_tokens must be a non-empty sequence"),
        (dict(start_layer=0, max_tokens=(4, 8)), "non-increasing"),
        (dict(start_layer=0, max_tokens=(4,), sampler="best"), "sampler must be one of"),
        (dict(start_layer=0, max_tokens=(4,), dropped="keep"), "dropped must be one of"),
        (dict(start_layer=0, max_tokens=(4,), sampler="tome"), "dropped must be 'merge'"),
        (dict(start_layer=0, max_tokens=(4,), temperature=0.0), "temperature must be a finite number > 0"),
        (dict(start_layer=1, max_tokens=(4,), depth=4), "must equal depth"),
    ],
)
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_bad_budget_files_are_refused(tmp_path):
    with pytest.raises(BudgetError, match="does not exist"):
        Budget.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BudgetError, match="not valid JSON"):
        Budget.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BudgetError, match="not an ats-vit budget"):
        Budget.load(bad)
    bad.write_text(json.dumps({**Budget(0, (4,)).to_dict(), "colour": "blue"}))
    with pytest.raises(BudgetError, match=r"unknown fields \['colour'\]"):
        Budget.load(bad)


def test_apply_sets_every_layer_of_our_vit():
    model = peaky_vit()
    Budget(2, (8, 4), temperature=2.0, dropped="fuse").apply(model)
    assert model.max_tokens_per_depth == (16, 16, 8, 4)
    assert [b.attn.ats.dropped for b in model.blocks] == ["fuse"] * 4
    assert not any(b.attn.ats.training for b in model.blocks)
    with pytest.raises(BudgetError, match="covers 3 layers"):
        Budget(0, (8, 4, 4)).apply(model)
    with pytest.raises(BudgetError, match="made for a model with num_patches=64"):
        Budget(2, (8, 4), num_patches=64).apply(model)
    with pytest.raises(TypeError, match="budgets apply to"):
        Budget(2, (8, 4)).apply(torch.nn.Linear(2, 2))


def test_the_paper_budget_is_the_constructor_schedule():
    x = images(4, 1)
    model = peaky_vit()
    Budget(1, (10, 6, 6)).apply(model)
    reference = peaky_vit(max_tokens_per_depth=(16, 10, 6, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


@pytest.mark.parametrize("target", [0.5, 0.7, 0.9])
def test_calibrate_meets_the_target_on_held_out_images(target):
    model = peaky_vit()
    budget = calibrate(model, images(96, 1), target, progress=False, steps=12)
    assert budget.calibration["searched"] == RECOMMENDED and budget.target == target
    assert budget.calibration["gflops_ratio"] == pytest.approx(target, rel=0.03)
    assert 0.0 <= budget.calibration["agreement"] <= 1.0
    held_out = images(96, 2)
    _, dense = measure(model, held_out, None)
    _, cost = measure(model, held_out, budget)
    assert (cost.mean() / dense.mean()).item() == pytest.approx(target, rel=0.03)


def test_calibrate_with_labels_maximises_accuracy_and_leaves_the_model_configured():
    model = peaky_vit()
    x = images(64, 1)
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(0))
    budget = calibrate(model, x, 0.7, labels, method="topk", progress=False)
    assert "accuracy" in budget.calibration and budget.sampler == "topk"
    assert model.max_tokens_per_depth == budget.schedule(4, 16)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_calibrates(method):
    budget = calibrate(peaky_vit(), images(48, 1), 0.75, method=method, progress=False, steps=8)
    assert budget.method == method
    assert budget.calibration["gflops_ratio"] == pytest.approx(0.75, abs=0.06)
    if method == "paper":
        assert budget.temperature == 1.0 and budget.dropped == "discard"


def test_auto_keeps_the_best_of_its_methods_and_shares_their_trials():
    search = Calibration(peaky_vit(), images(48, 1), progress=False, steps=8)
    best = search(0.6)
    assert best.calibration["searched"] == "auto" and best.method in AUTO
    trials = len(search.trials)
    each = {m: search(0.6, m) for m in AUTO}
    assert len(search.trials) == trials, "the single-method searches reuse auto's trials"
    top = max(b.calibration["agreement"] for b in each.values())
    assert best.calibration["agreement"] == top


@pytest.mark.parametrize("target", [0.0, -0.5, 1.5, 0.01])
def test_unreachable_targets_name_the_reachable_range(target):
    with pytest.raises(BudgetError, match=r"target must be in \(0\.\d+, 1\]"):
        calibrate(peaky_vit(), images(16, 1), target, progress=False)


def test_calibrate_argument_errors():
    model = peaky_vit()
    with pytest.raises(ValueError, match="method must be 'auto' or one of"):
        calibrate(model, images(8, 1), 0.5, method="magic")
    with pytest.raises(TypeError, match="target must be a float"):
        calibrate(model, images(8, 1), "half")
    with pytest.raises(ValueError, match="images must be a non-empty"):
        calibrate(model, images(8, 1)[0], 0.5)
    with pytest.raises(ValueError, match="labels must be a"):
        calibrate(model, images(8, 1), 0.5, torch.zeros(3))
    with pytest.raises(ValueError, match=r"start_layers must hold layer indices in \[0, 4\)"):
        calibrate(model, images(8, 1), 0.5, start_layers=[7])
