import pytest
import torch
from helpers import measured_gflops

from ats_vit import SamplingOptions, ViT
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.options import Rule

DEIT_S = dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6, mlp_dim=1536)


def test_dense_deit_small_is_the_published_count():
    model = ViT(**DEIT_S, max_tokens_per_depth=(196,) * 12).eval()
    with torch.no_grad():
        trace = model.forward_tokens(torch.randn(1, 3, 224, 224))[1].trace
    n, d, hidden = 197, 384, 1536
    per_block = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    expected = (12 * per_block + 196 * 768 * d + d * 1000) / 1e9
    assert gflops(model.cost, trace).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(4.6, abs=0.01)  # DeiT-S as published


@pytest.mark.parametrize(
    "schedule",
    [(196,) * 12, (196,) * 3 + (108,) * 9, (150, 100, 80, 80, 60, 60, 40, 40, 20, 20, 10, 10)],
    ids=["dense", "paper", "steep"],
)
def test_analytic_count_matches_pytorch_flop_counter(schedule):
    torch.manual_seed(0)
    model = ViT(**DEIT_S, max_tokens_per_depth=schedule).eval()
    x = torch.randn(1, 3, 224, 224)  # batch 1: no padding, so every computed token is real
    traces = []

    def run():
        feats, state = model.forward_tokens(x)
        model.forward_head(feats)
        traces.append(state.trace)

    measured = measured_gflops(run)
    assert gflops(model.cost, traces[0]).item() == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize(
    "rule",
    [
        dict(temperature=3.0),
        dict(dropped="fuse"),
        dict(sampler="topk", dropped="fuse"),
        dict(sampler="tome"),
        dict(sampler="pitome"),
        dict(sampler="official"),
        dict(sampler="topk"),
        dict(sampler="dct"),
    ],
    ids=["hot", "fuse", "evit", "tome", "pitome", "official", "topk", "dct"],
)
def test_analytic_count_of_every_rule_matches_pytorch_flop_counter(rule):
    """The counter sees every matmul (similarities included) but not the weighted merging
    itself (an index-add: one multiply-add per element of what is merged: the residual and the
    normalised input before the queries, or the residual after attention for ToMe), which the
    analytic count adds. The cosine transform is a matmul: the counter sees it."""
    torch.manual_seed(0)
    schedule = (196,) * 2 + (150, 120, 100, 100, 80, 60, 40, 40, 20, 20)
    model = ViT(**DEIT_S, max_tokens_per_depth=schedule, options=SamplingOptions(**rule)).eval()
    x = torch.randn(1, 3, 224, 224)
    traces = []

    def run():
        feats, state = model.forward_tokens(x)
        model.forward_head(feats)
        traces.append(state.trace)

    run()  # builds what is cached per shape (the cosine transform's matrix), not per image
    measured = measured_gflops(run)
    trace = traces[-1]
    assert trace.rules[2] == model.blocks[2].attn.ats.rule
    n_in = [197] + [int(c) + 1 for c in trace.kept_per_layer()[0, :-1]]
    merged = {Rule.FUSE: 2, Rule.TOME: 1, Rule.PITOME: 1}
    merging = sum(merged.get(r, 0) * n * 384 for n, r in zip(n_in, trace.rules, strict=True))
    assert gflops(model.cost, trace).item() == pytest.approx(measured + merging / 1e9, rel=1e-6)


def test_fewer_tokens_cost_less_and_counts_are_per_image():
    cost = ViTCost(
        num_patches=16,
        num_prefix_tokens=1,
        dim=8,
        heads=2,
        attn_dim=8,
        mlp_hidden=16,
        patch_dim=12,
        num_classes=3,
        depth=2,
    )
    trace = TokenTrace(16, 1)
    trace.counts = [torch.tensor([16, 16]), torch.tensor([10, 4])]
    trace.rules, trace.received = [None, Rule.SCORE], [False, False]
    per_image = gflops(cost, trace)
    assert per_image.shape == (2,) and per_image[0] > per_image[1]


def test_trace_of_wrong_depth_is_rejected():
    cost = ViTCost(16, 1, 8, 2, 8, 16, 12, 3, depth=2)
    trace = TokenTrace(16, 1, counts=[torch.tensor([16])], rules=[None])
    with pytest.raises(ValueError, match="trace has 1 blocks but the model has depth=2"):
        gflops(cost, trace)
