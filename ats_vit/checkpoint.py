"""Checkpoints: safetensors files (no pickled code) that carry their model config, written
atomically (temp file + rename), so a kill leaves the old file or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from ats_vit import _validate
from ats_vit._io import default_mode
from ats_vit.models import ModelConfig, build_model

__all__ = ["CheckpointError", "load_checkpoint", "load_model", "save_checkpoint"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or made for another configuration."""


def _model_config_from_json(text: str, where: str) -> ModelConfig:
    """The model config in a checkpoint's metadata, every field's type checked (``where``
    names the file in errors)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{where}: its model config is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: its model config is not a JSON object")
    defaults = {f.name: f.default for f in fields(ModelConfig)}
    unknown = set(raw) - set(defaults)
    if unknown:
        raise CheckpointError(f"{where}: its model config has unknown fields {sorted(unknown)}")
    for name, value in raw.items():
        default = defaults[name]
        kind: tuple[type, ...] = (dict, type(None)) if name == "budget" else (type(default),)
        if kind == (float,):
            kind = (int, float)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
            raise CheckpointError(
                f"{where}: model config field {name!r} must be {' or '.join(k.__name__ for k in kind)}, "
                f"got {value!r}"
            )
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise CheckpointError(f"{where}: model config field {name!r} must be >= 0, got {value}")
    try:
        return ModelConfig(**raw)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its model config is invalid: {exc}") from None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: ModelConfig,
    extra: dict[str, Tensor] | None = None,
) -> None:
    """Write weights (+ optional training state) as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({k: v.contiguous().cpu() for k, v in (extra or {}).items()})
    metadata = {"format": "ats-vit/1", "model_config": json.dumps(asdict(cfg))}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, default_mode())
    os.close(fd)
    try:  # atomic: a kill or a full disk leaves the old checkpoint or the new one, never half
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(
    path: str | Path,
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """(model config, model state dict, other tensors, metadata); raises CheckpointError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        hint = path / "final.safetensors"
        raise CheckpointError(
            f"checkpoint {str(path)!r} is a directory, not a checkpoint file"
            + (f" (did you mean {str(hint)!r}?)" if hint.is_file() else "")
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} is not a readable safetensors file: {exc}") from exc
    if meta.get("format") != "ats-vit/1" or "model_config" not in meta:
        raise CheckpointError(
            f"checkpoint {str(path)!r} was not written by ats-vit (metadata {sorted(meta)})"
        )
    cfg = _model_config_from_json(meta["model_config"], f"checkpoint {str(path)!r}")
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    other = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return cfg, state, other, meta


def load_model(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Build the checkpoint's model (with the budget it was trained with) and load its weights."""
    cfg, state, _, _ = load_checkpoint(path)
    # the shapes the config implies, checked on the meta device (no memory) before the model is
    # built: a small file whose config claims a huge model is refused, not allocated
    try:
        with torch.device("meta"):
            skeleton = build_model(cfg)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {str(path)!r}: its model config is invalid: {exc}") from None
    problem = _validate.state_dict_mismatch(skeleton.state_dict(), state)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its model config: {problem}")
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its model config: {exc}") from exc
    return model, cfg


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"optim.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state_dict = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    state_dict["state"] = state
    opt.load_state_dict(state_dict)
