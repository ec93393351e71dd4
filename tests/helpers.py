"""A tiny model config and data set that train in seconds (shared by the test modules)."""

from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from ats_vit.checkpoint import load_checkpoint
from ats_vit.models import ModelConfig
from ats_vit.train import TrainConfig

TINY = ModelConfig(
    image_size=16, patch_size=4, num_classes=3, channels=1, dim=16, depth=3, heads=2, dim_head=8, mlp_dim=32
)


# a tiny Hugging Face ViT/DeiT config (transformers' config keyword arguments)
HF_TINY = dict(
    image_size=32,
    patch_size=8,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=64,
)


def tiny_data(n: int = 96, seed: int = 0) -> TensorDataset:
    """Three classes told apart by where a bright square sits: learnable in a few steps."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=gen)
    images = 0.1 * torch.rand(n, 1, 16, 16, generator=gen)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 4 * y : 4 * y + 4, 4 * y : 4 * y + 4] = 1.0
    return TensorDataset(images, labels)


def tiny_cfg(out: Path, **kw) -> TrainConfig:
    return TrainConfig(
        model=TINY, epochs=2, batch_size=16, lr=3e-3, warmup_steps=2, ckpt_every=4, out_dir=str(out), **kw
    )


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[1]


def image_folder_tree(root: Path, splits=("train", "val"), per_class: int = 4, size: int = 40) -> Path:
    """Two colour classes of small PNGs under root/<split>/<class>/."""
    from PIL import Image

    for split in splits:
        for k, color in enumerate(((250, 10, 10), (10, 10, 250))):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), color=color).save(folder / f"{i}.png")
    return root
