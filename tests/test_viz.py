import pytest
import torch

pytest.importorskip("matplotlib")

from helpers import small_vit

from ats_vit.viz import kept_patch_masks, plot_accuracy_vs_cost, save_kept_tokens_grid


def peaky_vit(schedule=(16, 8, 4, 4)):
    return small_vit(schedule, peaked=8.0).eval()


def test_kept_masks_match_the_trace():
    model = peaky_vit()
    with torch.no_grad():
        _, state = model.forward_tokens(torch.rand(5, 3, 32, 32))
    trace, ids = state.trace, state.token_ids()[0]
    masks = kept_patch_masks(trace, (4, 4))
    assert sorted(masks) == [1, 2], "one picture per sampling layer (layer 3 keeps what it gets)"
    counts = trace.kept_per_layer()
    for layer, mask in masks.items():
        assert mask.shape == (5, 4, 4)
        assert torch.equal(mask.flatten(1).sum(1), counts[:, layer])
    # what survives the last layer is a subset of what survived the one before
    assert not (masks[2] & ~masks[1]).any()
    last = ids[ids >= 0]
    assert torch.equal(masks[2][0].flatten().nonzero().squeeze(1), last)


def test_grid_png_is_written(tmp_path):
    model = peaky_vit()
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        trace = model.forward_tokens(images)[1].trace
    path = save_kept_tokens_grid(images, trace, 8, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_without_sampling_is_an_error(tmp_path):
    model = peaky_vit((16, 16, 16, 16))
    with torch.no_grad():
        trace = model.forward_tokens(torch.rand(2, 3, 32, 32))[1].trace
    with pytest.raises(ValueError, match="no layer sampled"):
        save_kept_tokens_grid(torch.rand(2, 3, 32, 32), trace, 8, tmp_path / "grid.png")


def test_accuracy_plot_has_error_bars_a_sane_range_and_a_speed_panel(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [
        dict(label="dense", budget=None, gflops_ratio=1.0, accuracy=0.970, images=1000, speedup=1.0),
        dict(
            label="b-0.5",
            budget=dict(method="tome"),
            gflops_ratio=0.5,
            accuracy=0.965,
            images=1000,
            speedup=1.6,
        ),
    ]
    plot_accuracy_vs_cost(rows, tmp_path / "plot.png", title="run/final.safetensors")
    (fig,) = saved
    gflops_ax, speed_ax = fig.axes
    assert speed_ax.get_xlabel().startswith("speed-up over dense")
    low, high = gflops_ax.get_ylim()
    assert high - low >= 4.0, "a 0.5-point spread does not fill the whole axis"
    legend = [t.get_text() for t in gflops_ax.get_legend().get_texts()]
    assert legend == ["dense", "b-0.5 (tome)"]
    # the error bars are the 95% interval of 1000 test images: about ±1.1 points at 96.5%
    _, (lower, upper), _ = gflops_ax.containers[1].lines
    width = upper.get_ydata()[0] - lower.get_ydata()[0]
    assert width == pytest.approx(2 * 196 * (0.965 * 0.035 / 1000) ** 0.5, rel=1e-3)


def test_the_speed_panel_shows_each_speed_ups_spread_over_rounds(tmp_path, monkeypatch):
    """eval prints the interquartile range of each speed-up; the picture showed none."""
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    rows = [
        dict(label="dense", budget=None, gflops_ratio=1.0, accuracy=0.97, images=1000, speedup=1.0),
        dict(label="b", budget=None, gflops_ratio=0.5, accuracy=0.96, images=1000, speedup=1.5),
    ]
    rows[1].update(speedup_q1=1.4, speedup_q3=1.7)
    plot_accuracy_vs_cost(rows, tmp_path / "plot.png")
    _, speed_ax = saved[0].axes
    bar = speed_ax.containers[1]
    assert bar.has_xerr and not speed_ax.containers[0].has_xerr, "only where a spread was measured"
    left, right = bar.lines[2][0].get_segments()[0][:, 0]
    assert (left, right) == pytest.approx((1.4, 1.7))


def test_the_grid_says_which_layers_sampled_and_what_dimmed_means(tmp_path, monkeypatch):
    """The paper's budget listed five capped layers over one column, and merged strokes looked
    discarded: the key names the layers that sampled and what a dimmed patch is."""
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    for rule, dimmed in (({}, "dimmed: dropped."), ({"sampler": "tome"}, "or merged into a kept token")):
        model = small_vit((16, 8, 8, 8), peaked=8.0, **rule).eval()
        images = torch.rand(2, 3, 32, 32)
        with torch.no_grad():
            trace = model.forward_tokens(images)[1].trace
        save_kept_tokens_grid(images, trace, 8, tmp_path / "grid.png", title="model, budget")
        text = saved[-1]._suptitle.get_text()
        assert text.startswith("model, budget\n") and dimmed in text
    assert "Layers that sampled: 1" in text
