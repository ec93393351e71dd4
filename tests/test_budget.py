import json

import pytest
import torch
from helpers import SMALL, images, small_vit, tiny_data

from ats_vit import SamplingOptions, family_of
from ats_vit.budget import Budget, BudgetError, configure
from ats_vit.evaluate import evaluate_budgets, measure, time_budgets


def peaky_vit(schedule=(16,) * 4, **options):
    return small_vit(schedule, peaked=6.0, **options).eval()


def test_budget_round_trips_through_json(tmp_path):
    budget = Budget(1, (12, 8, 4), temperature=1.5, dropped="fuse", depth=4, num_patches=16, target=0.6)
    path = budget.save(tmp_path / "b" / "budget.json")
    raw = json.loads(path.read_text())
    assert raw["format"] == "ats-vit-budget/2" and raw["caps"] == [12, 8, 4] and "source" not in raw
    loaded = Budget.load(path)
    assert loaded == budget and loaded.source == str(path)


def test_budget_files_of_the_first_format_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(
        json.dumps({"format": "ats-vit-budget/1", "start_layer": 1, "max_tokens": [8, 4], "depth": 3})
    )
    assert Budget.load(path) == Budget(1, (8, 4), depth=3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(start_layer=-1, caps=(4,)), "start_layer must be an int >= 0"),
        (dict(start_layer=0, caps=()), "caps must be a non-empty sequence"),
        (dict(start_layer=0, caps=(4, 8)), "non-increasing"),
        (dict(start_layer=0, caps=(4,), sampler="best"), "sampler must be one of"),
        (dict(start_layer=0, caps=(4,), dropped="keep"), "dropped must be one of"),
        (dict(start_layer=0, caps=(4,), sampler="tome", dropped="discard"), "dropped must be 'merge'"),
        (dict(start_layer=0, caps=(4,), temperature=0.0), "temperature must be a finite number > 0"),
        (dict(start_layer=1, caps=(4,), depth=4), "must equal depth"),
        (dict(start_layer=0, caps=(4,), cost="joules"), "cost must be one of"),
    ],
)
def test_bad_budgets_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Budget(**kwargs)


def test_bad_budget_files_are_refused_naming_the_file(tmp_path):
    with pytest.raises(BudgetError, match="does not exist"):
        Budget.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BudgetError, match=r"bad\.json' is not valid JSON"):
        Budget.load(bad)
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(BudgetError, match=r"bad\.json': not an ats-vit budget"):
        Budget.load(bad)
    bad.write_text(json.dumps({**Budget(0, (4,)).to_dict(), "colour": "blue"}))
    with pytest.raises(BudgetError, match=r"bad.json' has unknown fields \['colour'\]"):
        Budget.load(bad)
    bad.write_text(json.dumps({**Budget(0, (4,)).to_dict(), "caps": [4, 8]}))
    with pytest.raises(BudgetError, match=r"bad\.json': caps must be non-increasing"):
        Budget.load(bad)


def test_apply_configures_every_layer_of_our_vit_in_place():
    model = peaky_vit()
    modules = model.sampling_layers()
    Budget(2, (8, 4), temperature=2.0, dropped="fuse").apply(model)
    assert model.max_tokens_per_depth == (16, 16, 8, 4)
    assert model.sampling_layers() == modules
    assert {m.options for m in modules} == {SamplingOptions(temperature=2.0, dropped="fuse")}
    assert not any(m.training for m in modules)
    with pytest.raises(TypeError, match=r"ats-vit serves .* got Linear"):
        Budget(2, (8, 4)).apply(torch.nn.Linear(2, 2))


def test_the_paper_budget_is_the_constructor_schedule():
    x = images(4, 1)
    model = peaky_vit()
    Budget.paper(0.375, 1, depth=4, num_patches=16).apply(model)
    assert Budget.paper(0.375, 1, 4, 16).caps == (6, 6, 6)
    reference = peaky_vit((16, 6, 6, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    with pytest.raises(BudgetError, match=r"keep must be a ratio in \(0, 1\]"):
        Budget.paper(0.0, 1, 4, 16)
    with pytest.raises(BudgetError, match=r"start_layer must be in \[0, 4\)"):
        Budget.paper(0.5, 4, 4, 16)


# every path that applies a budget to a model: each must refuse one made for another model
def _apply(model, budget):
    budget.apply(model)


def _configure(model, budget):
    configure(family_of(model), budget)


def _measure(model, budget):
    measure(model, images(2), budget)


def _time(model, budget):
    time_budgets(model, [None, budget], images(2), repeats=1)


def _evaluate(model, budget):
    data = torch.utils.data.TensorDataset(images(4), torch.zeros(4, dtype=torch.long))
    evaluate_budgets(model, data, [("dense", None), ("b", budget)], timing_repeats=0, progress=False)


PATHS = [_apply, _configure, _measure, _time, _evaluate]


@pytest.mark.parametrize("path", PATHS, ids=[p.__name__.strip("_") for p in PATHS])
@pytest.mark.parametrize(
    ("budget", "match"),
    [
        (
            Budget(2, (8, 4, 4), depth=5, num_patches=16),
            "made for a model with depth=5; ats_vit.ViT has depth=4",
        ),
        (
            Budget(2, (8, 4), depth=4, num_patches=64),
            r"num_patches=64; ats_vit.ViT has num_patches=16 \(another",
        ),
        (Budget(0, (8, 4, 4)), "covers 3 layers"),
    ],
    ids=["depth", "image-size", "length"],
)
def test_a_budget_for_another_model_is_refused_on_every_path(path, budget, match):
    model = peaky_vit()
    before = model.max_tokens_per_depth
    with pytest.raises(BudgetError, match=match):
        path(model, budget)
    assert model.max_tokens_per_depth == before, "nothing was configured"


def test_the_error_names_the_budget_file(tmp_path):
    path = Budget(2, (8, 4), depth=4, num_patches=64).save(tmp_path / "deit-224.json")
    with pytest.raises(
        BudgetError, match=r"budget file '.*deit-224.json' was made for a model with num_patches=64"
    ):
        Budget.load(path).apply(peaky_vit())


def test_evaluate_budgets_checks_every_budget_before_any_work(monkeypatch):
    import ats_vit.evaluate

    calls = []
    monkeypatch.setattr(ats_vit.evaluate, "evaluate", lambda *a, **k: calls.append(1))
    good, bad = Budget(2, (8, 4)), Budget(1, (8, 4, 4), num_patches=64)
    with pytest.raises(BudgetError):
        evaluate_budgets(
            peaky_vit(), tiny_data(4), [("dense", None), ("good", good), ("bad", bad)], timing_repeats=0
        )
    assert not calls, "no evaluation ran before the bad budget was found"


def _families():
    """One small model of each family, each set to run with static shapes."""
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    from helpers import HF_TINY

    import ats_vit.hf as ats_hf
    import ats_vit.timm as ats_timm

    static = SamplingOptions(static_shape=True)
    ours = small_vit().eval().set_sampling((16,) * 4, static)
    t = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10).eval()
    h = transformers.ViTForImageClassification(transformers.ViTConfig(**HF_TINY)).eval()
    return [ours, ats_timm.apply(t, caps=None, options=static), ats_hf.apply(h, caps=None, options=static)]


def test_static_shape_is_honoured_by_every_family():
    for model in _families():
        family = family_of(model)
        budget = Budget(1, tuple([8] * (family.depth - 1)), dropped="fuse")
        budget.apply(model)
        assert family.options() == SamplingOptions(dropped="fuse", static_shape=True), type(model).__name__
        with torch.no_grad():
            family.run(images(3))
        # static shapes pad to the cap: the output grid is exactly prefix + cap + the fused token wide
        assert family.last_state().positions.shape[1] == family.num_prefix_tokens + 8 + 1
        budget.apply(model, static_shape=False)
        assert not family.options().static_shape


def test_schedule_fills_the_layers_before_the_start():
    assert Budget(1, (20, 8, 8), depth=SMALL["depth"]).schedule(4, 16) == (16, 16, 8, 8)


# a budget file as 0.2 wrote it (`ats-vit calibrate`, the demo's 50% budget), hybrid fields included
BUDGET_0_2 = {
    "format": "ats-vit-budget/2",
    "start_layer": 2,
    "caps": [18, 13, 9, 6, 4, 3],
    "sampler": "inverse_transform",
    "temperature": 0.4129,
    "dropped": "fuse",
    "depth": 8,
    "num_patches": 36,
    "method": "ats-fuse",
    "target": 0.5,
    "cost": "gflops",
    "calibration": {"cost": "gflops", "gflops_ratio": 0.497, "accuracy": 0.95, "images": 512},
    "early_layers": 0,
    "early_sampler": None,
    "early_dropped": None,
}


def test_budget_files_of_0_2_still_load_and_hybrid_ones_are_refused_by_name(tmp_path):
    path = tmp_path / "budget-0.5.json"
    path.write_text(json.dumps(BUDGET_0_2))
    budget = Budget.load(path)
    assert (budget.start_layer, budget.caps, budget.dropped, budget.method) == (
        2,
        (18, 13, 9, 6, 4, 3),
        "fuse",
        "ats-fuse",
    )
    assert "early_layers" not in budget.to_dict()
    path.write_text(json.dumps({**BUDGET_0_2, "early_layers": 3, "early_sampler": "tome"}))
    with pytest.raises(BudgetError, match=r"budget-0.5.json' is a hybrid budget \(early_layers=3\)"):
        Budget.load(path)


def test_a_failed_save_keeps_the_old_budget_file(tmp_path, monkeypatch):
    """A full disk (simulated: the flush to disk fails) or Ctrl-C mid-write used to leave the
    budget JSON at 0 bytes."""
    import errno

    import ats_vit._io as io

    path = Budget(1, (12, 8, 4), depth=4, num_patches=16).save(tmp_path / "b.json")
    before = path.read_bytes()

    def full(_fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    for failure in (full, lambda _fd: (_ for _ in ()).throw(KeyboardInterrupt)):
        with monkeypatch.context() as m:
            m.setattr(io.os, "fsync", failure)
            with pytest.raises((OSError, KeyboardInterrupt)):
                Budget(1, (6, 3, 2), depth=4, num_patches=16).save(path)
        assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["b.json"]
    from ats_vit._io import default_mode

    assert path.stat().st_mode & 0o777 == default_mode(), "an ordinary file, not a private temporary one"


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("calibration", "x", "calibration must be a mapping"),
        ("calibration", [1, 2], "calibration must be a mapping"),
        ("target", 1.5, r"target must be None or a fraction of the dense cost in \(0, 1\]"),
        ("target", "half", "target must be None or a fraction"),
        ("method", 3, "method must be a string or None"),
        ("depth", "8", "depth must be an int"),
        ("caps", "18", "caps must be a non-empty sequence of ints"),
        ("temperature", None, "temperature must be a float"),
    ],
)
def test_every_field_of_a_budget_file_is_checked_naming_the_file(tmp_path, field, value, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**BUDGET_0_2, field: value}))
    with pytest.raises(BudgetError, match=f"budget file '.*bad.json': .*{match}"):
        Budget.load(path)


def test_a_budget_file_without_its_model_sizes_loads_with_a_warning(tmp_path):
    path = tmp_path / "hand.json"
    path.write_text(json.dumps({**BUDGET_0_2, "depth": None, "num_patches": None}))
    with pytest.warns(UserWarning, match=r"hand.json' records no depth and no num_patches"):
        Budget.load(path)


def test_caps_above_the_models_patches_are_not_clamped_silently():
    """A budget that records no patch count, applied to a model with fewer patches than its
    caps, drops nothing there: say so instead of reporting a cut that is not made."""
    model = small_vit()
    with pytest.warns(
        UserWarning, match=r"caps layers \[1, 2, 3\] above the model's 16 patches.*drops nothing"
    ):
        Budget(1, (30, 20, 18)).apply(model)
