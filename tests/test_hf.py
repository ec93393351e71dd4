import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import HF_TINY  # noqa: E402
from transformers import (  # noqa: E402
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    ViTConfig,
    ViTForImageClassification,
    ViTForMaskedImageModeling,
    ViTModel,
)

import ats_vit.hf as ats_hf  # noqa: E402
from ats_vit import SamplingOptions  # noqa: E402
from ats_vit.budget import Budget  # noqa: E402
from ats_vit.calibrate import calibrate  # noqa: E402
from ats_vit.evaluate import measure  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402

CLASSES = [
    (ViTConfig, ViTForImageClassification, 1),
    (ViTConfig, ViTModel, 1),
    (DeiTConfig, DeiTForImageClassification, 2),
    (DeiTConfig, DeiTForImageClassificationWithTeacher, 2),
    (DeiTConfig, DeiTModel, 2),
]
IDS = [cls.__name__ for _, cls, _ in CLASSES]


def build(config_cls, model_cls, attn="sdpa", peaky=False, **kw):
    torch.manual_seed(0)
    config = config_cls(**HF_TINY, num_labels=5, attn_implementation=attn, **kw)
    model = model_cls(config).eval()
    return sharpen_queries(model, 8.0) if peaky else model


def output(model, x):
    out = model(pixel_values=x)
    return out.logits if hasattr(out, "logits") else out.pooler_output


def images(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("config_cls", "model_cls", "prefix"), CLASSES, ids=IDS)
def test_patched_model_equals_the_original_when_nothing_is_dropped(config_cls, model_cls, prefix, attn):
    model = build(config_cls, model_cls, attn)
    assert model.config._attn_implementation == attn
    x = images(3)
    with torch.no_grad():
        reference = output(model, x)
        for kwargs in (
            dict(caps=16),
            dict(caps=None),
            dict(caps=100, options=SamplingOptions(dropped="fuse")),
        ):
            ats_hf.apply(model, **kwargs)
            assert ats_hf.is_patched(model)
            assert (output(model, x) - reference).abs().max().item() <= 1e-5
        ats_hf.remove(model)
        assert not ats_hf.is_patched(model)
        torch.testing.assert_close(output(model, x), reference, atol=0, rtol=0)


@pytest.mark.parametrize(("config_cls", "model_cls", "prefix"), CLASSES, ids=IDS)
def test_dropping_keeps_prefix_tokens_and_counts_cost(config_cls, model_cls, prefix):
    model = build(config_cls, model_cls, peaky=True)
    x = images(4)
    with torch.no_grad():
        ats_hf.apply(model, caps=(8, 4), start_layer=1)
        out = model(pixel_values=x)
        info = ats_hf.last_info(model)
    if isinstance(model, (ViTModel, DeiTModel)):  # the tokens the last layer kept, padded per batch
        assert out.last_hidden_state.shape[1] == prefix + info.token_ids.shape[1]
    else:
        assert out.logits.shape == (4, 5)
    assert (info.kept_per_layer[:, 0] == 16).all() and (info.kept_per_layer[:, 2] <= 4).all()
    assert info.token_ids.shape[0] == 4 and info.token_ids.max() < 16
    assert ats_hf.last_trace(model).rules == [None, "score", "score"]
    ats_hf.apply(model, caps=None)
    with torch.no_grad():
        model(pixel_values=x)
    assert (ats_hf.last_info(model).gflops > info.gflops).all()


def test_batch_equals_each_image_alone():
    model = build(DeiTConfig, DeiTForImageClassificationWithTeacher, peaky=True)
    ats_hf.apply(model, caps=(10, 5), start_layer=1, options=SamplingOptions(dropped="fuse", temperature=0.3))
    x = images(5)
    with torch.no_grad():
        batch = model(pixel_values=x).logits
        counts = ats_hf.last_info(model).kept_per_layer[:, 1]
        assert counts.unique().numel() > 1, "the test needs images that keep different counts"
        for i in range(5):
            torch.testing.assert_close(
                model(pixel_values=x[i : i + 1]).logits[0], batch[i], atol=1e-5, rtol=1e-5
            )


def test_patching_is_instance_local_and_keeps_the_state_dict():
    a, b = build(ViTConfig, ViTForImageClassification), build(ViTConfig, ViTForImageClassification)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    ats_hf.apply(a, caps=4)
    assert not ats_hf.is_patched(b)
    assert a.state_dict().keys() == state.keys()
    assert type(a.vit.layers[0]).forward is type(b.vit.layers[0]).forward
    with pytest.raises(ValueError, match=r"not patched: call ats_vit\.timm\.apply or ats_vit\.hf\.apply"):
        ats_hf.last_info(b)


def test_analytic_count_matches_pytorch_flop_counter():
    from helpers import measured_gflops

    model = build(DeiTConfig, DeiTForImageClassificationWithTeacher, peaky=True)
    ats_hf.apply(model, caps=(9, 5), start_layer=1)
    measured = measured_gflops(lambda: model(pixel_values=images(1)))
    assert ats_hf.last_info(model).gflops.item() == pytest.approx(measured, rel=1e-6)


def test_budgets_and_calibration_work_on_hf_models():
    model = build(ViTConfig, ViTForImageClassification, peaky=True)
    Budget(1, (8, 4)).apply(model)
    assert ats_hf.is_patched(model) and model.vit.layers[2].ats.cap == 4
    budget = calibrate(model, images(32), 0.7, progress=False, steps=8)
    _, dense = measure(model, images(32), None)
    _, cost = measure(model, images(32), budget)
    assert (cost.mean() / dense.mean()).item() == pytest.approx(0.7, abs=0.03)


def test_unsupported_models_are_refused_by_name():
    config = ViTConfig(**HF_TINY)
    with pytest.raises(TypeError, match=r"ats_vit\.hf supports .* got ViTForMaskedImageModeling"):
        ats_hf.apply(ViTForMaskedImageModeling(config))
    with pytest.raises(TypeError, match="got Linear"):
        ats_hf.apply(torch.nn.Linear(2, 2))
    backbone_only = Budget(1, (8, 4)).apply(ViTModel(config))  # budgets set features extractors too
    assert backbone_only.layers[2].ats.cap == 4
    # a backbone has no accuracy: calibration keeps its features close to the dense ones
    assert "fidelity" in calibrate(backbone_only, images(8), 0.7, progress=False).calibration
    with pytest.raises(TypeError, match="ViTModel has no classification head"):
        measure(backbone_only, images(8), None)


def test_attention_masks_are_refused():
    """A mask the user passes is refused (by keyword or position); the all-attend mask the
    model builds for itself when traced (compile, export) is not the user's and is ignored."""
    model = ats_hf.apply(build(ViTConfig, ViTForImageClassification), caps=4)
    mask = torch.ones(1, 17, dtype=torch.bool)
    mask[0, 5] = False  # (an all-True mask is dropped by the model itself)
    with pytest.raises(ValueError, match="do not support an attention_mask"):
        model(pixel_values=images(1), attention_mask=mask)
    with pytest.raises(ValueError, match="do not support an attention_mask"):
        model.vit(images(1), None, False, mask)
    with torch.no_grad():
        plain = model(pixel_values=images(1)).logits
        built = model.vit.layers[0](torch.randn(1, 17, 32), torch.ones(1, 1, 17, 17, dtype=torch.bool))
    assert torch.isfinite(plain).all() and built.shape == (1, 5, 32)  # CLS and 4 kept
