"""The training loop, single process or ``torchrun`` DDP (gloo on CPU, nccl on GPU).

Checkpoints (:mod:`ats_vit.checkpoint`) are written every ``ckpt_every`` steps and at the
end. Resuming restores weights, optimiser, schedule, step and data order, so an interrupted
run continues to the same final weights.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ats_vit import _validate
from ats_vit._io import write_atomic, write_text_atomic
from ats_vit._progress import bar as progress_bar
from ats_vit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_optimizer_tensors,
    optimizer_tensors,
    save_checkpoint,
)
from ats_vit.distributed import init_distributed, rank_world
from ats_vit.evaluate import evaluate
from ats_vit.families import family_of
from ats_vit.models import ModelConfig, build_model

__all__ = ["RunExistsError", "TrainConfig", "TrainingInterrupted", "train"]


@dataclass
class TrainConfig:
    """A training run. ``model.budget`` (if any) is active while training: the model learns to
    work with the tokens it keeps. ``init_from`` names a checkpoint whose weights the run starts
    from (fine-tuning); ``jitter=False`` keeps the inverse-transform points at their evaluation
    positions during training too (deterministic selection, as DDP equivalence tests need)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    label_smoothing: float = 0.1
    seed: int = 0
    ckpt_every: int = 200  # steps
    amp: bool = True  # bf16 autocast where available
    out_dir: str = "runs/demo"
    init_from: str | None = None
    jitter: bool = True
    data: str | None = None  # what the training images are ("demo", a folder): recorded, for resuming

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> TrainConfig:
        """A config as :func:`train` saved it (``config.json``); errors name ``source``."""
        try:
            fields_ = dict(raw)
            model = ModelConfig(**fields_.pop("model"))
            return cls(model=model, **fields_)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{source} is not a training config of this ats-vit: {exc}") from None


# what a resumed run may change; every other setting is the run's own
MAY_CHANGE_ON_RESUME = ("ckpt_every", "out_dir")


# ---------------------------------------------------------------- loops


def _lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _batches(data: Dataset, cfg: TrainConfig, epoch: int, skip: int) -> Iterator[tuple[Tensor, Tensor]]:
    """This rank's batches of the epoch, skipping the first ``skip``.

    Every rank draws the same permutation of the data from (seed, epoch) and takes every
    ``world``-th item of it, so the ranks' batches j together are exactly batch j of one
    process with ``world`` times the batch size: DDP trains the same model as one process.
    """
    rank, world = rank_world()
    order = torch.randperm(_size(data), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    usable = steps_per_epoch(data, cfg) * cfg.batch_size * world
    indices = order[:usable][rank::world].tolist()[skip * cfg.batch_size :]
    # the loader's own generator: creating it must not draw from the global RNG, whose state a
    # checkpoint saves for the ATS sample points (a resumed run must draw the same ones)
    loader = DataLoader(
        torch.utils.data.Subset(data, indices),
        batch_size=cfg.batch_size,
        drop_last=True,
        generator=torch.Generator(),
    )
    yield from loader


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer when tensorboard is installed, else None (CSV is always written)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _size(data: Dataset) -> int:
    return len(data)  # type: ignore[arg-type]  # map-style data sets have a length


def steps_per_epoch(data: Dataset, cfg: TrainConfig) -> int:
    _, world = rank_world()
    return (_size(data) // world) // cfg.batch_size


def _initial_weights(cfg: TrainConfig) -> dict[str, Tensor]:
    """The weights of ``cfg.init_from``, which must be a model of the same sizes (any budget)."""
    if cfg.init_from is None:
        raise ValueError("init_from names no checkpoint")
    saved, state, _, _ = load_checkpoint(cfg.init_from)
    if replace(saved, budget=None) != replace(cfg.model, budget=None):
        raise CheckpointError(
            f"{cfg.init_from} holds {replace(saved, budget=None)}, not a model of the sizes to train "
            f"({replace(cfg.model, budget=None)})"
        )
    return state


# the files a run writes in its folder (and a TensorBoard folder)
RUN_FILES = ("config.json", "metrics.csv", "epochs.csv", "last.safetensors", "final.safetensors")


class RunExistsError(ValueError):
    """The output folder already holds a run that would be written over, or holds no run to
    resume, or a run configured otherwise than the resume asks."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where the last checkpoint is."""


def prepare_run_dir(
    out: Path, *, resume: bool, overwrite: bool, init_from: str | None = None, remove: bool = True
) -> None:
    """Refuse to write over an existing run (unless resuming it, or told to overwrite it, in
    which case its files are removed first when ``remove``) and never over the checkpoint a
    run starts from. Every DDP rank checks (so all refuse alike); one removes."""
    writes = [out / name for name in RUN_FILES]
    if init_from is not None and any(Path(init_from).resolve() == w.resolve() for w in writes):
        raise ValueError(
            f"the checkpoint to start from ({init_from}) is a file this run would write in {out}; "
            "choose another output folder"
        )
    existing = [p for p in writes if p.exists()]
    if not existing or resume:
        return
    if not overwrite:
        raise RunExistsError(
            f"{out} already holds a run ({', '.join(p.name for p in existing)}): resume it, or "
            "overwrite it to start afresh (its files are replaced)"
        )
    if remove:
        for path in existing:
            path.unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)


def saved_config(out: Path) -> TrainConfig | None:
    """The config a run in ``out`` was started with (its ``config.json``), or None."""
    path = out / "config.json"
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not readable JSON ({exc}); resume needs the run's own config") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} does not hold a training config")
    return TrainConfig.from_dict(raw, str(path))


def check_resumable(cfg: TrainConfig) -> None:
    """Raise :class:`RunExistsError` unless ``cfg.out_dir`` holds a run to resume (its
    ``last.safetensors``) that was configured as ``cfg`` (but for :data:`MAY_CHANGE_ON_RESUME`):
    a resume continues the run, it never starts a new one or changes its recipe."""
    out = Path(cfg.out_dir)
    last = out / "last.safetensors"
    if not last.is_file():
        held = [name for name in RUN_FILES if (out / name).exists()]
        what = f"it holds {', '.join(held)} but" if held else "it holds"
        raise RunExistsError(
            f"nothing to resume in {out}: {what} no last.safetensors; start afresh with --overwrite (or "
            "without --resume in a new folder)"
        )
    saved = saved_config(out)
    if saved is None:
        return
    mine, theirs = asdict(cfg), asdict(saved)
    differ = [k for k in mine if k not in MAY_CHANGE_ON_RESUME and mine[k] != theirs.get(k)]
    if differ:
        shown = ", ".join(f"{k}={theirs.get(k)!r} (asked {mine[k]!r})" for k in differ)
        raise RunExistsError(
            f"the run in {out} was configured with {shown}; a resume keeps the run's own settings "
            f"(only {', '.join(MAY_CHANGE_ON_RESUME)} may change): leave those options out, or "
            "start afresh with --overwrite"
        )


def _check_labels(data: Dataset, num_classes: int) -> None:
    """Refuse training labels the model's head cannot score (before the run writes anything)."""
    labels = None
    if isinstance(data, TensorDataset) and len(data.tensors) > 1:
        labels = data.tensors[1]
    elif isinstance(getattr(data, "targets", None), list):
        labels = torch.tensor(data.targets)  # type: ignore[attr-defined]
    elif isinstance(getattr(getattr(data, "folder", None), "targets", None), list):
        labels = torch.tensor(data.folder.targets)  # type: ignore[attr-defined]
    if labels is not None and len(labels):
        _validate.class_labels(labels, num_classes, "training labels")


def _drop_metrics_after(path: Path, step: int) -> None:
    """Forget the logged rows past ``step`` (logged after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    # a row cut short by an interrupted write has too few fields: drop it too
    kept = rows[:1] + [r for r in rows[1:] if len(r) == len(rows[0]) and r[0].isdigit() and int(r[0]) <= step]
    write_atomic(path, lambda f: csv.writer(f).writerows(kept))


def _log_epoch(
    path: Path,
    step: int,
    epoch: int,
    loss_sum: Tensor,
    steps: int,
    model: nn.Module,
    val_data: Dataset | None,
) -> tuple[float, float | None]:
    """One row of ``epochs.csv`` (rank 0 writes it): the epoch's mean training loss over all
    ranks and, with ``val_data``, the accuracy on it (every rank scores its share). The curves
    that show whether a run has converged; nothing is chosen by them."""
    rank, world = rank_world()
    total = loss_sum.clone()
    if world > 1:
        dist.all_reduce(total)
    mean_loss = float(total) / (max(1, steps) * world)
    accuracy = None
    if val_data is not None:
        accuracy = float(evaluate(model, val_data)["accuracy"])
        model.train()
    if rank == 0:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["step", "epoch", "train_loss", "val_accuracy", "time"])
            shown = "" if accuracy is None else f"{accuracy:.5f}"
            writer.writerow([step, epoch, f"{mean_loss:.5f}", shown, f"{time.time():.1f}"])
    return mean_loss, accuracy


def train(
    cfg: TrainConfig,
    train_data: Dataset,
    resume: bool = False,
    progress: bool = True,
    *,
    overwrite: bool = False,
    val_data: Dataset | None = None,
) -> Path:
    """Train (or, with ``cfg.init_from``, fine-tune) a ViT with ``cfg.model.budget`` active;
    return the final checkpoint's path (``out_dir/final.safetensors``).

    Every epoch ends with a row of ``epochs.csv``: its mean training loss and, with
    ``val_data``, the accuracy on those images, so a run's convergence can be read from its
    curves (nothing uses the scores).

    An ``out_dir`` that holds a run is refused unless ``resume`` (continue from its
    ``last.safetensors``) or ``overwrite`` (remove its files and start afresh). Ctrl-C raises
    :class:`TrainingInterrupted` naming the last checkpoint."""
    device = init_distributed()
    rank, world = rank_world()
    out = Path(cfg.out_dir)
    last = out / "last.safetensors"
    # every refusal before anything is written or removed
    prepare_run_dir(out, resume=resume, overwrite=overwrite, init_from=cfg.init_from, remove=False)
    if resume:
        check_resumable(cfg)
    _check_labels(train_data, cfg.model.num_classes)
    prepare_run_dir(out, resume=resume, overwrite=overwrite, init_from=cfg.init_from, remove=rank == 0)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    if cfg.init_from is not None:
        model.load_state_dict(_initial_weights(cfg))
    family_of(model).set_options(jitter=cfg.jitter)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    # the summed loss of the current epoch's steps, on the device: read once an epoch
    epoch_loss = torch.zeros((), dtype=torch.float64, device=device)
    per_epoch = steps_per_epoch(train_data, cfg)
    if per_epoch == 0:
        raise ValueError(f"batch_size={cfg.batch_size} is larger than the training set ({_size(train_data)})")
    total = per_epoch * cfg.epochs
    log_path = out / "metrics.csv"
    if resume:
        saved_cfg, state, other, _ = load_checkpoint(last)
        if saved_cfg != cfg.model:
            raise CheckpointError(f"{last} was trained with {saved_cfg}, not {cfg.model}")
        model.load_state_dict(state)
        load_optimizer_tensors(opt, other)
        step = int(other["train.step"])
        torch.set_rng_state(other["train.rng"])
        if "train.epoch_loss" in other:  # the losses of the epoch's steps before the checkpoint
            epoch_loss = other["train.epoch_loss"].to(device)
        if rank == 0:
            print(f"resume: {last} at step {step} of {total}", file=sys.stderr)
            _drop_metrics_after(log_path, step)
            _drop_metrics_after(out / "epochs.csv", step)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    # bf16 autocast pays off on GPUs; CPUs without native bf16 (like AVX2 ones) only slow down
    use_amp = cfg.amp and device.type == "cuda"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    bar = progress_bar(
        total=total, initial=step, disable=not progress or rank != 0, desc="train", unit="step"
    )
    board = _tensorboard(out) if rank == 0 else None
    saved_at = step if resume else None

    def checkpoint(path: Path) -> None:
        extra = {
            **optimizer_tensors(opt),
            "train.step": torch.tensor(step),
            "train.rng": torch.get_rng_state(),
            "train.epoch_loss": epoch_loss.cpu(),
        }
        if rank == 0:
            save_checkpoint(path, model, cfg.model, extra)
        if world > 1:
            dist.barrier()

    model.train()
    try:
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
                epoch_loss += loss.detach().double()
                step += 1
                bar.update(1)
                if rank == 0 and (step % 20 == 0 or step == total):
                    lr, value = _lr_at(step - 1, total, cfg), loss.item()
                    bar.set_postfix(loss=f"{value:.3f}", epoch=epoch, refresh=False)
                    new = not log_path.exists()
                    with open(log_path, "a", newline="") as f:
                        writer = csv.writer(f)
                        if new:
                            writer.writerow(["step", "epoch", "lr", "loss", "time"])
                        writer.writerow([step, epoch, f"{lr:.6g}", f"{value:.5f}", f"{time.time():.1f}"])
                    if board is not None:
                        board.add_scalar("train/loss", value, step)
                        board.add_scalar("train/lr", lr, step)
                if step % per_epoch == 0:
                    mean, accuracy = _log_epoch(
                        out / "epochs.csv", step, epoch, epoch_loss, per_epoch, model, val_data
                    )
                    epoch_loss.zero_()
                    shown = {} if accuracy is None else {"val": f"{accuracy:.4f}"}
                    bar.set_postfix(loss=f"{mean:.3f}", **shown, epoch=epoch, refresh=False)
                if step % cfg.ckpt_every == 0 or step == total:
                    checkpoint(last)
                    saved_at = step
                if step == total:
                    break
    except KeyboardInterrupt:
        bar.close()
        where = (
            "no checkpoint was written yet"
            if saved_at is None
            else f"the last checkpoint is {last} (step {saved_at})"
        )
        raise TrainingInterrupted(f"stopped at step {step} of {total}; {where}") from None
    bar.close()
    if board is not None:
        board.close()
    final = out / "final.safetensors"
    if rank == 0:
        save_checkpoint(final, model, cfg.model)
    if world > 1:
        dist.barrier()
    return final
