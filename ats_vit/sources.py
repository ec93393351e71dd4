"""Where a model to calibrate or evaluate comes from: a checkpoint of ours, a timm model by
name, or a Hugging Face classifier, each with the preprocessing its images need.

Every failure a user can cause here (an unknown name, no network for pretrained weights, a
weights file of another architecture) is one ``ValueError`` line naming the cause.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit.checkpoint import load_model
from ats_vit.families import Family, family_of
from ats_vit.models import ModelConfig

__all__ = ["Source", "checkpoint_source", "hf_source", "read_state_dict", "timm_source"]


@dataclass
class Source:
    """A model to evaluate or calibrate, and what its images need.

    transform: the model's own evaluation preprocessing of a PIL image (resize, crop, mean/std,
    interpolation), or None for this project's checkpoints (:mod:`ats_vit.data`'s, in the
    model's channel count). config: the training config of a checkpoint of ours, else None.
    """

    model: nn.Module
    name: str
    transform: Callable[[Any], Tensor] | None = None
    config: ModelConfig | None = None

    @property
    def family(self) -> Family:
        return family_of(self.model)

    @property
    def image_size(self) -> int:
        return self.family.image_size[0]

    @property
    def channels(self) -> int:
        return self.family.channels


def checkpoint_source(path: str | Path) -> Source:
    """A checkpoint written by ``ats-vit train`` (with the budget it was trained with)."""
    model, cfg = load_model(path)
    run = Path(path)
    return Source(model.eval(), f"{run.parent.name}/{run.name}" if run.parent.name else run.name, config=cfg)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (tensors
    only: no pickled code is run); a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
    unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist or is not a file")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise ValueError(
            f"weights file {str(path)!r} is not a readable state dict: {_first_line(exc)}"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


@contextmanager
def _offline_without_hub(downloading: bool, host: str = "huggingface.co") -> Iterator[None]:
    """Where the hub's host does not even resolve, ask Hugging Face's client for its local
    cache only: it fails at once instead of retrying for a minute (cached weights still load)."""
    if not downloading:
        yield
        return
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        import huggingface_hub.constants as hub

        before, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
        try:
            yield
        finally:
            hub.HF_HUB_OFFLINE = before
        return
    yield


def timm_source(
    name: str, *, pretrained: bool = False, weights: str | Path | None = None, img_size: int | None = None
) -> Source:
    """timm's model ``name`` (timm's weights with ``pretrained``, or a local ``weights`` file,
    whose position embedding is resampled as timm does when ``img_size`` differs), with its
    evaluation preprocessing from timm's data config."""
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
        from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("timm models need timm: pip install 'ats-vit[timm]'") from exc
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True (timm's weights) or a weights file, not both")
    if not timm.is_model(name):
        raise ValueError(f"timm has no model named {name!r} (timm.list_models('*vit*') lists its ViTs)")
    kwargs: dict[str, Any] = {} if img_size is None else dict(img_size=img_size)
    state = None if weights is None else read_state_dict(weights)
    if state is not None and isinstance(state.get("head.weight"), Tensor):
        kwargs["num_classes"] = state["head.weight"].shape[0]  # a fine-tuned head of its own size
    try:
        with _offline_without_hub(pretrained):
            model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except Exception as exc:
        if not pretrained:
            raise ValueError(f"timm cannot build {name!r}: {_first_line(exc)}") from exc
        raise ValueError(
            f"could not load timm's pretrained weights for {name!r} ({type(exc).__name__}: "
            f"{_first_line(exc)}); without network access, pass a local weights file instead"
        ) from exc
    if state is not None:
        if isinstance(model, VisionTransformer):
            state = checkpoint_filter_fn(state, model)  # resamples the position embedding to img_size
        problem = _validate.state_dict_mismatch(model.state_dict(), state)
        if problem:
            raise ValueError(f"weights file {str(weights)!r} does not fit timm's {name}: {problem}")
        model.load_state_dict(state)
    family = family_of(model)  # refuses (one line) a model ats-vit cannot serve
    data_cfg = resolve_data_config(dict(input_size=(family.channels, *family.image_size)), model=model)
    return Source(model.eval(), name, create_transform(**data_cfg))


def hf_source(name_or_dir: str) -> Source:
    """A Hugging Face vision model and its image processor, from a hub name or a local
    directory (``save_pretrained``'s output: no network needed).

    The model is built as the class its checkpoint was saved as (``config.architectures``)
    when ats-vit serves that class: a feature tower (``CLIPVisionModel``, ``Dinov2Model``, ...)
    stays a tower instead of getting a randomly initialised classifier head; otherwise it is
    loaded as an image classifier. Video models are refused: the command line reads images."""
    try:
        from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

        from ats_vit.families.hf import MODELS
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("Hugging Face models need transformers: pip install 'ats-vit[hf]'") from exc
    served = {cls.__name__: cls for cls in MODELS}
    try:
        with _offline_without_hub(not Path(name_or_dir).is_dir()):
            config = AutoConfig.from_pretrained(name_or_dir)
            saved_as = served.get(next(iter(getattr(config, "architectures", None) or []), ""))
            loader: Any = saved_as or AutoModelForImageClassification
            model = loader.from_pretrained(name_or_dir)
            processor = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the Hugging Face model {name_or_dir!r}: {_first_line(exc)}") from exc
    if family_of(model).frames > 1:
        raise ValueError(
            f"{type(model).__name__} is a video model; the command line reads images: use "
            "ats_vit.hf.apply / ats_vit.calibrate.calibrate on (b, frames, c, h, w) clips from Python"
        )

    def transform(image: Any) -> Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    family_of(model)  # refuses (one line) a model ats-vit cannot serve
    return Source(model.eval(), str(name_or_dir), transform)
