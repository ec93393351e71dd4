import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import image_folder_tree, timed_by_key, tiny_data, torchrun

from ats_vit import family_of
from ats_vit.budget import Budget
from ats_vit.checkpoint import load_model
from ats_vit.data import BadImageError, image_folder
from ats_vit.evaluate import evaluate, evaluate_budgets
from ats_vit.flops import gflops
from ats_vit.timing import Timing

BUDGET = Budget(1, (6, 3), temperature=2.0, dropped="fuse")


def test_evaluate_budgets_rows_and_timing(tiny_checkpoint, monkeypatch):
    """On a fake clock a dense pass takes 8 ms, the paper's budget 4 ms and the fused one
    5 ms: each row's throughput and speed-up are then known exactly."""
    import ats_vit.evaluate as evaluate

    seconds = {"0": 8e-3, "1": 4e-3, "2": 5e-3}
    timed_by_key(monkeypatch, evaluate, seconds.__getitem__)
    model, _ = load_model(tiny_checkpoint)
    budgets = [("dense", None), ("keep 0.25", Budget.paper(0.25, 1, 3, 16)), ("fuse", BUDGET)]
    rows = evaluate_budgets(model, tiny_data(48, seed=1), budgets, timing_repeats=3, timing_batch=16)
    assert [r["label"] for r in rows] == ["dense", "keep 0.25", "fuse"]
    assert rows[0]["budget"] is None and Budget.from_dict(rows[2]["budget"]) == BUDGET
    assert rows[0]["gflops"] > rows[1]["gflops"] and rows[0]["gflops_ratio"] == 1.0
    # the fused token comes on top of the cap
    assert rows[1]["kept_per_layer"][-1] <= 4 and rows[2]["kept_per_layer"][-1] <= 3 + 1
    for i, r in enumerate(rows):
        assert r["images"] == 48 and r["timing_images"] == 16
        for key in ("img_per_s", "img_per_s_q1", "img_per_s_q3"):
            assert r[key] == pytest.approx(16 / seconds[str(i)]), (r["label"], key)
        for key in ("speedup", "speedup_q1", "speedup_q3"):
            assert r[key] == pytest.approx(8e-3 / seconds[str(i)]), (r["label"], key)
    assert rows[0]["vs_dense_diff"] == 0.0 and rows[0]["vs_dense_p"] == 1.0
    for r in rows[1:]:  # paired with dense on the same 48 images
        dense_hits = evaluate.evaluate(model, tiny_data(48, seed=1))["accuracy"]
        assert r["vs_dense_diff"] == pytest.approx(r["accuracy"] - dense_hits)
        assert 0 < r["vs_dense_p"] <= 1
    assert model.max_tokens_per_depth == (16, 16, 16), "the model is left dense"
    untimed = evaluate_budgets(model, tiny_data(8), budgets[:1], timing_repeats=0)
    assert math.isnan(untimed[0]["img_per_s"]) and untimed[0]["timing_images"] == 0


def test_throughput_on_a_split_smaller_than_the_timing_batch_counts_what_ran(tiny_checkpoint, monkeypatch):
    """With 8 images and a timing batch of 64, each timed pass runs 8 images: img/s = 8 / s."""
    import ats_vit.evaluate

    seen = []

    def fake_time(model, budgets, images, *, repeats, warmup=1, dtype=None):
        seen.append(len(images))
        return [Timing((0.5, 0.5, 0.5)), Timing((0.25, 0.25, 0.25))]

    monkeypatch.setattr(ats_vit.evaluate, "time_budgets", fake_time)
    model, _ = load_model(tiny_checkpoint)
    budgets = [("dense", None), ("keep 0.25", Budget.paper(0.25, 1, 3, 16))]
    rows = evaluate_budgets(model, tiny_data(8), budgets, timing_repeats=3, timing_batch=64)
    assert seen == [8]
    assert [r["timing_images"] for r in rows] == [8, 8]
    assert [r["img_per_s"] for r in rows] == [16.0, 32.0]
    assert rows[1]["speedup"] == 2.0


def test_unreadable_images_are_named_or_skipped_and_counted(tmp_path):
    pytest.importorskip("torchvision")
    root = image_folder_tree(tmp_path / "data", splits=("val",))
    bad = root / "val" / "class1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    data = image_folder(root / "val", 32)
    broken = next(i for i, (path, _) in enumerate(data.samples) if path.endswith("broken.png"))
    with pytest.raises(BadImageError, match=r"broken\.png"):
        data[broken]
    from ats_vit import ViT

    model = ViT(
        image_size=32,
        patch_size=8,
        num_classes=2,
        dim=16,
        depth=2,
        heads=2,
        dim_head=8,
        mlp_dim=32,
        max_tokens_per_depth=(16, 16),
    ).eval()
    with pytest.raises(BadImageError, match=r"broken\.png"):
        evaluate(model, image_folder(root / "val", 32))
    result = evaluate(model, image_folder(root / "val", 32, skip_bad=True), batch_size=3)
    assert result["images"] == 8 and result["skipped"] == 1


@pytest.mark.distributed
def test_ddp_evaluation_equals_one_process_exactly(tmp_path, tiny_checkpoint):
    """2 gloo processes split 51 images (unevenly) and all-reduce: the same numbers, exactly."""
    script = tmp_path / "ddp_eval.py"
    out = tmp_path / "ddp.json"
    script.write_text(
        textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from helpers import tiny_data
        from test_evaluate import BUDGET
        from ats_vit.checkpoint import load_model
        from ats_vit.distributed import finish, init_distributed, rank_world
        from ats_vit.evaluate import evaluate
        torch.set_num_threads(1)
        init_distributed()
        model, _ = load_model({str(tiny_checkpoint)!r})
        BUDGET.apply(model)
        result = evaluate(model, tiny_data(51, seed=3), batch_size=8)
        if rank_world()[0] == 0:
            open({str(out)!r}, "w").write(json.dumps(dict(world=rank_world()[1], **result)))
        finish()
    """)
    )
    torchrun(script, 29519)
    distributed = json.loads(out.read_text())
    model, _ = load_model(tiny_checkpoint)
    BUDGET.apply(model)
    alone = evaluate(model, tiny_data(51, seed=3), batch_size=8)
    assert distributed.pop("world") == 2
    assert distributed == alone, "accuracy, kept tokens and GFLOPs add up exactly"


def test_evaluate_counts_the_flops_of_the_tokens_kept(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    BUDGET.apply(model.eval())
    images = tiny_data(5).tensors[0]
    with torch.no_grad():
        trace = model.forward_tokens(images)[1].trace
    assert family_of(model).cost is model.cost
    result = evaluate(model, tiny_data(5))
    assert result["gflops"] == pytest.approx(gflops(model.cost, trace).double().mean().item(), rel=1e-6)


def test_the_interval_counts_independent_items_not_images():
    """Three copies of each of 20 images are 20 items: the interval is a bootstrap over them,
    wider than the 60 images would claim; items of the wrong length are refused."""
    from helpers import TINY
    from torch.utils.data import TensorDataset

    from ats_vit.models import build_model
    from ats_vit.stats import binomial_ci95

    torch.manual_seed(0)
    model = build_model(TINY)
    images, labels = tiny_data(20, seed=4).tensors
    copies = TensorDataset(images.repeat(3, 1, 1, 1), labels.repeat(3))
    alone = evaluate(model, copies)
    assert alone["items"] == 60 and alone["ci95"] == binomial_ci95(alone["accuracy"], 60)
    assert 0 < alone["accuracy"] < 1, "a random model, so the interval is not empty"
    grouped = evaluate(model, copies, items=torch.arange(60) % 20)
    assert grouped["items"] == 20 and grouped["accuracy"] == alone["accuracy"]
    # copies always agree, so resampling 20 items is about sqrt(3) wider than 60 images
    assert grouped["ci95"] > 1.4 * alone["ci95"]
    with pytest.raises(ValueError, match="items"):
        evaluate(model, copies, items=torch.arange(20))


def test_evaluating_only_unreadable_images_is_a_clear_error(tmp_path, tiny_checkpoint):
    """All images unreadable with --skip-bad-images divided by zero."""
    pytest.importorskip("torchvision")  # image folders
    from helpers import image_folder_tree

    root = image_folder_tree(tmp_path / "data", splits=("val",), size=16, mode="L")
    for png in root.rglob("*.png"):
        png.write_bytes(b"not an image")
    model, _ = load_model(tiny_checkpoint)
    data = image_folder(root / "val", 16, channels=1, skip_bad=True)
    with pytest.raises(ValueError, match="no readable images to evaluate: all 8 were unreadable"):
        evaluate_budgets(model, data, [("dense", None)], timing_repeats=0)


def test_images_with_nan_are_refused_where_they_enter_evaluation(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint)
    images, labels = tiny_data(8).tensors
    images = images.clone()
    images[4, 0, 1, 1] = float("nan")
    from torch.utils.data import TensorDataset

    with pytest.raises(
        ValueError, match=r"1 of the 8 images of this batch hold NaN or infinite values .*index 4"
    ):
        evaluate(model, TensorDataset(images, labels))


@pytest.mark.parametrize("arch", ["timm", "timm-gap"])
def test_attention_entropy_equals_timms_own_attention_maps(arch):
    """The reference reads timm's unfused attention matrices: the CLS row over the patches
    (a CLS model), the attention each patch receives averaged over the queries (a GAP model)."""
    from ats_vit.evaluate import attention_entropy
    from ats_vit.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        arch=arch,
        image_size=16,
        patch_size=4,
        num_classes=3,
        channels=1,
        dim=16,
        depth=3,
        heads=2,
        dim_head=8,
        mlp_dim=32,
    )
    model = build_model(cfg).eval()
    with torch.no_grad():  # sharper than at initialisation, so the layers differ
        for block in model.blocks:
            block.attn.qkv.weight.mul_(60.0)
    images = tiny_data(10).tensors[0]
    family = family_of(model)
    family.set_schedule([10, 16, 12])
    before = (family.caps(), family.layer_options())
    got = attention_entropy(model, images, batch_size=4)
    assert (family.caps(), family.layer_options()) == before  # the model's schedule is kept

    from timm.models.vision_transformer import VisionTransformer

    plain = VisionTransformer(
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=3,
        embed_dim=16,
        depth=3,
        num_heads=2,
        mlp_ratio=2.0,
        class_token=arch == "timm",
        global_pool="token" if arch == "timm" else "avg",
    ).eval()
    plain.load_state_dict(model.state_dict())
    maps = []
    for block in plain.blocks:
        block.attn.fused_attn = False
        block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out))
    with torch.no_grad():
        plain(images)
    expected = []
    for attn in maps:  # (b, h, n, n)
        rows = attn[:, :, 0, 1:] if arch == "timm" else attn.mean(2)
        share = rows.double() / rows.double().sum(-1, keepdim=True)
        expected.append(float((-(share * share.log()).sum(-1) / math.log(16)).mean()))
    assert got == pytest.approx(expected, abs=1e-6)
    assert all(0 < e < 0.97 for e in expected) and len({round(e, 3) for e in expected}) == 3
