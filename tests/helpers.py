"""What the test modules share: small model configs, images, tiny data sets and runs."""

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from ats_vit import SamplingOptions, ViT, attention, sampling
from ats_vit.checkpoint import load_checkpoint
from ats_vit.models import ModelConfig
from ats_vit.testing import sharpen_queries
from ats_vit.train import TrainConfig

# a 4-layer ViT on 32x32 images in 8x8 patches: 16 patch tokens
SMALL = dict(image_size=32, patch_size=8, num_classes=10, dim=32, depth=4, heads=2, dim_head=16, mlp_dim=64)
NUM_PATCHES = 16

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


def images(b: int, seed: int = 0, size: int = 32, channels: int = 3) -> torch.Tensor:
    """(b, channels, size, size) standard normal images from ``seed``."""
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(seed))


def small_vit(
    schedule=(16,) * 4, seed: int = 0, *, peaked: float | None = None, dropout: float = 0.0, **options
) -> ViT:
    """The SMALL ViT with this schedule and sampling options; ``peaked`` sharpens its queries
    by that factor (peaked CLS attention, as trained models have)."""
    torch.manual_seed(seed)
    model = ViT(
        **SMALL,
        max_tokens_per_depth=schedule,
        dropout=dropout,
        emb_dropout=dropout,
        options=SamplingOptions(**options) if options else None,
    )
    return model if peaked is None else sharpen_queries(model, peaked)


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


def image_folder_tree(
    root: Path, splits=("train", "val"), per_class: int = 4, size: int = 40, mode: str = "RGB"
) -> Path:
    """Two classes of small PNGs under root/<split>/<class>/ (red and blue; in mode "L", dark
    and bright)."""
    from PIL import Image

    colours = {"RGB": ((250, 10, 10), (10, 10, 250)), "L": (30, 220)}[mode]
    for split in splits:
        for k, color in enumerate(colours):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new(mode, (size, size), color=color).save(folder / f"{i}.png")
    return root


def torchrun(script: Path, port: int, *args: str) -> subprocess.CompletedProcess:
    """Two gloo processes running ``script``; fails the test with their stderr if one fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(port), str(script), *args]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def peaked_timm_tiny(peaked: float = 6.0):
    """timm's ViT-Tiny shrunk to 32 x 32 images in 8 x 8 patches (16 tokens), depth 4, random
    weights (seed 0) with sharpened queries, in eval mode; skips the test without timm."""
    import pytest

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)
    return sharpen_queries(model.eval(), peaked)


def fit_video_classifier(model, x, y, test_x, test_y, lr: float, steps: int = 220) -> float:
    """Train a Hugging Face video classifier with AdamW on batches of 48 drawn by a fixed
    generator; returns its held-out top-1 accuracy (the model is left in eval mode)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        pick = torch.randint(0, len(y), (48,), generator=gen)
        loss = model(pixel_values=x[pick], labels=y[pick]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return (model(pixel_values=test_x).logits.argmax(-1) == test_y).float().mean().item()


def fixed_latency(lat):
    """``lat`` (a :class:`~ats_vit.latency.LatencyModel`) with a hand-set table: a dense block
    costs its token count (ms), a sampling block 1 ms more than a dense block of its output, the
    stem 5 ms; the same on every machine, so tests of latency searches do not depend on timing."""
    from ats_vit import latency

    widths = lat.table.widths
    lat.table.dense = [w * 1e-3 for w in widths]
    lat.table.dense_in = {c: list(lat.table.dense) for c in ("sized", "padded")}
    lat.table.stem = 5e-3
    grid = [
        [
            (widths[j] + 1) * 1e-3 if j < i else widths[i] * 1e-3 if j == i else float("nan")
            for j in range(len(widths))
        ]
        for i in range(len(widths))
    ]
    lat.table.rules = {rule.value: [list(row) for row in grid] for rule in latency.RULE_OPTIONS}
    lat.table.fit = {}
    return lat


def measured_gflops(fn: Callable[[], object]) -> float:
    """Multiply-adds (GFLOPs, fvcore's convention) of ``fn()`` as PyTorch's own counter sees
    them (it counts 2 FLOPs per multiply-add; the math SDPA backend makes attention visible to
    it), plus the products it does not see because they are element-wise: the CLS row's
    logits (one per key and channel) and the significance scores (Σ_h A·||V||: one per head
    and candidate), read from the inputs of each call."""
    products = []

    def counting(real: Callable[..., torch.Tensor], count: Callable[..., int]) -> Callable[..., torch.Tensor]:
        def wrapped(*args: object, **kwargs: object) -> torch.Tensor:
            products.append(count(*args))
            return real(*args, **kwargs)

        return wrapped

    counts: dict[str, Callable[..., int]] = {
        "cls_attention": lambda q_cls, k, *rest: k.numel(),
        "significance_scores": lambda cls_attn, *rest: cls_attn.numel(),
        "official_scores": lambda cls_attn, *rest: cls_attn.numel(),
    }
    originals = {name: getattr(sampling if name != "cls_attention" else attention, name) for name in counts}
    # every ats_vit module that imported one of them by name
    holders = [
        (module, name)
        for module in list(sys.modules.values())
        if getattr(module, "__name__", "").startswith("ats_vit")
        for name, original in originals.items()
        if getattr(module, name, None) is original
    ]
    try:
        for module, name in holders:
            setattr(module, name, counting(originals[name], counts[name]))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            fn()
    finally:
        for module, name in holders:
            setattr(module, name, originals[name])
    return (counter.get_total_flops() / 2 + sum(products)) / 1e9


class FakeClock:
    """A clock that each call of ``fn`` advances by its own duration: timings without sleeping."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def call(self, seconds: float):
        def fn():
            self.now += seconds

        return fn


def timed_by_key(monkeypatch, module, seconds: Callable[[str], float]) -> FakeClock:
    """Make ``module``'s ``time_round_robin`` time each function as taking ``seconds(name)``
    on a fake clock (the functions still run): what a timing reports can then be checked
    exactly, on any machine, busy or not."""
    from ats_vit import timing

    clock, real = FakeClock(), timing.time_round_robin

    def fake(fns, *args, **kwargs):
        def ticking(name, fn):
            def run():
                out = fn()
                clock.now += seconds(name)
                return out

            return run

        return real({k: ticking(k, f) for k, f in fns.items()}, *args, **{**kwargs, "clock": clock})

    monkeypatch.setattr(module, "time_round_robin", fake)
    return clock
