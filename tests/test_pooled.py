"""The ViTs people deploy, in timm: CLIP, SigLIP (MAP head), DINOv2 (registers), MAE, DeiT-III,
global-average-pooled models. Built by name with small sizes and random weights (no downloads),
so each keeps its family's own readout, prefix tokens, norms and layer scale."""

import copy

import pytest
import torch
from helpers import images

timm = pytest.importorskip("timm")

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

import ats_vit.timm as ats_timm  # noqa: E402
from ats_vit import SamplingOptions, family_of  # noqa: E402
from ats_vit.attention import received_attention  # noqa: E402
from ats_vit.flops import TokenTrace, ViTCost, flops  # noqa: E402
from ats_vit.options import Rule  # noqa: E402
from ats_vit.sampling import AdaptiveTokenSampling, Padding  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

SMALL = dict(img_size=32, depth=3, embed_dim=32, num_heads=2, num_classes=10)
# name -> (timm architecture, extra arguments, how it is scored)
DEPLOYED = {
    "clip": ("vit_base_patch16_clip_224", dict(patch_size=8), "cls"),
    "siglip-map": ("vit_base_patch16_siglip_224", dict(patch_size=8), "received"),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, patch_size=7), "cls"),
    "dinov2-registers": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, patch_size=7), "cls"),
    "mae-features": ("vit_base_patch16_224.mae", dict(patch_size=8, num_classes=0, global_pool=""), "cls"),
    "mae-gap": ("vit_base_patch16_224.mae", dict(patch_size=8, global_pool="avg", fc_norm=True), "received"),
    "deit3": ("deit3_small_patch16_224", dict(patch_size=8), "cls"),
    "gap-no-cls": ("vit_medium_patch16_gap_256", dict(patch_size=8), "received"),
    "avgmax": ("vit_medium_patch16_gap_256", dict(patch_size=8, global_pool="avgmax"), "received"),
}


def make(name: str, seed: int = 0, peaked: float | None = None) -> VisionTransformer:
    arch, extra, _ = DEPLOYED[name]
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, **{**SMALL, **extra}).eval()
    return model if peaked is None else sharpen_queries(model, peaked)


def inputs(model: VisionTransformer, batch: int, seed: int = 0) -> torch.Tensor:
    return images(batch, seed, size=model.patch_embed.img_size[0])


@pytest.mark.parametrize("name", DEPLOYED)
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
def test_budget_that_drops_nothing_equals_the_unpatched_model(name, fused):
    model = make(name)
    for block in model.blocks:  # the reference runs timm's fused or its explicit attention
        block.attn.fused_attn = fused
    reference = copy.deepcopy(model)
    x = inputs(model, 3)
    with torch.no_grad():
        ats_timm.apply(model, caps=model.patch_embed.num_patches)
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        assert family_of(model).scoring == DEPLOYED[name][2]
        ats_timm.remove(model)
        assert "pool" not in model.__dict__
        torch.testing.assert_close(model(x), reference(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["siglip-map", "gap-no-cls", "avgmax", "dinov2-registers"])
@pytest.mark.parametrize(
    "rule",
    [
        dict(temperature=0.1),
        dict(temperature=0.1, dropped="fuse"),
        dict(sampler="topk"),
        dict(sampler="tome"),
        dict(sampler="pitome"),
        dict(sampler="dct"),
    ],
)
def test_batch_equals_each_image_alone(name, rule):
    """Images keep different counts (padding) and merged tokens carry sizes: pooling and the
    received-attention scores must ignore the padding and weigh by size, as one image alone.
    (Peaked queries and a low temperature make the counts differ between images.)"""
    model = make(name, peaked=30.0)
    x = inputs(model, 8, seed=1)
    caps = [8, 5, 4]
    with torch.no_grad():
        ats_timm.apply(model, caps=caps, options=SamplingOptions(**rule))
        batch = model(x)
        counts = ats_timm.last_info(model).kept_per_layer
        alone = torch.cat([model(x[i : i + 1]) for i in range(8)])
    if "temperature" in rule:
        assert counts.unique(dim=0).shape[0] > 1, "the test needs images that keep different counts"
    torch.testing.assert_close(batch, alone, atol=2e-5, rtol=2e-5)


def test_average_pool_weighs_merged_tokens_by_their_patches():
    model = make("gap-no-cls", peaked=8.0)
    x = inputs(model, 2)
    with torch.no_grad():
        ats_timm.apply(model, caps=(5, 16), start_layer=1, options=SamplingOptions(sampler="tome"))
        features = model.forward_features(x)
        state = family_of(model).last_state()
        size = state.size
        expected = (features * size[..., None]).sum(1) / size.sum(1, keepdim=True)
        torch.testing.assert_close(model.forward_head(features, pre_logits=True), model.fc_norm(expected))
    assert (size > 1).any() and (size.sum(1) == model.patch_embed.num_patches).all()


def test_received_attention_is_the_mean_attention_each_key_receives(monkeypatch):
    monkeypatch.setattr("ats_vit.attention.RECEIVED_CHUNK", 3)  # several chunks
    torch.manual_seed(0)
    q, k = torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 4)
    mask = torch.tensor([[True] * 7, [True] * 5 + [False] * 2])
    attn = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~mask[:, None, None], float("-inf")).softmax(-1)
    expected = (attn * mask[:, None, :, None]).sum(2) / mask.sum(-1)[:, None, None]
    got = received_attention(q, k, mask, 0.5, Padding(mask, None))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[1, :, :5].sum(-1), torch.ones(2))  # padding receives nothing
    alone = received_attention(q[1:, :, :5], k[1:, :, :5], None, 0.5, None)
    torch.testing.assert_close(got[1:, :, :5], alone)


def test_received_scoring_costs_every_querys_logits():
    cost = ViTCost(16, 0, 32, 2, 32, 64, 48, 10, 2)
    counts = [torch.tensor([8]), torch.tensor([8])]

    def total(rule, received=False):
        trace = TokenTrace(16, 0, counts=counts, rules=[rule, None], received=[received, False])
        return flops(cost, trace).item()

    n_in, n_out, d, a, h = 16, 8, 32, 32, 2
    # CLS scoring: one query and its row; received: the other n_in - n_out queries and all logits
    cls_scoring = d * a + n_in * a
    received = (n_in - n_out) * d * a + n_in * n_in * a
    assert total(Rule.SCORE, received=True) - total(Rule.SCORE) == received - cls_scoring
    assert total(Rule.FUSE, received=True) - total(Rule.SCORE, received=True) == n_in * (d + a) + 0 * h


def test_received_scoring_serves_models_without_prefix_tokens():
    with pytest.raises(ValueError, match="num_prefix_tokens must be >= 1"):
        AdaptiveTokenSampling(4, num_prefix_tokens=0)
    assert AdaptiveTokenSampling(4, num_prefix_tokens=0, scoring="received").rule == Rule.SCORE
    with pytest.raises(ValueError, match="scoring must be one of"):
        AdaptiveTokenSampling(4, scoring="probe")


def test_unsupported_pooling_is_named():
    class OwnPool(VisionTransformer):
        def pool(self, x, pool_type=None):
            return x.mean(1)

    with pytest.raises(TypeError, match=r"overrides VisionTransformer\.pool"):
        ats_timm.apply(OwnPool(**SMALL, patch_size=8), caps=4)


@pytest.mark.parametrize("name", ["siglip-map", "dinov2-registers"])
def test_restore_gives_every_patch_back(name):
    model = make(name, peaked=30.0)
    x = inputs(model, 3)
    num, prefix = model.patch_embed.num_patches, model.num_prefix_tokens
    with torch.no_grad():
        dense = model.forward_features(x)
        ats_timm.apply(model, caps=num, options=SamplingOptions(restorable=True))
        torch.testing.assert_close(
            ats_timm.restore(model, model.forward_features(x)), dense, atol=1e-5, rtol=1e-5
        )
        ats_timm.apply(model, caps=(8, 4), start_layer=1, options=SamplingOptions(restorable=True))
        features = model.forward_features(x)
        full = ats_timm.restore(model, features)
    assert features.shape[1] < prefix + num and full.shape == (3, prefix + num, 32)
    torch.testing.assert_close(full[:, :prefix], features[:, :prefix])
