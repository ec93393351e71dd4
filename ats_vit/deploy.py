"""Inference at a fixed batch size with nothing between the kernels: the deployment path.

On a GPU, small batches are launch-bound: a ViT forward at batch 1-16 takes less time than
launching its kernels, so a sampling layer's extra small kernels and its host sync (sizing the
padded output) can make a budget slower than dense. :func:`compile` removes both: static shapes
(every sampling layer padded to its cap: no host sync), then ``torch.compile`` with CUDA graphs
(``mode="reduce-overhead"``: one graph launch per forward), under bfloat16 autocast when asked.
On the CPU there are no launches to save, so by default the model runs eagerly with static
shapes (``backend`` compiles it anyway, e.g. ``"inductor"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit.families import family_of

__all__ = ["compile"]


def compile(
    model: nn.Module,
    batch_size: int,
    *,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    mode: str | None = None,
) -> Callable[[Tensor], Tensor]:
    """A function images (b, c, h, w) -> logits for ``model`` (any family, with its budget)
    at a fixed ``batch_size`` (smaller batches are padded to it, larger ones refused).

    The model is set to static shapes (in place) and eval mode. ``dtype``: autocast to it
    (``torch.bfloat16`` on GPUs). ``backend``/``mode``: ``torch.compile``'s; the default is
    ``inductor`` with ``reduce-overhead`` (CUDA graphs) when the model is on a GPU, and no
    compilation on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    family = family_of(model)
    family.set_options(static_shape=True)
    model.eval()
    device = next(model.parameters()).device
    if backend is None and device.type == "cuda":
        backend, mode = "inductor", mode or "reduce-overhead"
    autocast = torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def forward(images: Tensor) -> Tensor:
        with autocast:
            return family.run(images)[0]

    run: Callable[[Tensor], Any] = forward
    if backend is not None:
        run = torch.compile(forward, backend=backend, mode=mode, dynamic=False, fullgraph=True)

    @torch.inference_mode()
    def infer(images: Tensor) -> Tensor:
        b = images.shape[0]
        if b > batch_size:
            raise ValueError(f"this function runs batches of at most {batch_size} images, got {b}")
        if b < batch_size:  # one static shape: pad with copies of the first image, drop them after
            images = torch.cat((images, images[:1].expand(batch_size - b, *images.shape[1:])))
        logits = run(images.to(device))
        return logits[:b].clone()  # a CUDA graph's output is overwritten by the next replay

    return infer
