"""Video ViTs: Hugging Face VideoMAE with ATS across space-time tokens, on a tiny synthetic
task (which way does a digit move?). Random weights, no downloads."""

import pytest
import torch
from helpers import fit_video_classifier

transformers = pytest.importorskip("transformers")
pytest.importorskip("sklearn")

import ats_vit.hf as ats_hf  # noqa: E402
from ats_vit import SamplingOptions, family_of  # noqa: E402
from ats_vit.testing import sharpen_queries  # noqa: E402
from ats_vit.video import DIRECTIONS, VideoConfig, moving_digits  # noqa: E402

T = transformers
TINY = dict(
    image_size=32,
    patch_size=8,
    num_frames=4,
    tubelet_size=2,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
)


def build(attn="sdpa", peaky=False, **kw):
    torch.manual_seed(0)
    config = T.VideoMAEConfig(**{**TINY, **kw}, num_labels=4, attn_implementation=attn)
    model = T.VideoMAEForVideoClassification(config).eval()
    return sharpen_queries(model, 8.0) if peaky else model


def clips(b, seed=0):
    return torch.randn(b, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_moving_digits_move_by_step_in_the_labelled_direction():
    cfg = VideoConfig(frames=4, canvas=32, step=4, noise=0.0)
    x, y = moving_digits(64, cfg, seed=3)
    assert x.shape == (64, 4, 3, 32, 32) and y.shape == (64,)
    assert torch.equal(x, moving_digits(64, cfg, seed=3)[0]) and set(y.tolist()) == set(
        range(len(DIRECTIONS))
    )
    grid = torch.arange(32.0)
    mass = x[:, :, 0].sum(dim=(-1, -2))
    centre_y = (x[:, :, 0].sum(-1) * grid).sum(-1) / mass  # (64, frames)
    centre_x = (x[:, :, 0].sum(-2) * grid).sum(-1) / mass
    move = torch.stack([centre_y[:, 1:] - centre_y[:, :-1], centre_x[:, 1:] - centre_x[:, :-1]], -1)
    expected = torch.tensor([[0, 1], [0, -1], [1, 0], [-1, 0]], dtype=torch.float)[y] * 4
    torch.testing.assert_close(move, expected[:, None].expand_as(move), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"canvas=16 cannot hold .* use canvas >= 20"):
        moving_digits(2, VideoConfig(canvas=16))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_videomae_equals_the_original_when_nothing_is_dropped(attn):
    model = build(attn)
    x = clips(3)
    with torch.no_grad():
        reference = model(pixel_values=x).logits
        ats_hf.apply(model, caps=32)
        family = family_of(model)
        assert (family.num_patches, family.frames, family.input_shape) == (32, 4, (4, 3, 32, 32))
        assert (family.scoring, family.num_prefix_tokens) == ("received", 0)
        assert (model(pixel_values=x).logits - reference).abs().max().item() <= 1e-5
        ats_hf.remove(model)
        torch.testing.assert_close(model(pixel_values=x).logits, reference, atol=0, rtol=0)


def test_analytic_count_matches_pytorch_flop_counter():
    from helpers import measured_gflops

    model = build(peaky=True)
    ats_hf.apply(model, caps=(16, 8), start_layer=1)
    measured = measured_gflops(lambda: model(pixel_values=clips(1)))
    assert ats_hf.last_info(model).gflops.item() == pytest.approx(measured, rel=1e-6)


def test_a_classifier_that_reads_one_patch_is_refused():
    with pytest.raises(ValueError, match=r"use_mean_pooling=False reads out the first space-time patch"):
        ats_hf.apply(build(use_mean_pooling=False))


@pytest.fixture(scope="module")
def trained():
    """A VideoMAE trained for 220 steps on the moving-digit task with budgets in the loop
    (about 12 s on 2 cores), and its held-out accuracy."""
    x, y = moving_digits(1024, seed=1)
    test_x, test_y = moving_digits(256, seed=2)
    torch.manual_seed(0)
    config = T.VideoMAEConfig(**{**TINY, "hidden_size": 64, "num_hidden_layers": 4}, num_labels=4)
    model = T.VideoMAEForVideoClassification(config)
    ats_hf.apply(model, caps=(16, 12, 8), start_layer=1)
    accuracy = fit_video_classifier(model, x, y, test_x, test_y, lr=2e-3)
    return model, accuracy, test_x


def test_videomae_trains_with_ats_in_the_loop_and_samples_adaptively(trained):
    """It learns the direction (chance 25%) and each clip keeps its own number of space-time
    tokens, at a fraction of the dense GFLOPs."""
    model, accuracy, test_x = trained
    ats_hf.apply(model, caps=(16, 12, 8), start_layer=1)
    with torch.no_grad():
        model(pixel_values=test_x)
        sampled = ats_hf.last_info(model)
        ats_hf.apply(model, caps=None)
        model(pixel_values=test_x[:8])
        dense = ats_hf.last_info(model)
    assert accuracy >= 0.7, f"accuracy {accuracy:.2f} after 220 steps (chance 0.25)"
    assert sampled.kept_per_layer[:, 3].unique().numel() > 1
    assert sampled.gflops.mean() < 0.75 * dense.gflops.mean()


@pytest.mark.parametrize("dropped", ["discard", "fuse"])
def test_space_time_sampling_is_per_clip(trained, dropped):
    """A padded batch of clips that keep different counts gives each clip what it gives alone
    (the mean-pooling readout skips padding and weighs merged tokens by their size)."""
    model, _, test_x = trained
    ats_hf.apply(model, caps=(16, 12, 8), start_layer=1, options=SamplingOptions(dropped=dropped))
    x = test_x[:6]
    with torch.no_grad():
        batch = model(pixel_values=x).logits
        info = ats_hf.last_info(model)
        assert info.kept_per_layer.unique(dim=0).shape[0] > 1, (
            "the test needs clips that keep different counts"
        )
        for i in range(6):
            torch.testing.assert_close(
                model(pixel_values=x[i : i + 1]).logits[0], batch[i], atol=1e-5, rtol=1e-5
            )
    assert (info.token_ids < 32).all() and (info.kept_per_layer[:, 3] <= 8).all()


def test_calibration_meets_a_gflops_target_on_video(trained):
    from ats_vit.calibrate import calibrate
    from ats_vit.evaluate import measure

    model, _, _ = trained
    calib = moving_digits(128, seed=5)[0]
    budget = calibrate(model, calib, 0.6, progress=False, steps=8)
    _, dense = measure(model, calib, None)
    _, cost = measure(model, calib, budget)
    assert (cost.mean() / dense.mean()).item() == pytest.approx(0.6, abs=0.03)
