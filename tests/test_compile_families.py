"""torch.compile and torch.export for the families beyond ours and timm's ViT: with static
shapes each captures whole (no graph break) and computes what eager does. Tracing takes tens of
seconds per model on a 2-core CPU: one family runs in the default suite, the others in the slow
suite (``pytest -m slow``); the README's family table says which were run."""

import pytest
import torch
from test_compile import assert_captured_whole

from ats_vit import SamplingOptions

STATIC = SamplingOptions(static_shape=True)


class Readout(torch.nn.Module):
    """A model whose forward returns one tensor: its logits, projected embedding or pooled
    features (Hugging Face models return output classes)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        out = self.model(pixel_values=x)
        for key in ("logits", "image_embeds", "pooler_output", "last_hidden_state"):
            if getattr(out, key, None) is not None:
                return out[key]
        raise AssertionError(type(out).__name__)


def _hf(name):
    pytest.importorskip("transformers")
    import test_hf_families

    import ats_vit.hf as ats_hf

    model = test_hf_families.build(name, peaky=True)
    ats_hf.apply(model, caps=(10, 6), start_layer=1, options=STATIC)
    return Readout(model), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _timesformer():
    pytest.importorskip("transformers")
    import test_timesformer

    import ats_vit.hf as ats_hf

    model = test_timesformer.build(peaky=True)
    ats_hf.apply(model, caps=(10, 6), start_layer=1, options=STATIC)
    return Readout(model), test_timesformer.clips(2)


def _timm(module, name):
    pytest.importorskip("timm")
    import importlib

    import ats_vit.timm as ats_timm

    tests = importlib.import_module(module)
    model = tests.make(name, peaked=8.0)
    later = (model.patch_embed.num_patches,) * (len(model.blocks) - 3)  # layers after 2 keep all
    ats_timm.apply(model, caps=(10, 6, *later), start_layer=1, options=STATIC)
    size = model.patch_embed.img_size
    return model, torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))


CASES = {
    "hf-dinov2-registers": lambda: _hf("Dinov2WithRegistersModel"),
    "hf-clip-classifier": lambda: _hf("CLIPForImageClassification"),
    "hf-siglip-tower": lambda: _hf("SiglipVisionModel"),
    "hf-timesformer": _timesformer,
    "timm-eva02": lambda: _timm("test_eva", "eva02-cls"),
    "timm-beit": lambda: _timm("test_beit", "beit-avg"),
}
FAST = ("hf-dinov2-registers",)


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=() if c in FAST else pytest.mark.slow) for c in CASES]
)
def test_static_shapes_compile_without_graph_breaks_and_export(case):
    assert_captured_whole(*CASES[case]())
