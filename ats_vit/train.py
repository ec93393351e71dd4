"""Training and evaluation loops, single process or ``torchrun`` DDP (gloo on CPU, nccl on GPU).

Checkpoints are safetensors files (no pickled code), written atomically (temp file + rename)
every ``ckpt_every`` steps and at the end. Resuming restores weights, optimiser, schedule,
step and data order, so an interrupted run continues to the same final weights.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.vit import ViT

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "TrainConfig",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "model_with_budget",
    "save_checkpoint",
    "train",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or made for another configuration."""


@dataclass
class ModelConfig:
    """A ViT of these sizes; ``max_tokens_per_depth=None`` means dense (every patch kept).

    ``arch="ats_vit"`` builds :class:`ats_vit.ViT`; ``arch="timm"`` builds timm's own
    ``VisionTransformer`` with the same sizes (class-token pooling), sampling through
    :mod:`ats_vit.timm`; timm needs ``dim_head * heads == dim``.
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
    max_tokens_per_depth: tuple[int, ...] | None = None
    sampler: str = "inverse_transform"
    arch: str = "ats_vit"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 15
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    seed: int = 0
    ckpt_every: int = 200  # steps
    amp: bool = True  # bf16 autocast where available
    out_dir: str = "runs/demo"


ARCHS = ("ats_vit", "timm")


def build_model(cfg: ModelConfig) -> nn.Module:
    if cfg.arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {cfg.arch!r}")
    schedule = cfg.max_tokens_per_depth or (cfg.num_patches,) * cfg.depth
    if cfg.arch == "timm":
        return _build_timm(cfg, schedule)
    return ViT(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        num_classes=cfg.num_classes,
        dim=cfg.dim,
        depth=cfg.depth,
        max_tokens_per_depth=schedule,
        heads=cfg.heads,
        mlp_dim=cfg.mlp_dim,
        channels=cfg.channels,
        dim_head=cfg.dim_head,
        dropout=cfg.dropout,
        emb_dropout=cfg.emb_dropout,
        sampler=cfg.sampler,
    )


def _build_timm(cfg: ModelConfig, schedule: tuple[int, ...]) -> nn.Module:
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
    layers = [i for i, cap in enumerate(schedule) if cap < cfg.num_patches]
    caps = [schedule[i] for i in layers]
    return ats_timm.apply(model, layers=layers, max_tokens=caps or 1, sampler=cfg.sampler)


def forward_traced(model: nn.Module, images: Tensor) -> tuple[Tensor, TokenTrace, ViTCost]:
    """Logits, token trace and cost of one forward pass, for our ViT and patched timm models."""
    if isinstance(model, ViT):
        feats, _, _, trace = model.forward_features(images)
        return model.forward_head(feats), trace, model.cost
    import ats_vit.timm as ats_timm

    logits = model(images)
    return logits, ats_timm.last_trace(model), ats_timm.cost(model)


# ---------------------------------------------------------------- checkpoints


def _model_config_from_json(text: str) -> ModelConfig:
    raw = json.loads(text)
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(raw) - known
    if unknown:
        raise CheckpointError(f"checkpoint model config has unknown fields {sorted(unknown)}")
    if raw.get("max_tokens_per_depth") is not None:
        raw["max_tokens_per_depth"] = tuple(raw["max_tokens_per_depth"])
    return ModelConfig(**raw)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    cfg: ModelConfig,
    extra: dict[str, Tensor] | None = None,
    meta: dict[str, str] | None = None,
) -> None:
    """Write weights (+ optional training state) as safetensors, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tensors.update({k: v.contiguous().cpu() for k, v in (extra or {}).items()})
    metadata = {"format": "ats-vit/1", "model_config": json.dumps(asdict(cfg)), **(meta or {})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)  # atomic: a kill leaves the old checkpoint or the new one, never half


def load_checkpoint(
    path: str | Path,
) -> tuple[ModelConfig, dict[str, Tensor], dict[str, Tensor], dict[str, str]]:
    """(model config, model state dict, other tensors, metadata); raises CheckpointError."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
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
    cfg = _model_config_from_json(meta["model_config"])
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    other = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    return cfg, state, other, meta


def load_model(path: str | Path, **overrides) -> tuple[nn.Module, ModelConfig]:
    """Build the checkpoint's model (with config ``overrides``, e.g. an ATS schedule) and load it."""
    cfg, state, _, _ = load_checkpoint(path)
    cfg = ModelConfig(**{**asdict(cfg), **overrides})
    return _model_with_state(cfg, state, path), cfg


def model_with_budget(
    cfg: ModelConfig,
    state: dict[str, Tensor],
    path: str | Path,
    schedule: tuple[int, ...] | None,
    sampler: str,
) -> nn.Module:
    """The model of a loaded checkpoint (``cfg``, ``state`` from :func:`load_checkpoint`) with
    another token schedule (``None``: dense) and sampler, without reading the file again."""
    return _model_with_state(
        ModelConfig(**{**asdict(cfg), "max_tokens_per_depth": schedule, "sampler": sampler}), state, path
    )


def _model_with_state(cfg: ModelConfig, state: dict[str, Tensor], path: str | Path) -> nn.Module:
    model = build_model(cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit its model config: {exc}") from exc
    return model


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, Tensor]:
    out = {}
    for i, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"optim.{i}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def _load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> None:
    state_dict = opt.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state.setdefault(int(i), {})[name] = value
    state_dict["state"] = state
    opt.load_state_dict(state_dict)


# ---------------------------------------------------------------- distributed


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> torch.device:
    """Join the torchrun process group if launched by torchrun; return this process's device."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


# ---------------------------------------------------------------- loops


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(data: Dataset, cfg: TrainConfig, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The epoch's batches in a order fixed by (seed, epoch), skipping the first ``skip``."""
    rank, world = _dist_info()
    if world > 1:
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(data, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
    indices = list(sampler)[skip * cfg.batch_size :]
    loader = DataLoader(torch.utils.data.Subset(data, indices), batch_size=cfg.batch_size, drop_last=True)
    yield from loader


def _tensorboard(out: Path):
    """A TensorBoard writer when tensorboard is installed, else None (CSV is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def steps_per_epoch(data: Dataset, cfg: TrainConfig) -> int:
    _, world = _dist_info()
    return (len(data) // world) // cfg.batch_size


def train(cfg: TrainConfig, train_data: Dataset, resume: bool = False, progress: bool = True) -> Path:
    """Train a dense ViT; return the final checkpoint's path (``out_dir/final.safetensors``)."""
    from tqdm.auto import tqdm

    device = init_distributed()
    rank, world = _dist_info()
    out = Path(cfg.out_dir)
    last = out / "last.safetensors"
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resume and last.exists():
        saved_cfg, state, other, _ = load_checkpoint(last)
        if saved_cfg != cfg.model:
            raise CheckpointError(f"{last} was trained with {saved_cfg}, not {cfg.model}")
        model.load_state_dict(state)
        _load_optimizer_tensors(opt, other)
        step = int(other["train.step"])
        torch.set_rng_state(other["train.rng"])
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    per_epoch = steps_per_epoch(train_data, cfg)
    if per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({len(train_data)})")
    total = per_epoch * cfg.epochs
    # bf16 autocast pays off on GPUs; CPUs without native bf16 (like AVX2 ones) only slow down
    use_amp = cfg.amp and device.type == "cuda"
    log_path = out / "metrics.csv"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    bar = tqdm(total=total, initial=step, disable=not progress or rank != 0, desc="train", unit="step")
    board = _tensorboard(out) if rank == 0 else None

    def checkpoint(path: Path) -> None:
        extra = {
            **_optimizer_tensors(opt),
            "train.step": torch.tensor(step),
            "train.rng": torch.get_rng_state(),
        }
        if rank == 0:
            save_checkpoint(path, model, cfg.model, extra)
        if world > 1:
            dist.barrier()

    model.train()
    while step < total:
        epoch, offset = divmod(step, per_epoch)
        for images, labels in _batches(train_data, cfg, epoch, offset):
            images, labels = images.to(device), labels.to(device)
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, total, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = F.cross_entropy(ddp(images), labels, label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if rank == 0 and (step % 20 == 0 or step == total):
                lr, value = _lr_at(step - 1, total, cfg), loss.item()
                bar.set_postfix(loss=f"{value:.3f}", epoch=epoch)
                new = not log_path.exists()
                with open(log_path, "a", newline="") as f:
                    writer = csv.writer(f)
                    if new:
                        writer.writerow(["step", "epoch", "lr", "loss", "time"])
                    writer.writerow([step, epoch, f"{lr:.6g}", f"{value:.5f}", f"{time.time():.1f}"])
                if board is not None:
                    board.add_scalar("train/loss", value, step)
                    board.add_scalar("train/lr", lr, step)
            if step % cfg.ckpt_every == 0 or step == total:
                checkpoint(last)
            if step == total:
                break
    bar.close()
    if board is not None:
        board.close()
    final = out / "final.safetensors"
    if rank == 0:
        save_checkpoint(final, model, cfg.model)
    if world > 1:
        dist.barrier()
    return final


@torch.inference_mode()
def evaluate(model: nn.Module, data: Dataset, batch_size: int = 256) -> dict[str, object]:
    """Accuracy, mean kept patch tokens per layer and mean GFLOPs per image."""
    model.eval()
    # accumulate on the device; one sync at the end instead of two per batch
    correct, seen, kept_sum, flops_sum = 0, 0, 0, 0
    for images, labels in DataLoader(data, batch_size=batch_size):
        logits, trace, cost = forward_traced(model, images)
        correct = correct + (logits.argmax(-1) == labels).sum()
        seen += len(labels)
        kept_sum = kept_sum + trace.kept_per_layer().sum(0).double()
        flops_sum = flops_sum + gflops(cost, trace).double().sum()
    kept = (kept_sum / seen).tolist()
    return dict(accuracy=int(correct) / seen, kept_per_layer=kept, gflops=float(flops_sum) / seen)


def budget_schedule(cfg: ModelConfig, keep: float, start_layer: int) -> tuple[int, ...]:
    """Cap ``round(keep * num_patches)`` patch tokens from ``start_layer`` on (``keep=1``: dense)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratios must be in (0, 1], got {keep}")
    if not 0 <= start_layer < cfg.depth:
        raise ValueError(f"start_layer must be in [0, {cfg.depth}), got {start_layer}")
    n = cfg.num_patches
    cap = max(1, round(keep * n))
    return (n,) * start_layer + (cap,) * (cfg.depth - start_layer)


def evaluate_budgets(
    checkpoint: str | Path,
    data: Dataset,
    keeps: tuple[float, ...] = (1.0, 0.75, 0.5, 0.35, 0.25),
    start_layer: int = 3,
    sampler: str = "inverse_transform",
    batch_size: int = 256,
    timing_repeats: int = 3,
) -> list[dict[str, object]]:
    """Off-the-shelf ATS at several budgets on one checkpoint (no fine-tuning).

    Each row: budget label, schedule, accuracy, mean kept patch tokens per layer, GFLOPs per
    image and throughput (img/s, median of ``timing_repeats`` passes over one batch).
    """
    import statistics

    from tqdm.auto import tqdm

    rows = []
    timing_batch = next(iter(DataLoader(data, batch_size=batch_size)))[0]
    base_cfg, state, _, _ = load_checkpoint(checkpoint)
    for keep in tqdm(keeps, desc="budgets", unit="budget"):
        schedule = budget_schedule(base_cfg, keep, start_layer)
        model = model_with_budget(base_cfg, state, checkpoint, schedule, sampler)
        result = evaluate(model, data, batch_size)
        times = []
        with torch.inference_mode():
            model(timing_batch)
            for _ in range(timing_repeats):
                start = time.perf_counter()
                model(timing_batch)
                times.append(time.perf_counter() - start)
        label = "dense" if keep == 1.0 else f"keep {keep:g}"
        rows.append(
            dict(
                label=label,
                keep=keep,
                start_layer=start_layer,
                schedule=list(schedule),
                sampler=sampler,
                **result,
                img_per_s=len(timing_batch) / statistics.median(times),
            )
        )
    return rows
