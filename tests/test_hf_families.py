"""The Hugging Face families beyond ViT/DeiT: CLIP and SigLIP vision towers and classifiers,
DINOv2 (with and without registers, MLP and SwiGLU), ViT-MAE. Random weights, no downloads."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import HF_TINY, images  # noqa: E402

import ats_vit.hf as ats_hf  # noqa: E402
from ats_vit import SamplingOptions  # noqa: E402
from ats_vit.calibrate import calibrate  # noqa: E402
from ats_vit.evaluate import measure  # noqa: E402
from ats_vit.families import family_of  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

T = transformers
SWIGLU = dict(use_swiglu_ffn=True)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def _vision(config_cls, **kw):
    return config_cls(**HF_TINY, **kw)


def _pair(config_cls, **kw):
    """A CLIP/SigLIP config whose vision tower is HF_TINY (the text tower is never run)."""
    config = config_cls(vision_config=dict(HF_TINY), text_config=TEXT, num_labels=5, **kw)
    return config


# name -> (builder of the config, model class, prefix tokens, scoring)
BUILDS = {
    "CLIPVisionModel": (lambda: _vision(T.CLIPVisionConfig), T.CLIPVisionModel, 1, "cls"),
    "CLIPVisionModelWithProjection": (
        lambda: _vision(T.CLIPVisionConfig, projection_dim=16),
        T.CLIPVisionModelWithProjection,
        1,
        "cls",
    ),
    "CLIPForImageClassification": (lambda: _pair(T.CLIPConfig), T.CLIPForImageClassification, 1, "received"),
    "SiglipVisionModel": (lambda: _vision(T.SiglipVisionConfig), T.SiglipVisionModel, 0, "received"),
    "SiglipForImageClassification": (
        lambda: _pair(T.SiglipConfig),
        T.SiglipForImageClassification,
        0,
        "received",
    ),
    "Dinov2Model": (lambda: _vision(T.Dinov2Config), T.Dinov2Model, 1, "cls"),
    "Dinov2Model-swiglu": (lambda: _vision(T.Dinov2Config, use_swiglu_ffn=True), T.Dinov2Model, 1, "cls"),
    "Dinov2WithRegistersModel": (
        lambda: _vision(T.Dinov2WithRegistersConfig, num_register_tokens=2),
        T.Dinov2WithRegistersModel,
        3,
        "cls",
    ),
    "Dinov2ForImageClassification": (
        lambda: _vision(T.Dinov2Config, num_labels=5),
        T.Dinov2ForImageClassification,
        1,
        "received",
    ),
    "Dinov2WithRegistersForImageClassification": (
        lambda: _vision(T.Dinov2WithRegistersConfig, num_register_tokens=2, num_labels=5, **SWIGLU),
        T.Dinov2WithRegistersForImageClassification,
        3,
        "received",
    ),
}
POOLED = [name for name, spec in BUILDS.items() if spec[3] == "received"]


def build(name, attn="sdpa", peaky=False):
    make_config, model_cls, _, _ = BUILDS[name]
    torch.manual_seed(0)
    config = make_config()
    config._attn_implementation = attn
    if hasattr(config, "vision_config"):
        config.vision_config._attn_implementation = attn
    model = model_cls(config).eval()
    return sharpen_queries(model, 8.0) if peaky else model


def features(model, x):
    """The backbone's last hidden state (classifiers: of their backbone)."""
    return ats_hf.backbone(model)(pixel_values=x).last_hidden_state


def output(model, x):
    """What a user reads out: logits, the projected embedding, or the pooled features."""
    out = model(pixel_values=x)
    for key in ("logits", "image_embeds", "pooler_output"):
        if getattr(out, key, None) is not None:
            return out[key]
    raise AssertionError(f"no readout in {type(out).__name__}")


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(BUILDS))
def test_patched_model_equals_the_original_when_nothing_is_dropped(name, attn):
    model = build(name, attn)
    x = images(3)
    with torch.no_grad():
        reference, dense = output(model, x), features(model, x)
        for kwargs in (dict(caps=16), dict(caps=100, options=SamplingOptions(dropped="fuse"))):
            ats_hf.apply(model, **kwargs)
            assert (output(model, x) - reference).abs().max().item() <= 1e-5
            assert (features(model, x) - dense).abs().max().item() <= 1e-5
        ats_hf.remove(model)
        assert not ats_hf.is_patched(model)
        assert "forward" not in model.__dict__
        torch.testing.assert_close(output(model, x), reference, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(BUILDS))
def test_each_family_scores_as_its_readout_needs_and_keeps_its_prefix(name):
    _, _, prefix, scoring = BUILDS[name]
    model = build(name, peaky=True)
    family = family_of(model)
    assert (family.scoring, family.num_prefix_tokens, family.num_patches) == (scoring, prefix, 16)
    with torch.no_grad():
        ats_hf.apply(model, caps=(8, 4), start_layer=1)
        hidden = features(model, images(4))
    info = ats_hf.last_info(model)
    assert (info.kept_per_layer[:, 0] == 16).all() and (info.kept_per_layer[:, 2] <= 4).all()
    assert hidden.shape[1] == prefix + info.token_ids.shape[1]
    assert (info.gflops < ats_hf.cost(model).depth * 1.0).all()


@pytest.mark.parametrize("dropped", ["discard", "fuse"])
@pytest.mark.parametrize("name", [*POOLED, "SiglipVisionModel"])
def test_pooled_readouts_heed_padding_and_sizes(name, dropped):
    """Averages and the attention-pool probe see each image's own tokens: a batch, padded to
    its longest image, gives each image what it gives alone."""
    model = build(name, peaky=True)
    options = SamplingOptions(dropped=dropped, temperature=0.3)
    ats_hf.apply(model, caps=(10, 5), start_layer=1, options=options)
    x = images(5, seed=1)
    with torch.no_grad():
        batch = output(model, x)
        counts = ats_hf.last_info(model).kept_per_layer
        assert counts.unique(dim=0).shape[0] > 1, "the test needs images that keep different counts"
        for i in range(5):
            torch.testing.assert_close(output(model, x[i : i + 1])[0], batch[i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["CLIPForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_analytic_count_matches_pytorch_flop_counter(name):
    """Counts a classifier on the mean of the tokens and DINOv2's SwiGLU MLP exactly."""
    from helpers import measured_gflops

    model = build(name, peaky=True)
    ats_hf.apply(model, caps=(9, 5), start_layer=1)
    measured = measured_gflops(lambda: model(pixel_values=images(1)))
    assert ats_hf.last_info(model).gflops.item() == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("name", ["CLIPForImageClassification", "Dinov2WithRegistersForImageClassification"])
def test_the_cosine_transform_runs_on_hugging_face_encoders(name):
    """DCT after the MLP of a served layer: its counts, a batch that equals each image alone,
    and the FLOPs as the PyTorch counter sees them (the cached matrix built beforehand)."""
    from helpers import measured_gflops

    model = build(name, peaky=True)
    ats_hf.apply(model, caps=(12, 9), start_layer=1, options=SamplingOptions(sampler="dct"))
    x = images(3, seed=1)
    with torch.no_grad():
        batch = model(pixel_values=x).logits
        assert ats_hf.last_info(model).kept_per_layer[0].tolist()[1:] == [12, 9]
        for i in range(3):
            torch.testing.assert_close(
                model(pixel_values=x[i : i + 1]).logits[0], batch[i], atol=1e-5, rtol=1e-5
            )
    measured = measured_gflops(lambda: model(pixel_values=images(1)))
    assert ats_hf.last_info(model).gflops.item() == pytest.approx(measured, rel=1e-6)


@pytest.mark.parametrize("name", ["CLIPVisionModel", "SiglipVisionModel", "Dinov2WithRegistersModel"])
def test_restore_gives_the_dense_grid_back_when_nothing_is_dropped(name):
    model = build(name)
    x = images(2)
    with torch.no_grad():
        dense = model(pixel_values=x).last_hidden_state
        ats_hf.apply(model, caps=16, start_layer=1, options=SamplingOptions(restorable=True))
        restored = ats_hf.restore(model, model(pixel_values=x).last_hidden_state)
        torch.testing.assert_close(restored, dense, atol=1e-5, rtol=1e-5)
        ats_hf.apply(model, caps=(8, 4), start_layer=1, options=SamplingOptions(restorable=True))
        features = model(pixel_values=x).last_hidden_state
        assert ats_hf.restore(model, features).shape == dense.shape
        assert features.shape[1] < dense.shape[1]


def test_calibration_hits_its_target_on_a_pooled_classifier():
    model = build("Dinov2ForImageClassification", peaky=True)
    budget = calibrate(model, images(32), 0.7, progress=False, steps=8)
    _, dense = measure(model, images(32), None)
    _, cost = measure(model, images(32), budget)
    assert (cost.mean() / dense.mean()).item() == pytest.approx(0.7, abs=0.03)


def test_vit_mae_needs_no_masking_and_then_equals_the_original():
    torch.manual_seed(0)
    masked = T.ViTMAEModel(T.ViTMAEConfig(**HF_TINY)).eval()
    with pytest.raises(ValueError, match=r"mask_ratio=0\.75 .* model\.config\.mask_ratio = 0\.0"):
        ats_hf.apply(masked)
    model = T.ViTMAEModel(T.ViTMAEConfig(**HF_TINY, mask_ratio=0.0)).eval()
    x, noise = images(2), torch.arange(16.0).expand(2, 16)
    with torch.no_grad():
        dense = model(pixel_values=x, noise=noise).last_hidden_state
        ats_hf.apply(model, caps=16)
        torch.testing.assert_close(
            model(pixel_values=x, noise=noise).last_hidden_state, dense, atol=1e-5, rtol=1e-5
        )
        ats_hf.apply(model, caps=4, start_layer=2)
        assert model(pixel_values=x, noise=noise).last_hidden_state.shape[1] <= 1 + 4


def test_a_layer_the_family_does_not_know_is_refused_by_name():
    model = build("CLIPVisionModel")

    class Other(T.models.clip.modeling_clip.CLIPEncoderLayer):
        pass

    model.encoder.layers[1].__class__ = Other
    with pytest.raises(TypeError, match=r"layer 1 is Other with CLIPAttention"):
        ats_hf.apply(model)


@pytest.mark.parametrize("name", ["CLIPVisionModelWithProjection", "SiglipVisionModel", "Dinov2Model"])
def test_a_tower_is_calibrated_for_the_fidelity_of_its_features(name):
    """No classifier, no accuracy: calibrate keeps the pooled features (projected embedding,
    MAP probe, class token) closest to the dense ones at the target cost; eval refuses."""
    model = build(name, peaky=True)
    x = images(32, seed=3)
    budget = calibrate(model, x, 0.6, progress=False, steps=8)
    cal = budget.calibration
    assert cal["gflops_ratio"] == pytest.approx(0.6, abs=0.02) and cal["dense_fidelity"] == 1.0
    assert 0.5 < cal["fidelity"] < 1.0
    family = family_of(model)
    with torch.no_grad():
        pooled, _ = family.run(x[:4])
    assert family.num_classes == 0 and pooled.shape == (
        4,
        family.cost.dim if name != "CLIPVisionModelWithProjection" else 16,
    )
    with pytest.raises(ValueError, match="labels cannot score it"):
        calibrate(model, x, 0.6, torch.zeros(32, dtype=torch.long), progress=False)
    with pytest.raises(TypeError, match="no classification head"):
        measure(model, x, budget)
