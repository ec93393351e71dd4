"""timm Eva (EVA-02 / EVA-CLIP towers, rotary position embeddings): small sizes, random weights."""

import pytest
import torch
from helpers import images

timm = pytest.importorskip("timm")

import ats_vit.timm as ats_timm  # noqa: E402
from ats_vit import SamplingOptions, family_of  # noqa: E402
from ats_vit.calibrate import calibrate  # noqa: E402
from ats_vit.evaluate import measure  # noqa: E402
from ats_vit.families.timm_eva import rotation  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

SMALL = dict(img_size=56, depth=3, num_classes=5)
# name -> (timm architecture, extra arguments, scoring, prefix tokens)
EVAS = {
    "eva02-cls": ("eva02_tiny_patch14_224", dict(global_pool="token"), "cls", 1),
    "eva02-avg": ("eva02_tiny_patch14_224", dict(global_pool="avg"), "received", 1),
    "eva-clip-separate-qkv": (
        "eva02_tiny_patch14_224",
        dict(global_pool="token", qkv_fused=False, scale_attn_inner=False),
        "cls",
        1,
    ),
    "rope-register-gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=64), "received", 1),
}


def make(name, fused=True, peaked=None):
    arch, extra, _, _ = EVAS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, **{**SMALL, **extra}).eval()
    torch.nn.init.normal_(model.head.weight)  # timm zero-inits some heads: logits would all be 0
    for block in model.blocks:
        block.attn.fused_attn = fused
    return model if peaked is None else sharpen_queries(model, peaked)


def inputs(model, batch, seed=0):
    return images(batch, seed, size=model.patch_embed.img_size[0])


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "eager"])
@pytest.mark.parametrize("name", EVAS)
def test_budget_that_drops_nothing_equals_the_unpatched_model(name, fused):
    model = make(name, fused)
    x = inputs(model, 3)
    with torch.no_grad():
        logits, features = model(x), model.forward_features(x)
        ats_timm.apply(model, caps=10000, options=SamplingOptions(restorable=True))
        torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            ats_timm.restore(model, model.forward_features(x)), features, atol=1e-5, rtol=1e-5
        )
        ats_timm.remove(model)
        torch.testing.assert_close(model(x), logits, atol=0, rtol=0)
    assert "pool" not in model.__dict__


@pytest.mark.parametrize("name", EVAS)
def test_family_scoring_prefix_and_batch_equals_each_image_alone(name):
    _, _, scoring, prefix = EVAS[name]
    model = make(name, peaked=8.0)
    family = family_of(model)
    assert (family.scoring, family.num_prefix_tokens) == (scoring, prefix)
    x = inputs(model, 5, seed=1)
    for dropped in ("discard", "fuse"):
        options = SamplingOptions(dropped=dropped, temperature=0.3)
        ats_timm.apply(model, caps=(10, 5), start_layer=1, options=options)
        with torch.no_grad():
            batch = model(x)
            kept = ats_timm.last_info(model).kept_per_layer
            for i in range(5):
                torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-4, rtol=1e-5)
        assert (kept[:, 2] <= 5).all()


def test_kept_tokens_are_rotated_by_their_original_positions():
    """Sampling in the last block only: its keys are every token's, so each kept token's output
    (its query rotated at its grid position) must equal its output in the dense model."""
    model = make("eva02-cls", peaked=8.0)
    x = inputs(model, 4)
    with torch.no_grad():
        dense = model.forward_features(x)
        ats_timm.apply(model, caps=5, start_layer=2)
        sampled = model.forward_features(x)
    ids = ats_timm.last_info(model).token_ids
    assert ids.shape[1] == 5 and (ids >= 0).all()
    assert not torch.equal(ids, torch.arange(5).expand_as(ids)), "the test needs tokens off the first slots"
    torch.testing.assert_close(sampled[:, 0], dense[:, 0], atol=1e-5, rtol=1e-5)
    expected = dense[:, 1:].gather(1, ids[..., None].expand(-1, -1, dense.shape[-1]))
    torch.testing.assert_close(sampled[:, 1:], expected, atol=1e-5, rtol=1e-5)


def test_rotation_leaves_prefix_tokens_alone_and_rotates_patches_by_table_row():
    table = torch.randn(6, 8)  # 6 patches, head_dim 4: sin | cos
    rotate = rotation(table, num_prefix_tokens=1, half=False)
    t = torch.randn(2, 3, 4, 4)
    positions = torch.tensor([[0, 3, 1, 6], [0, 2, 5, 4]])
    out = rotate(t, positions)
    torch.testing.assert_close(out[:, :, 0], t[:, :, 0], atol=0, rtol=0)
    first = torch.zeros(1, 1, dtype=torch.long)
    alone = rotation(table[2:3], num_prefix_tokens=0, half=False)(t[:1, :, 1:2], first)
    torch.testing.assert_close(out[:1, :, 1:2], alone)


def test_calibration_hits_its_target_on_eva():
    model = make("eva02-avg", peaked=8.0)
    x = inputs(model, 32)
    budget = calibrate(model, x, 0.7, progress=False, steps=8)
    _, dense = measure(model, x, None)
    _, cost = measure(model, x, budget)
    assert (cost.mean() / dense.mean()).item() == pytest.approx(0.7, abs=0.03)


def test_what_eva_cannot_serve_is_named():
    torch.manual_seed(0)
    dropping = timm.create_model("eva02_tiny_patch14_224", pretrained=False, patch_drop_rate=0.1, **SMALL)
    with pytest.raises(ValueError, match=r"patch dropout \(create it with patch_drop_rate=0\)"):
        ats_timm.apply(dropping)
    post_norm = timm.create_model("eva02_tiny_patch14_224", pretrained=False, use_post_norm=True, **SMALL)
    with pytest.raises(TypeError, match=r"block 0 is EvaBlockPostNorm with EvaAttention; ATS supports"):
        ats_timm.apply(post_norm)


def test_after_a_selection_tokens_keep_their_rotations_and_see_only_the_alive_keys():
    """Block 1 samples, block 2 keeps all: block 2's output for each alive token equals timm's
    own EvaBlock on the full grid with the dropped tokens masked out as keys, rotated at the
    grid positions; a rotation by slot instead of position would differ."""
    from timm.models.eva import EvaBlock

    model = make("eva02-cls", peaked=8.0)
    x = inputs(model, 3)
    seen = {}
    block = model.blocks[2]
    ats_timm.apply(model, caps=(6, 16), start_layer=1)
    hooks = [
        block.register_forward_pre_hook(
            lambda m, args, kw: seen.update(x=args[0], rope=kw["rope"]), with_kwargs=True
        ),
        block.register_forward_hook(lambda m, args, out: seen.update(out=out)),
    ]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    positions = family_of(model).last_state().positions  # (b, m) prefix first
    b, m, c = seen["x"].shape
    assert m < 1 + 16
    full = torch.zeros(b, 1 + 16, c).scatter(1, positions[..., None].expand(-1, -1, c), seen["x"])
    alive = torch.zeros(b, 1 + 16, dtype=torch.bool).scatter(1, positions, True)
    with torch.no_grad():
        reference = EvaBlock.forward(block, full, rope=seen["rope"], attn_mask=alive[:, None, None, :])
    expected = reference.gather(1, positions[..., None].expand(-1, -1, c))
    torch.testing.assert_close(seen["out"], expected, atol=1e-5, rtol=1e-5)


def test_the_cosine_transform_is_refused_where_rotary_positions_are_needed():
    model = make("eva02-cls")
    ats_timm.apply(model, caps=(10, 5), start_layer=1, options=SamplingOptions(sampler="dct"))
    with pytest.raises(ValueError, match="sampler='dct' is not supported on EVA"):
        model(inputs(model, 1))


@pytest.mark.parametrize("sampler", ["tome", "pitome"])
def test_merging_rules_run_with_rotary_positions(sampler):
    """A merged token keeps the position of the token it joined, so rotary embeddings stay
    defined after ToMe or PiToMe; each image gives what it gives alone."""
    model = make("eva02-cls", peaked=8.0)
    x = inputs(model, 3, seed=2)
    ats_timm.apply(model, caps=(10, 5), start_layer=1, options=SamplingOptions(sampler=sampler))
    with torch.no_grad():
        batch = model(x)
        assert ats_timm.last_info(model).kept_per_layer[0].tolist()[-2:] == [10, 5]
        for i in range(3):
            torch.testing.assert_close(model(x[i : i + 1])[0], batch[i], atol=1e-4, rtol=1e-5)
