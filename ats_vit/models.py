"""Models that ats-vit trains and evaluates: their config, how to build them, and one forward
pass that also reports the tokens kept (for GFLOPs), for our ViT and timm's alike."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ats_vit.flops import TokenTrace, ViTCost
from ats_vit.vit import ViT

__all__ = [
    "ARCHS",
    "ModelConfig",
    "Pretrained",
    "build_model",
    "forward_traced",
    "hf_model",
    "read_state_dict",
    "timm_model",
]


@dataclass
class ModelConfig:
    """A ViT of these sizes, and the token selection it runs with.

    ``arch="ats_vit"`` builds :class:`ats_vit.ViT`; ``arch="timm"`` builds timm's own
    ``VisionTransformer`` with the same sizes (class-token pooling), sampling through
    :mod:`ats_vit.timm`; timm needs ``dim_head * heads == dim``. ``budget`` is a
    :class:`ats_vit.budget.Budget` as a dict (``None``: dense), so a checkpoint carries the
    budget it was trained or fine-tuned with.
    """

    image_size: int = 48
    patch_size: int = 8
    num_classes: int = 10
    channels: int = 1
    dim: int = 96
    depth: int = 8
    heads: int = 4
    dim_head: int = 24
    mlp_dim: int = 192
    dropout: float = 0.0
    emb_dropout: float = 0.0
    arch: str = "ats_vit"
    budget: dict | None = None

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


ARCHS = ("ats_vit", "timm")


def build_model(cfg: ModelConfig) -> nn.Module:
    """The model of ``cfg`` (random weights), with its budget applied."""
    from ats_vit.budget import Budget

    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg.arch!r}")
    if cfg.arch == "timm":
        model = _build_timm(cfg)
    else:
        model = ViT(
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            num_classes=cfg.num_classes,
            dim=cfg.dim,
            depth=cfg.depth,
            max_tokens_per_depth=(cfg.num_patches,) * cfg.depth,
            heads=cfg.heads,
            mlp_dim=cfg.mlp_dim,
            channels=cfg.channels,
            dim_head=cfg.dim_head,
            dropout=cfg.dropout,
            emb_dropout=cfg.emb_dropout,
        )
    if cfg.budget is not None:
        Budget.from_dict(cfg.budget).apply(model)
    return model


def _build_timm(cfg: ModelConfig) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    import ats_vit.timm as ats_timm

    if cfg.dim_head * cfg.heads != cfg.dim:
        raise ValueError(
            f"arch='timm' needs dim_head * heads == dim, got {cfg.dim_head} * {cfg.heads} != {cfg.dim}"
        )
    model = VisionTransformer(
        img_size=cfg.image_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.channels,
        num_classes=cfg.num_classes,
        embed_dim=cfg.dim,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_dim / cfg.dim,
        global_pool="token",
        drop_rate=cfg.dropout,
        pos_drop_rate=cfg.emb_dropout,
    )
    # always patched (no layer samples when dense), so every forward leaves a token trace
    return ats_timm.apply(model, layers=[], max_tokens=1)


def forward_traced(model: nn.Module, images: Tensor) -> tuple[Tensor, TokenTrace, ViTCost]:
    """Logits, token trace and cost of one forward pass, for our ViT and (patched) timm and
    Hugging Face models alike."""
    from ats_vit.budget import adapt

    adapter = adapt(model)
    logits, trace = adapter.run(images)
    return logits, trace, adapter.cost


# ---------------------------------------------------------------- pretrained models by name


@dataclass
class Pretrained:
    """A model to evaluate or calibrate, with what its images need.

    transform: the model's own evaluation preprocessing of a PIL image (resize, crop, mean/std,
    interpolation), or None for this project's checkpoints (:mod:`ats_vit.data`'s).
    """

    model: nn.Module
    name: str
    image_size: int
    channels: int
    transform: object | None = None


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a local ``.safetensors`` or ``.pth``/``.pt``/``.bin`` file (tensors
    only: no pickled code is run); a ``{"state_dict": ...}`` or ``{"model": ...}`` wrapper is
    unwrapped."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"weights file {str(path)!r} does not exist or is not a file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors, pickle and zip errors have no common base
        raise ValueError(f"weights file {str(path)!r} is not a readable state dict: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"weights file {str(path)!r} does not hold a state dict of tensors")
    return state


def timm_model(
    name: str, *, pretrained: bool = False, weights: str | Path | None = None, img_size: int | None = None
) -> Pretrained:
    """timm's model ``name`` (timm's weights with ``pretrained``, or a local ``weights`` file),
    with its evaluation preprocessing from timm's data config."""
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("--timm needs timm: pip install 'ats-vit[timm]'") from exc
    if pretrained and weights is not None:
        raise ValueError("give pretrained=True (timm's weights) or a weights file, not both")
    kwargs = {} if img_size is None else dict(img_size=img_size)
    state = None if weights is None else read_state_dict(weights)
    if state is not None and isinstance(state.get("head.weight"), Tensor):
        kwargs["num_classes"] = state["head.weight"].shape[0]  # a fine-tuned head of its own size
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as exc:  # timm's error for an unknown name
        raise ValueError(f"timm cannot build {name!r}: {exc}") from exc
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"weights file {str(weights)!r} does not fit timm's {name}: {exc}") from exc
    # the model's own input size (it differs from its pretrained config's with img_size=...)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    overrides = {} if size is None else dict(input_size=(model.patch_embed.proj.in_channels, *size))
    data_cfg = resolve_data_config(overrides, model=model)
    channels, height, _ = data_cfg["input_size"]
    return Pretrained(model.eval(), name, height, channels, create_transform(**data_cfg))


def hf_model(name_or_dir: str) -> Pretrained:
    """A Hugging Face image classifier (ViT / DeiT) and its image processor, from a hub name or a
    local directory (``save_pretrained``'s output: no network needed)."""
    try:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("--hf needs Hugging Face transformers: pip install 'ats-vit[hf]'") from exc
    try:
        model = AutoModelForImageClassification.from_pretrained(name_or_dir)
        processor = AutoImageProcessor.from_pretrained(name_or_dir)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load the Hugging Face model {name_or_dir!r}: {exc}") from exc

    def transform(image) -> Tensor:
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    size = model.config.image_size
    return Pretrained(model.eval(), str(name_or_dir), size, model.config.num_channels, transform)
