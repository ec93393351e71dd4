"""ats_vit.compile: the fixed-batch inference path (static shapes, CUDA graphs on a GPU).
On the CPU it runs eagerly with static shapes; every rule gives the logits of the adaptive
eager model, for a full batch and for a padded smaller one."""

import pytest
import torch
from helpers import images, small_vit

import ats_vit
from ats_vit import SamplingOptions

RULES = [
    dict(),
    dict(dropped="fuse"),
    dict(sampler="topk"),
    dict(sampler="tome"),
    dict(sampler="pitome"),
    dict(sampler="official"),
    dict(sampler="dct"),
]
IDS = ["paper", "fuse", "topk", "tome", "pitome", "official", "dct"]


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_the_cpu_fallback_equals_the_eager_model(rule):
    reference = small_vit((16, 10, 6, 6), peaked=6.0, **rule).eval()
    model = small_vit((16, 10, 6, 6), peaked=6.0, **rule).eval()
    infer = ats_vit.compile(model, batch_size=6)
    assert model.options.static_shape and not reference.options.static_shape
    x = images(6, 3)
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(infer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(infer(x[:4]), expected[:4], atol=1e-5, rtol=1e-5)  # padded to 6
    with pytest.raises(ValueError, match="batches of at most 6 images, got 7"):
        infer(images(7))


def test_bfloat16_autocast_gives_finite_logits_close_to_float32():
    model = small_vit((16, 10, 6, 6), peaked=6.0).eval()
    x = images(4, 3)
    with torch.no_grad():
        expected = model(x)
    low = ats_vit.compile(model, batch_size=4, dtype=torch.bfloat16)(x)
    assert torch.isfinite(low).all()
    assert (low.float() - expected).abs().max() < 0.25


@pytest.mark.slow
def test_the_compiled_path_equals_the_eager_model():
    """torch.compile (fullgraph, static shapes) of the whole inference function."""
    model = small_vit((16, 10, 6, 6), peaked=6.0, dropped="fuse").eval()
    x = images(4, 3)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    infer = ats_vit.compile(model, batch_size=4, backend="aot_eager")
    torch.testing.assert_close(infer(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_give_the_eager_logits():
    model = small_vit((16, 10, 6, 6), peaked=6.0).eval().cuda()
    x = images(8, 3).cuda()
    with torch.no_grad():
        expected = model(x)
    infer = ats_vit.compile(model, batch_size=8)
    for _ in range(3):  # warm-up, capture, replay
        out = infer(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_options_stay_what_the_budget_set():
    model = small_vit((16, 10, 6, 6), peaked=6.0, dropped="fuse").eval()
    ats_vit.compile(model, batch_size=2)
    assert model.options == SamplingOptions(dropped="fuse", static_shape=True)
