import pytest
import torch

timm = pytest.importorskip("timm")

from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import Attention, Block, ResPostBlock, VisionTransformer  # noqa: E402


class GatedAttention(Attention):
    """timm's Attention with its sigmoid output gate on (the forward is timm's own)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, gated=True, **kwargs)


from helpers import NUM_PATCHES, images  # noqa: E402

import ats_vit.timm as ats_timm  # noqa: E402
from ats_vit import SamplingOptions, family_of  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)

FAMILIES = {
    "cls": lambda: VisionTransformer(**SMALL),
    "distilled": lambda: VisionTransformerDistilled(**SMALL),
    "registers": lambda: VisionTransformer(**SMALL, reg_tokens=4),
    "qknorm-layerscale-nobias": lambda: VisionTransformer(
        **SMALL, qk_norm=True, init_values=0.1, qkv_bias=False
    ),
    "scale-norm": lambda: VisionTransformer(**SMALL, scale_attn_norm=True, scale_mlp_norm=True),
    "gated": lambda: VisionTransformer(**SMALL, attn_layer=GatedAttention),
}


def make(family: str, seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def sharpen(model: VisionTransformer, factor: float = 50.0) -> VisionTransformer:
    """Peaked CLS attention, as in trained models, so images keep different counts."""
    return sharpen_queries(model, factor)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("cap", [NUM_PATCHES, 1000])
def test_budget_that_drops_nothing_is_exact(family, cap):
    model = make(family)
    x = images(3)
    with torch.no_grad():
        reference = model(x)
        ats_timm.apply(model, caps=cap)
        patched = model(x)
    torch.testing.assert_close(patched, reference, atol=1e-5, rtol=1e-5)
    info = ats_timm.last_info(model)
    assert torch.equal(info.token_ids, torch.arange(NUM_PATCHES).expand(3, -1))
    assert (info.kept_per_layer == NUM_PATCHES).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_block_outputs_equal_the_dense_rows(family):
    """Keys stay complete, so each kept token's output is exactly the dense block's."""
    model = sharpen(make(family))
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(images(4))))
        dense = model.blocks[0](tokens)
        ats_timm.apply(model, caps=(6, 16, 16, 16))
        sampled = model.blocks[0](tokens)
    state = family_of(model).carrier.state  # white-box: one block ran, not a whole pass
    real = torch.ones_like(state.positions, dtype=torch.bool) if state.padding is None else state.padding.mask
    assert sampled.shape[1] < tokens.shape[1]
    for i in range(4):
        rows = state.positions[i][real[i]]
        torch.testing.assert_close(sampled[i][real[i]], dense[i, rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_tokens_are_always_kept(family):
    model = sharpen(make(family))
    p = model.num_prefix_tokens
    ats_timm.apply(model, caps=(6, 3, 16), start_layer=1)
    with torch.no_grad():
        model(images(5))
    positions = family_of(model).last_state().positions  # original token positions still alive
    assert torch.equal(positions[:, :p], torch.arange(p).expand(5, p))
    info = ats_timm.last_info(model)
    assert (info.kept_per_layer[:, 1] <= 6).all() and (info.kept_per_layer[:, 2:] <= 3).all()
    for row in info.token_ids:
        real = row[row >= 0]
        assert torch.all(real[1:] > real[:-1]) and real.max() < NUM_PATCHES


def test_remove_restores_exact_behaviour_and_leaves_no_trace():
    model = make("cls")
    x = images(4)
    keys = set(model.state_dict())
    with torch.no_grad():
        reference = model(x)
        ats_timm.apply(model, caps=4, start_layer=1)
        dropped = model(x)
        ats_timm.remove(model)
        restored = model(x)
    assert not torch.allclose(dropped, reference), "the budget should change the output"
    assert torch.equal(restored, reference)
    assert set(model.state_dict()) == keys
    assert not ats_timm.is_patched(model)
    assert all("forward" not in block.__dict__ and not hasattr(block, "ats") for block in model.blocks)


def test_patching_one_instance_leaves_others_untouched():
    original = Block.forward
    a, b = make("cls"), make("cls")
    x = images(2)
    with torch.no_grad():
        reference = b(x)
        ats_timm.apply(a, caps=3)
        a(x)
        assert torch.equal(b(x), reference)
    assert Block.forward is original, "the class is never patched"
    assert "forward" in vars(a.blocks[0]) and "forward" not in vars(b.blocks[0])
    assert not ats_timm.is_patched(b)


def test_applying_again_only_sets_numbers():
    """Patch once, then set numbers: the same sampling modules, reconfigured in place."""
    model = make("cls")
    ats_timm.apply(model, caps=(5, 5, 16), start_layer=1)
    modules = [block.ats for block in model.blocks]
    forwards = [vars(block)["forward"] for block in model.blocks]
    ats_timm.apply(model, caps=2, start_layer=3, options=SamplingOptions("topk"))
    assert [block.ats for block in model.blocks] == modules
    assert [vars(block)["forward"] for block in model.blocks] == forwards
    assert [m.cap for m in modules] == [NUM_PATCHES, NUM_PATCHES, NUM_PATCHES, 2]
    assert {m.sampler for m in modules} == {"topk"}


def test_state_dict_round_trips_between_patched_and_plain_models():
    patched = ats_timm.apply(make("cls", seed=1), caps=(5, 16), start_layer=2)
    plain = make("cls", seed=2)
    plain.load_state_dict(patched.state_dict())
    ats_timm.remove(patched)
    with torch.no_grad():
        torch.testing.assert_close(plain(images(2)), patched(images(2)))


def test_patched_eval_model_is_deterministic():
    model = ats_timm.apply(sharpen(make("cls")), caps=(5, 5, 16), start_layer=1)
    x = images(6)
    with torch.no_grad():
        first, ids = model(x), ats_timm.last_info(model).token_ids
        assert torch.equal(model(x), first)
        assert torch.equal(ats_timm.last_info(model).token_ids, ids)
    assert all(not m.training for m in model.modules())


def test_static_shape_matches_dynamic():
    dynamic = ats_timm.apply(sharpen(make("registers")), caps=12, start_layer=1)
    static = ats_timm.apply(
        sharpen(make("registers")),
        caps=12,
        start_layer=1,
        options=SamplingOptions(static_shape=True),
    )
    x = images(6)
    with torch.no_grad():
        torch.testing.assert_close(static(x), dynamic(x), atol=1e-5, rtol=1e-5)
    counts = ats_timm.last_info(dynamic).kept_per_layer
    assert counts[:, -1].unique().numel() > 1, "images should keep different counts"
    assert torch.equal(ats_timm.last_info(static).kept_per_layer, counts)


def test_batch_equals_each_image_alone():
    model = ats_timm.apply(sharpen(make("distilled")), caps=(7, 4, 16), start_layer=1)
    x = images(5)
    with torch.no_grad():
        batch = model(x)
        batch_ids = ats_timm.last_info(model).token_ids
        for i in range(5):
            torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)
            ids = ats_timm.last_info(model).token_ids[0]
            assert torch.equal(ids, batch_ids[i][batch_ids[i] >= 0])


def test_gflops_follow_the_budget():
    model = make("cls")
    x = images(2)
    costs = []
    for cap in (NUM_PATCHES, 8, 2):
        ats_timm.apply(model, caps=cap, start_layer=1)
        with torch.no_grad():
            model(x)
        costs.append(ats_timm.last_info(model).gflops)
    assert (costs[0] > costs[1]).all() and (costs[1] > costs[2]).all()


@pytest.mark.parametrize("sampler", ["topk", "random"])
def test_fixed_count_peers_keep_exactly_the_cap(sampler):
    model = ats_timm.apply(
        sharpen(make("distilled")), caps=(9, 5, 5), start_layer=1, options=SamplingOptions(sampler)
    )
    with torch.no_grad():
        model(images(3))
    info = ats_timm.last_info(model)
    assert info.kept_per_layer.tolist() == [[NUM_PATCHES, 9, 5, 5]] * 3
    assert (info.token_ids >= 0).all() and torch.all(info.token_ids.diff(dim=1) > 0)


def test_training_with_drop_path_reaches_every_parameter():
    torch.manual_seed(0)
    model = VisionTransformer(**SMALL, drop_path_rate=0.2, attn_drop_rate=0.1, proj_drop_rate=0.1).train()
    ats_timm.apply(model, caps=5, start_layer=1)
    model(images(4)).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_deit_small_bf16_inference_mode():
    model = timm.create_model("deit_small_patch16_224", pretrained=False).to(torch.bfloat16).eval()
    ats_timm.apply(model, caps=108, start_layer=3)
    with torch.inference_mode():
        logits = model(torch.randn(2, 3, 224, 224, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    info = ats_timm.last_info(model)
    assert (info.kept_per_layer[:, 3:] <= 108).all()
    assert (info.gflops < 4.6).all()


@pytest.mark.parametrize(
    ("make_model", "error", "match"),
    [
        (lambda: VisionTransformer(**SMALL, block_fn=ResPostBlock), TypeError, "block 0 is ResPostBlock"),
        (lambda: torch.nn.Linear(2, 2), TypeError, "timm VisionTransformer"),
    ],
    ids=["respost-block", "not-a-vit"],
)
def test_unsupported_models(make_model, error, match):
    with pytest.raises(error, match=match):
        ats_timm.apply(make_model(), caps=4)


def test_unsupported_model_error_names_the_model():
    # parallel blocks (two attentions and two MLPs side by side) are not served
    model = timm.create_model("vit_small_patch16_18x2_224", pretrained=False, img_size=32, depth=1)
    with pytest.raises(TypeError, match="vit_small_patch16_18x2_224"):
        ats_timm.apply(model, caps=4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(start_layer=4), ValueError, r"start_layer must be an int in \[0, 4\)"),
        (dict(start_layer=-1), ValueError, r"start_layer must be an int in \[0, 4\)"),
        (dict(caps=0), ValueError, "caps must be >= 1"),
        (
            dict(caps=[4, 4]),
            ValueError,
            r"caps must have one entry per layer from start_layer=0 on \(4 for depth 4\)",
        ),
        (dict(caps="8"), TypeError, "caps must be an int, a sequence of ints or None"),
        (dict(caps=[4, 4, 0, 4]), ValueError, r"caps\[2\] must be >= 1"),
        (dict(options="uniform"), TypeError, "options must be an ats_vit.SamplingOptions"),
        (dict(caps=4, max_tokens=4), TypeError, "give caps= .*, or 0.x's layers= and max_tokens=, not both"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ats_timm.apply(make("cls"), **{"caps": 4, **kwargs})


def test_caps_are_required_and_none_patches_without_dropping():
    model = make("cls")
    with pytest.raises(TypeError, match="apply\\(\\) needs caps="):
        ats_timm.apply(model)
    ats_timm.apply(model, caps=None)
    assert family_of(model).caps() == (NUM_PATCHES,) * 4
    with pytest.raises(TypeError, match="positional"):
        ats_timm.apply(model, [1, 2], 4)  # 0.x's positional layers, max_tokens: refused, not misread


@pytest.mark.parametrize(
    ("kwargs", "caps"),
    [
        (dict(layers=[1, 2], max_tokens=[6, 3]), (NUM_PATCHES, 6, 3, NUM_PATCHES)),
        (dict(max_tokens=5), (5,) * 4),
        (dict(layers=[3]), (NUM_PATCHES,) * 3 + (108,)),  # 0.x's default cap
    ],
)
def test_0_x_arguments_still_work_and_warn_at_the_callers_line(kwargs, caps):
    model = make("cls")
    with pytest.warns(
        DeprecationWarning, match=r"apply\(layers=, max_tokens=\) is deprecated .* use apply\(caps="
    ) as seen:
        ats_timm.apply(model, **kwargs)
    assert seen[0].filename == __file__, "the warning points at the caller"
    assert family_of(model).caps() == caps
    for bad, match in (
        (dict(layers=[4]), r"block indices in \[0, 4\)"),
        (dict(layers=[1, 1]), "must not repeat"),
        (dict(max_tokens=[4, 4], layers=[1]), "max_tokens has 2 entries but layers selects 1"),
    ):
        with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match=match):
            ats_timm.apply(model, **bad)


def test_info_errors_and_attn_mask():
    model = make("cls")
    with pytest.raises(ValueError, match=r"not patched: call ats_vit\.timm\.apply"):
        ats_timm.last_info(model)
    ats_timm.apply(model, caps=4)
    with pytest.raises(ValueError, match="no complete forward pass"):
        ats_timm.last_info(model)
    with pytest.raises(ValueError, match="attn_mask"):
        model.blocks[0](torch.randn(1, 17, 32), attn_mask=torch.ones(17, 17, dtype=torch.bool))
    with pytest.raises(TypeError, match="timm VisionTransformer"):
        ats_timm.remove(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    ("name", "size", "share"),
    [("vit_tiny_patch16_224", 128, None), ("eva02_tiny_patch14_224.mim_in22k", 112, 1.01)],  # EVA: rope
)
def test_adaptive_counts_attend_in_buckets_with_the_logits_of_the_whole_grid(monkeypatch, name, size, share):
    """A patched timm model whose images keep different counts (64+ tokens, batch 32) attends in
    buckets (forced for EVA, whose counts here are too alike to pay) with the logits it gives
    attending over the whole padded grid."""
    import ats_vit.attention as attention
    import ats_vit.sampling as sampling
    from ats_vit.budget import Budget

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=size, patch_size=8, depth=4, num_classes=10).eval()
    model = sharpen_queries(model, 30.0)
    Budget.paper(0.6, start_layer=1, depth=4, num_patches=(size // 8) ** 2).apply(model)
    if share is not None:
        monkeypatch.setattr(sampling, "BUCKET_MAX_SHARE", share)
    bucketed_calls = []
    real = attention.attend_padded

    def spy(*args):
        bucketed_calls.append(args[7] is not None and args[7].buckets is not None)
        return real(*args)

    monkeypatch.setattr(attention, "attend_padded", spy)
    x = torch.randn(32, 3, size, size)
    with torch.no_grad():
        bucketed = model(x)
        assert any(bucketed_calls)
        monkeypatch.setattr(sampling, "BUCKET_DEVICES", ())
        whole = model(x)
    torch.testing.assert_close(bucketed, whole, atol=1e-5, rtol=1e-5)
