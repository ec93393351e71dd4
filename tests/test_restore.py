"""Dense outputs after a budgeted pass: restore() puts every patch back on the full grid."""

import pytest
import torch
from helpers import HF_TINY, images, peaked_timm_tiny, small_vit

import ats_vit
from ats_vit import SamplingOptions, family_of
from ats_vit.budget import Budget


def ours(**options):
    return small_vit((16, 10, 6, 6), peaked=6.0, restorable=True, **options).eval()


def test_with_nothing_dropped_restore_is_the_dense_features():
    model = small_vit(restorable=True).eval()
    x = images(3)
    with torch.no_grad():
        features = model.forward_features(x)
        torch.testing.assert_close(ats_vit.restore(model, features), features)


@pytest.mark.parametrize(
    "rule",
    [
        dict(),
        dict(dropped="fuse"),
        dict(sampler="tome"),
        dict(sampler="pitome"),
        dict(sampler="topk"),
    ],
)
def test_every_patch_gets_its_tokens_features_or_its_last_state(rule):
    model = ours(**rule)
    x = images(4, 2)
    with torch.no_grad():
        features = model.forward_features(x)
    full = ats_vit.restore(model, features)
    state = model.last_state
    assert full.shape == (4, 17, 32)
    alive = state.slot_of >= 0
    # a patch that is alive carries its slot's features (merged patches share theirs)
    for i in range(4):
        for patch in alive[i].nonzero().squeeze(1).tolist():
            torch.testing.assert_close(full[i, patch], features[i, state.slot_of[i, patch]])
    if rule.get("sampler") in ("tome", "pitome"):
        assert alive.all(), "merging drops nothing: every patch lives in some token"
        sizes = torch.zeros(4, features.shape[1]).scatter_add_(1, state.slot_of, torch.ones(4, 17))
        torch.testing.assert_close(sizes[:, 1:], state.size[:, 1:])
    elif rule.get("dropped") != "fuse":
        assert (~alive).any() and (full[~alive] != 0).all(), "dropped patches carry their last state"


def test_restore_needs_a_tracked_pass():
    model = small_vit((16, 10, 6, 6)).eval()
    with torch.no_grad():
        features = model.forward_features(images(2))
    with pytest.raises(ValueError, match=r"SamplingOptions\(restorable=True\)"):
        ats_vit.restore(model, features)


def test_restore_refuses_the_cosine_transform():
    """Its tokens each mix every patch: no patch to put back, so a tracked pass refuses it."""
    model = small_vit((16, 10, 6, 6), sampler="dct", restorable=True).eval()
    with pytest.raises(ValueError, match="restore\\(\\) has no patch to put back"):
        model.forward_features(images(2))


def test_timm_features_come_back_normalised_like_the_kept_ones():
    model = peaked_timm_tiny()
    import ats_vit.timm as ats_timm

    x = images(3)
    with torch.no_grad():
        dense = model.forward_features(x)
        ats_timm.apply(model, caps=None, options=SamplingOptions(restorable=True))
        torch.testing.assert_close(
            ats_timm.restore(model, model.forward_features(x)), dense, atol=1e-5, rtol=1e-5
        )
        Budget(1, (8, 4, 4)).apply(model)
        assert family_of(model).options().restorable, "a budget keeps how the model runs"
        full = ats_timm.restore(model, model.forward_features(x))
    state = family_of(model).last_state()
    dropped = state.slot_of < 0
    assert dropped.any()
    torch.testing.assert_close(full[dropped], model.norm(state.last)[dropped])


def test_hugging_face_last_hidden_state_comes_back_on_the_grid():
    transformers = pytest.importorskip("transformers")
    import ats_vit.hf as ats_hf

    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(**HF_TINY)).eval()
    x = images(2)
    with torch.no_grad():
        dense = model(pixel_values=x).last_hidden_state
        ats_hf.apply(model, caps=16, start_layer=1, options=SamplingOptions(restorable=True))
        restored = ats_hf.restore(model, model(pixel_values=x).last_hidden_state)
    torch.testing.assert_close(restored, dense, atol=1e-5, rtol=1e-5)
