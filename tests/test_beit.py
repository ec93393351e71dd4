"""timm Beit (BEiT, BEiT v2: relative position bias, layer scale): small sizes, random weights."""

import pytest
import torch
from helpers import images

timm = pytest.importorskip("timm")

import ats_vit.timm as ats_timm  # noqa: E402
from ats_vit import SamplingOptions, family_of  # noqa: E402
from ats_vit.families.timm_beit import pair_bias  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=5)
# name -> (timm architecture, extra arguments, scoring)
BEITS = {
    "beit-cls": ("beit_base_patch16_224", dict(global_pool="token"), "cls"),
    "beit-avg": ("beit_base_patch16_224", {}, "received"),
    "beitv2-avg": ("beitv2_base_patch16_224", {}, "received"),
    "beit-shared-bias": (
        "beit_base_patch16_224",
        dict(use_rel_pos_bias=False, use_shared_rel_pos_bias=True, global_pool="token"),
        "cls",
    ),
}


def make(name, fused=True, peaked=None):
    arch, extra, _ = BEITS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **{**SMALL, **extra}).eval()
    tables = [b.attn.relative_position_bias_table for b in model.blocks]
    if model.rel_pos_bias is not None:
        tables.append(model.rel_pos_bias.relative_position_bias_table)
    for table in tables:  # timm zero-inits them: a bias of 0 would test nothing
        if table is not None:
            torch.nn.init.normal_(table)
    torch.nn.init.normal_(model.head.weight)
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model if peaked is None else sharpen_queries(model, peaked)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("name", BEITS)
def test_budget_that_drops_nothing_equals_the_unpatched_model(name, fused):
    model = make(name, fused)
    x = images(3)
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)
        ats_timm.apply(model, caps=10000, options=SamplingOptions(restorable=True))
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)
        restored = ats_timm.restore(model, model.forward_features(x))
        torch.testing.assert_close(restored, features, atol=1e-5, rtol=1e-5)
        ats_timm.remove(model)
        torch.testing.assert_close(model(x), logits, atol=0, rtol=0)
    assert "forward_head" not in model.__dict__


@pytest.mark.parametrize("name", BEITS)
def test_scoring_and_batch_equals_each_image_alone(name):
    model = make(name, peaked=8.0)
    assert family_of(model).scoring == BEITS[name][2]
    x = images(5, seed=1)
    for dropped in ("discard", "fuse"):
        options = SamplingOptions(dropped=dropped, temperature=0.3)
        ats_timm.apply(model, caps=(10, 5), start_layer=1, options=options)
        with torch.no_grad():
            batch = model(x)
            kept = ats_timm.last_info(model).kept_per_layer
            assert kept.unique(dim=0).shape[0] > 1, "the test needs images that keep different counts"
            for i in range(5):
                torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["beit-cls", "beit-shared-bias"])
def test_kept_tokens_get_the_bias_of_their_grid_positions(name):
    """Sampling in the last block only: each kept token's output equals its dense output."""
    model = make(name, peaked=8.0)
    x = images(4)
    with torch.no_grad():
        dense = model.forward_features(x)
        ats_timm.apply(model, caps=5, start_layer=2)
        sampled = model.forward_features(x)
    ids = ats_timm.last_info(model).token_ids
    assert not torch.equal(ids, torch.arange(5).expand_as(ids)), "the test needs tokens off the first slots"
    expected = dense[:, 1:].gather(1, ids[..., None].expand(-1, -1, dense.shape[-1]))
    torch.testing.assert_close(sampled[:, 1:], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sampled[:, 0], dense[:, 0], atol=1e-5, rtol=1e-5)


def test_the_cosine_transform_is_refused_where_the_pair_bias_needs_positions():
    model = make("beit-cls")
    ats_timm.apply(model, caps=(10, 5), start_layer=1, options=SamplingOptions(sampler="dct"))
    with pytest.raises(ValueError, match="sampler='dct' is not supported on BEiT"):
        model(images(1))


def test_pair_bias_gathers_the_dense_table_by_query_and_key_position():
    table = torch.randn(1, 3, 7, 7)
    q = torch.tensor([[0, 4], [2, 6]])
    k = torch.tensor([[0, 4, 5], [1, 2, 6]])
    out = pair_bias(table)(q, k)
    assert out.shape == (2, 3, 2, 3)
    for i in range(2):
        torch.testing.assert_close(out[i], table[0][:, q[i]][:, :, k[i]], atol=0, rtol=0)


def test_other_beit_blocks_are_refused_by_name():
    model = make("beit-cls")

    class Other(type(model.blocks[0])):
        def forward(self, x, shared_rel_pos_bias=None):
            return x

    model.blocks[1].__class__ = Other
    with pytest.raises(TypeError, match=r"block 1 is Other with Attention; ATS supports timm's beit\.Block"):
        ats_timm.apply(model)
