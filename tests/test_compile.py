"""torch.compile, torch.export and ONNX: static shapes capture whole, adaptive shapes break
the graph at the one host sync per sampling layer, and every path computes what eager does.

Tracing takes tens of seconds per model on a 2-core CPU, so the default suite checks the
paper's rule (ours and patched timm); the other rules and inductor's code generation run in
the slow suite (``pytest -m slow``)."""

import copy

import pytest
import torch
from helpers import images as some_images
from helpers import small_vit

from ats_vit import SamplingOptions

SCHEDULE = (16, 8, 6, 6)
RULES = [
    dict(),
    dict(dropped="fuse", temperature=2.0),
    dict(sampler="official"),
    dict(sampler="tome"),
    dict(sampler="pitome"),
    dict(sampler="dct"),
]
IDS = ["paper", "fuse", "official", "tome", "pitome", "dct"]


def peaky_vit(**options):
    return small_vit(SCHEDULE, peaked=6.0, **options).eval()


def images() -> torch.Tensor:
    return some_images(3)


def graph_breaks(model, x) -> int:
    torch._dynamo.reset()
    with torch.no_grad():
        return torch._dynamo.explain(model)(x).graph_break_count


def assert_captured_whole(model, x) -> None:
    """No graph break, and compiled (aot_eager) and exported outputs equal eager."""
    assert graph_breaks(model, x) == 0
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), eager)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), eager)


def each_rule(fast: int = 1):
    """The rules, the first ``fast`` of them in the default suite and the rest marked slow."""
    return [
        pytest.param(rule, id=name, marks=() if i < fast else pytest.mark.slow)
        for i, (rule, name) in enumerate(zip(RULES, IDS, strict=True))
    ]


@pytest.mark.parametrize("rule", each_rule())
def test_static_shapes_compile_without_graph_breaks_and_export(rule):
    assert_captured_whole(peaky_vit(static_shape=True, **rule), images())


@pytest.mark.parametrize("rule", each_rule()[:2])
def test_patched_timm_with_static_shapes_compiles_without_graph_breaks(rule):
    timm = pytest.importorskip("timm")
    import ats_vit.timm as ats_timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)
    model.eval()
    ats_timm.apply(model, caps=(8, 6, 6), start_layer=1, options=SamplingOptions(static_shape=True, **rule))
    assert_captured_whole(model, images())


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["vit_base_patch16_siglip_224", "vit_medium_patch16_gap_256"])
def test_pooled_timm_models_with_static_shapes_compile_and_export(arch):
    """Received-attention scoring and the patched MAP / average pooling capture whole too."""
    timm = pytest.importorskip("timm")
    import ats_vit.timm as ats_timm

    torch.manual_seed(0)
    model = timm.create_model(
        arch, img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2, num_classes=10
    ).eval()
    options = SamplingOptions(static_shape=True, dropped="fuse")
    ats_timm.apply(model, caps=(8, 6, 16), start_layer=1, options=options)
    assert_captured_whole(model, images())


def test_adaptive_shapes_break_the_graph_at_the_sync():
    """Each sampling layer's host sync (sizing the padded output) breaks the graph."""
    assert graph_breaks(peaky_vit(), images()) > 0


@pytest.mark.slow
def test_adaptive_shapes_compile_to_what_eager_computes():
    model, x = peaky_vit(), images()
    with torch.no_grad():
        eager = model(x)
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(model, backend="aot_eager")(x), eager)


@pytest.mark.parametrize("rule", each_rule())
def test_static_shapes_export_to_onnx_and_run_in_onnxruntime(rule, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, x = peaky_vit(static_shape=True, **rule), images()
    program = torch.onnx.export(model, (x,), dynamo=True, verbose=False)
    program.save(str(tmp_path / "model.onnx"))
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("static_shape", [True, False], ids=["static", "adaptive"])
def test_inductor_compiled_model_equals_eager(static_shape):
    model, x = peaky_vit(static_shape=static_shape, dropped="fuse"), images()
    torch._dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
