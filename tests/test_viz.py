import pytest
import torch

pytest.importorskip("matplotlib")

from ats_vit import ViT
from ats_vit.viz import kept_patch_masks, plot_accuracy_vs_gflops, save_kept_tokens_grid


def peaky_vit(schedule=(16, 8, 4)) -> ViT:
    torch.manual_seed(0)
    model = ViT(
        image_size=32,
        patch_size=8,
        num_classes=3,
        dim=32,
        depth=3,
        heads=2,
        dim_head=16,
        mlp_dim=64,
        channels=1,
        max_tokens_per_depth=schedule,
    ).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight[: block.attn.inner_dim] *= 8
    return model


def test_kept_masks_match_the_trace():
    model = peaky_vit()
    with torch.no_grad():
        _, positions, _, trace = model.forward_features(torch.rand(5, 1, 32, 32))
    masks = kept_patch_masks(trace, (4, 4))
    assert sorted(masks) == [1, 2], "one picture per sampling layer"
    counts = trace.kept_per_layer()
    for layer, mask in masks.items():
        assert mask.shape == (5, 4, 4)
        assert torch.equal(mask.flatten(1).sum(1), counts[:, layer])
    # what survives the last layer is a subset of what survived the one before
    assert not (masks[2] & ~masks[1]).any()
    last = positions[0][positions[0] > 0] - 1
    assert torch.equal(masks[2][0].flatten().nonzero().squeeze(1), last)


def test_grid_png_is_written(tmp_path):
    model = peaky_vit()
    images = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        *_, trace = model.forward_features(images)
    path = save_kept_tokens_grid(images, trace, 8, tmp_path / "grid.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grid_without_sampling_is_an_error(tmp_path):
    model = peaky_vit((16, 16, 16))
    with torch.no_grad():
        *_, trace = model.forward_features(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match="no layer sampled"):
        save_kept_tokens_grid(torch.rand(2, 1, 32, 32), trace, 8, tmp_path / "grid.png")


def test_accuracy_plot_is_written(tmp_path):
    rows = [dict(label="dense", gflops=1.0, accuracy=0.97), dict(label="keep 0.5", gflops=0.6, accuracy=0.96)]
    path = plot_accuracy_vs_gflops(rows, tmp_path / "plot.png")
    assert path.stat().st_size > 1000
