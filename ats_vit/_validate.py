"""Argument checks that raise ValueError/TypeError naming the argument, never assert."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import torch
from torch import Tensor


def is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def non_negative_int(name: str, value: object) -> int:
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def pair(name: str, value: object) -> tuple[int, int]:
    """An int or an (height, width) pair of positive ints."""
    if is_int(value):
        side = positive_int(name, value)
        return side, side
    if isinstance(value, Sequence) and len(value) == 2:
        return positive_int(f"{name}[0]", value[0]), positive_int(f"{name}[1]", value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def probability(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def choice(name: str, value: Any, accepted: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in accepted:
        raise ValueError(f"{name} must be one of {tuple(accepted)}, got {value!r}")
    return value


def schedule(value: object, depth: int, name: str = "max_tokens_per_depth") -> tuple[int, ...]:
    """One positive int per layer, non-increasing (a token cap per layer)."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name} must be a sequence of ints (one per layer), got {value!r}")
    tokens = tuple(positive_int(f"{name}[{i}]", t) for i, t in enumerate(value))
    if len(tokens) != depth:
        raise ValueError(f"{name} must have one entry per layer (depth={depth}), got {len(tokens)}: {tokens}")
    if any(later > earlier for earlier, later in itertools.pairwise(tokens)):
        raise ValueError(f"{name} must be non-increasing, got {tokens}")
    return tokens


def images(img: object, channels: int, size: tuple[int, int], param_dtype: torch.dtype) -> Tensor:
    """A (b, channels, *size) floating tensor with b >= 1, whose dtype the model can take."""
    if not isinstance(img, Tensor):
        raise TypeError(f"img must be a torch.Tensor, got {type(img).__name__}")
    if not img.is_floating_point():
        raise TypeError(f"img must be a floating point tensor, got dtype {img.dtype}")
    if img.dim() != 4:
        raise ValueError(
            f"img must have shape (batch, {channels}, {size[0]}, {size[1]}), got {tuple(img.shape)}"
        )
    b, c, h, w = img.shape
    if b == 0:
        raise ValueError("img is an empty batch (batch size 0)")
    if c != channels or (h, w) != size:
        raise ValueError(
            f"img must have shape (batch, {channels}, {size[0]}, {size[1]}) for this model "
            f"(channels={channels}, image_size={size}), got {tuple(img.shape)}"
        )
    if img.dtype != param_dtype and not torch.is_autocast_enabled(img.device.type):
        raise TypeError(
            f"img dtype {img.dtype} does not match the model's parameters ({param_dtype}); "
            f"cast one of them or run under torch.autocast"
        )
    return img


def positive_float(name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def state_dict_mismatch(own: Mapping[str, Tensor], given: Mapping[str, Tensor], shown: int = 4) -> str | None:
    """A short summary of how ``given`` does not fit a model whose state dict is ``own`` (counts
    of missing, unexpected and mis-shaped keys with the first few names), or None if it fits."""
    missing = sorted(set(own) - set(given))
    unexpected = sorted(set(given) - set(own))
    mismatched = [
        f"{k} {tuple(given[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in given and tuple(given[k].shape) != tuple(own[k].shape)
    ]

    def first(names: list[str]) -> str:
        more = f", ... {len(names) - shown} more" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    parts = [
        f"{len(names)} {what} ({first(names)})"
        for what, names in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("keys of another shape (file vs model)", mismatched),
        )
        if names
    ]
    return "; ".join(parts) if parts else None


def finite_images(images: Tensor, what: str = "images") -> None:
    """Refuse images holding NaN or infinity, naming how many (a model's output on them means
    nothing, and every rule would sample from undefined scores)."""
    bad = int((~torch.isfinite(images.flatten(1))).any(dim=1).sum())
    if bad:
        first = int((~torch.isfinite(images.flatten(1))).any(dim=1).nonzero()[0])
        raise ValueError(
            f"{bad} of the {len(images)} {what} hold NaN or infinite values (the first at index {first}); "
            "fix or leave them out"
        )


def class_labels(labels: Tensor, num_classes: int, what: str = "labels") -> None:
    """Refuse labels outside [0, num_classes), naming how many and the range found."""
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{what} must be integer class indices, got dtype {labels.dtype}")
    outside = (labels < 0) | (labels >= num_classes)
    if bool(outside.any()):
        raise ValueError(
            f"{int(outside.sum())} of the {len(labels)} {what} lie outside [0, {num_classes}) (the model has "
            f"{num_classes} classes; found {int(labels.min())}..{int(labels.max())}): are the data's "
            "classes the model's? Without matching labels, calibrate for agreement with the dense model "
            "(labels=None, --no-labels)"
        )


def deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn that ``old`` (a 0.x name) is deprecated for ``new``; it keeps working in 1.x."""
    warnings.warn(
        f"{old} is deprecated since ats-vit 1.0 and will be removed in 2.0; use {new}",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
