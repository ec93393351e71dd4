"""Benchmarks behind ``ats-vit bench`` and ``benchmarks/``: speed against the FLOP ideal, and
accuracy against GFLOPs for ATS and simple peers.

Every speed number is a ratio measured in one run: all models run interleaved round-robin
after warm-up, and each cell is the median of the repeats, so machine noise hits all of them
alike. Nothing here is asserted as a timing in tests.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ats_vit._progress import bar as progress_bar
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import DROPPED, SAMPLERS

__all__ = [
    "FrontierConfig",
    "SpeedConfig",
    "TrainSpeedConfig",
    "binomial_ci95",
    "frontier",
    "machine",
    "peak_memory",
    "print_table",
    "speed",
    "time_round_robin",
    "train_speed",
    "write_json",
]

FAMILIES = ("timm", "ours", "seed")


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device | None = None,
    progress=None,
    min_seconds: float = 0.0,
) -> dict[str, float]:
    """Median seconds per call of each function; calls are interleaved across functions so
    that machine noise hits all of them alike. Rounds go on past ``repeats`` until every
    function has run for ``min_seconds`` in all, so that short calls get enough samples.
    ``device`` is synchronised around each call; ``progress`` (a tqdm bar counting calls,
    ``warmup + repeats`` per function) is advanced, and grown by the extra rounds."""
    device = device or torch.device("cpu")

    def tick() -> None:
        if progress is not None:
            progress.update()

    for fn in fns.values():
        for _ in range(warmup):
            fn()
            tick()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or min(map(sum, samples.values())) < min_seconds:
        rounds += 1
        if rounds > repeats and progress is not None:
            progress.total += len(fns)
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            samples[name].append(time.perf_counter() - start)
            tick()
    return {name: statistics.median(s) for name, s in samples.items()}


class _LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of tensor storages that ops create while active, and their peak.

    CPU PyTorch has no allocator statistics, so storages are followed from creation to
    garbage collection. An output that shares a storage with an input (a view, an in-place
    result) is no new memory; scratch memory that a kernel allocates internally (e.g. inside
    fused attention) is not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._storages: set[int] = set()

    def _freed(self, ptr: int, nbytes: int) -> None:
        self._storages.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in self._storages or ptr in inputs:
                continue
            self._storages.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, ptr, nbytes)
        return out


def peak_memory(fn: Callable[[], object], device: torch.device | None = None) -> int:
    """Peak bytes of the tensors ``fn`` allocates on ``device`` (activations: weights and
    inputs that exist before the call are not counted)."""
    device = device or torch.device("cpu")
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveTensorBytes()
    with tracker:
        fn()
    return tracker.peak


def machine(device: torch.device | str = "cpu") -> dict[str, object]:
    device = torch.device(device)
    info = dict(
        torch=torch.__version__,
        python=platform.python_version(),
        cpu=platform.processor() or platform.machine(),
        threads=torch.get_num_threads(),
        device=str(device),
    )
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec) per column; a spec starting with '<' aligns left."""
    cells = [[format(r[key], spec) for key, _, spec in columns] for r in rows]
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, (_, header, _) in enumerate(columns)]
    left = [spec.startswith("<") for _, _, spec in columns]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            s.ljust(w) if is_left else s.rjust(w) for s, w, is_left in zip(items, widths, left, strict=True)
        )

    print(line([header for _, header, _ in columns]))
    print(line(["-" * w for w in widths]))
    for row in cells:
        print(line(row))


def write_json(
    path: str | Path | None, config: object, rows: Sequence[dict], device: torch.device | str = "cpu"
) -> None:
    """Config, machine and rows, so every number can be reproduced."""
    if path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(dict(config=asdict(config), machine=machine(device), rows=list(rows)), indent=2)
        )
        print(f"wrote {path}")


# ---------------------------------------------------------------- speed


@dataclass
class SpeedConfig:
    """A timm ViT dense and ATS-patched, ``ats_vit.ViT`` and vit-pytorch's (the seed) at the
    same sizes; ours and the seed share weights. Layers ``start_layer..depth-1`` keep at most
    ``max_tokens`` patch tokens."""

    model: str = "deit_small_patch16_224"
    img_size: int | None = None  # None: the model's default
    pretrained: bool = False
    start_layer: int = 3
    max_tokens: int = 108
    samplers: tuple[str, ...] = ("inverse_transform", "gumbel")
    dropped: tuple[str, ...] = ("discard",)  # each sampler with each (ToMe always merges)
    families: tuple[str, ...] = FAMILIES
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    warmup: int = 1
    repeats: int = 5
    min_seconds: float = 3.0  # per variant and batch: short calls are repeated more
    seed: int = 0
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)
    static: bool = False  # also time ATS with static_shape=True (no host sync, padded to the cap)
    compile: bool = False  # also time torch.compile'd dense and ATS models (timm and ours)
    dtype: str = "float32"  # or "bfloat16": autocast, as GPU inference runs

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        for name in ("max_tokens", "repeats", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.start_layer < 0 or self.min_seconds < 0:
            raise ValueError(
                "warmup, start_layer and min_seconds must be >= 0, got "
                f"{self.warmup}, {self.start_layer}, {self.min_seconds}"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes must be positive ints, got {self.batch_sizes}")
        try:
            device = torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from exc
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r} but no CUDA device is available; use 'cpu'")
        for name, values, accepted in (
            ("samplers", self.samplers, SAMPLERS),
            ("dropped", self.dropped, DROPPED),
            ("families", self.families, FAMILIES),
        ):
            bad = [v for v in values if v not in accepted]
            if bad or not values:
                raise ValueError(f"{name} must be a non-empty subset of {accepted}, got {values}")


@dataclass
class _Variant:
    family: str
    name: str
    model: nn.Module
    dense: bool
    cost: Callable[[Tensor], tuple[Tensor, Tensor]]  # images -> ((b,) GFLOPs, (b,) kept after the last layer)
    compiled: bool = False
    eager: str | None = None  # for a compiled variant, the name of its eager twin

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"


def _rules(cfg: SpeedConfig) -> list[tuple[str, dict]]:
    """(name, AdaptiveTokenSampling options) of every ATS variant to time."""
    rules = []
    for sampler in cfg.samplers:
        for dropped in ("merge",) if sampler == "tome" else cfg.dropped:
            for static in (False, True) if cfg.static else (False,):
                suffix = "" if dropped == "discard" or sampler == "tome" else f" {dropped}"
                name = f"ATS {sampler}{suffix}" + (" static" if static else "")
                rules.append((name, dict(sampler=sampler, dropped=dropped, static_shape=static)))
    return rules


def _trace_cost(cost: ViTCost, trace: TokenTrace) -> tuple[Tensor, Tensor]:
    return gflops(cost, trace), trace.counts[-1]


def _seed_trace(model: nn.Module, x: Tensor, num_patches: int) -> TokenTrace:
    """Tokens each layer of a vit-pytorch ATS ViT kept, read off its attention outputs
    (out, mask, sampled ids) with forward hooks."""
    trace = TokenTrace(num_patches, num_prefix_tokens=1)

    def hook(_module, _inputs, output) -> None:
        _, mask, sampled_ids = output
        trace.counts.append(mask.sum(dim=1) - 1)
        trace.rules.append(None if sampled_ids is None else "score")

    handles = [layer[0].register_forward_hook(hook) for layer in model.transformer.layers]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return trace


def _variants(cfg: SpeedConfig, device: torch.device) -> tuple[list[_Variant], tuple[int, int]]:
    """The models to time, and their image size."""
    import copy

    import timm

    import ats_vit.timm as ats_timm
    from ats_vit.vit import ViT, load_vit_pytorch_state_dict

    torch.manual_seed(cfg.seed)
    kwargs = {} if cfg.img_size is None else dict(img_size=cfg.img_size)
    dense_timm = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    cost = ats_timm.cost(dense_timm)
    if not 0 <= cfg.start_layer < cost.depth:
        raise ValueError(f"start_layer must be in [0, {cost.depth}) for {cfg.model}, got {cfg.start_layer}")
    layers = range(cfg.start_layer, cost.depth)
    variants: list[_Variant] = []

    def timm_cost(patched: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def measure(x: Tensor) -> tuple[Tensor, Tensor]:
            patched(x)
            info = ats_timm.last_info(patched)
            return info.gflops, info.kept_per_layer[:, -1]

        return measure

    if "timm" in cfg.families:
        # the baseline is timm's own model; a copy patched to sample nowhere counts its FLOPs
        counter = ats_timm.apply(copy.deepcopy(dense_timm), layers=[], max_tokens=1).to(device).eval()
        variants.append(_Variant("timm", "dense", dense_timm, True, timm_cost(counter)))
        for name, rule in _rules(cfg):
            patched = ats_timm.apply(
                copy.deepcopy(dense_timm), layers=layers, max_tokens=cfg.max_tokens, **rule
            )
            variants.append(_Variant("timm", name, patched, False, timm_cost(patched)))

    n = cost.num_patches
    image_hw = tuple(dense_timm.patch_embed.img_size)
    sizes = dict(
        image_size=image_hw,
        patch_size=tuple(dense_timm.patch_embed.patch_size),
        num_classes=dense_timm.num_classes,
        dim=cost.dim,
        depth=cost.depth,
        heads=cost.heads,
        dim_head=cost.attn_dim // cost.heads,
        mlp_dim=cost.mlp_hidden,
    )
    dense_schedule = (n,) * cost.depth
    schedule = (n,) * cfg.start_layer + (min(n, cfg.max_tokens),) * (cost.depth - cfg.start_layer)
    weights = None
    if "seed" in cfg.families:
        try:
            from vit_pytorch.ats_vit import ViT as SeedViT
        except ImportError as exc:
            raise ImportError(
                "the seed rows need vit-pytorch: pip install 'ats-vit[bench]', or drop 'seed' from families"
            ) from exc
        seed_dense = SeedViT(max_tokens_per_depth=dense_schedule, **sizes)
        weights = seed_dense.state_dict()
        seed_ats = SeedViT(max_tokens_per_depth=schedule, **sizes)
        seed_ats.load_state_dict(weights)
        # the seed's sizes are ours: one class token, one head
        seed_cost = replace(cost, num_prefix_tokens=1, num_classes=dense_timm.num_classes)
        for name, model, dense in (("dense", seed_dense, True), ("ATS gumbel (seed)", seed_ats, False)):

            def measure(x: Tensor, model=model) -> tuple[Tensor, Tensor]:
                return _trace_cost(seed_cost, _seed_trace(model, x, n))

            variants.append(_Variant("seed", name, model, dense, measure))

    if "ours" in cfg.families:

        def ours(sched: tuple[int, ...]) -> ViT:
            model = ViT(max_tokens_per_depth=sched, **sizes)
            return model if weights is None else load_vit_pytorch_state_dict(model, weights)

        def ours_cost(model: ViT) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
            return lambda x: _trace_cost(model.cost, model.forward_features(x)[3])

        dense_ours = ours(dense_schedule)
        variants.append(_Variant("ours", "dense", dense_ours, True, ours_cost(dense_ours)))
        for name, rule in _rules(cfg):
            model = ours(schedule).set_sampling(schedule, **rule)
            variants.append(_Variant("ours", name, model, False, ours_cost(model)))

    for v in variants:
        v.model.to(device).eval()
    if cfg.compile:
        # compiled twins of timm's and our models; the seed is left eager. One static graph per
        # batch size, as a server with a fixed batch compiles (dynamic batch shapes hit an
        # inductor assertion on CUDA with torch 2.11)
        # The adaptive path breaks the graph at each sampling layer's sync, and the code after
        # a break is compiled once per block (its guards see the block): allow that, or the
        # blocks past the limit (8) run eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        for v in [v for v in variants if v.family != "seed"]:
            twin = torch.compile(v.model, dynamic=False)
            variants.append(replace(v, name=f"{v.name} compiled", model=twin, compiled=True, eager=v.name))
    return variants, image_hw


# torch._dynamo's recompile limit for compiled adaptive models: several frames per block
RECOMPILE_LIMIT = 64

SPEED_COLUMNS = (
    ("batch", "batch", "d"),
    ("family", "family", "<6"),
    ("variant", "variant", "<34"),
    ("gflops", "GFLOPs", ".3f"),
    ("kept", "kept", ".1f"),
    ("img_per_s", "img/s", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
    ("vs_eager", "vs eager", ".2f"),
    ("vs_seed_ats", "vs seed ATS", ".2f"),
)


def speed(cfg: SpeedConfig) -> list[dict]:
    """Throughput, peak activation memory, GFLOPs and efficiency of every variant and batch.

    speed-up: throughput over the same family's dense model, compiled over compiled; ideal:
    that dense model's GFLOPs over the variant's (from the tokens actually kept); efficiency
    = speed-up / ideal; vs eager: a compiled variant's throughput over its eager twin's; vs
    seed ATS: throughput over the seed's ATS model. NaN where a column does not apply.
    """
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    variants, image_hw = _variants(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    rows = []
    # per variant and batch: a counting pass, the timed calls, a memory pass
    calls = len(cfg.batch_sizes) * len(variants) * (cfg.warmup + cfg.repeats + 2)
    bar = progress_bar(total=calls, desc="speed", unit="forward")
    with torch.inference_mode(), autocast:
        for b in cfg.batch_sizes:
            bar.set_postfix(batch=b, refresh=False)
            x = torch.randn(b, 3, *image_hw, generator=gen).to(device)
            costs = {}
            for v in variants:
                torch.manual_seed(cfg.seed)
                flops, kept = v.cost(x)
                costs[v.key] = (flops.double().mean().item(), kept.double().mean().item())
                bar.update()
            times = time_round_robin(
                {v.key: (lambda m=v.model, x=x: m(x)) for v in variants},
                cfg.warmup,
                cfg.repeats,
                device,
                progress=bar,
                min_seconds=cfg.min_seconds,
            )
            dense = {(v.family, v.compiled): v for v in variants if v.dense}
            seed_ats = next((v for v in variants if v.family == "seed" and not v.dense), None)
            for v in variants:
                t = times[v.key]
                base = dense[v.family, v.compiled]
                speedup = times[base.key] / t
                ideal = costs[base.key][0] / costs[v.key][0]
                vs_seed = float("nan") if seed_ats is None else times[seed_ats.key] / t
                vs_eager = times[f"{v.family}/{v.eager}"] / t if v.compiled else float("nan")
                # the dispatch mode that follows CPU tensors does not see inside compiled code
                peak = float("nan") if v.compiled else peak_memory(lambda m=v.model, x=x: m(x), device)
                bar.update()
                rows.append(
                    dict(
                        batch=b,
                        family=v.family,
                        variant=v.name,
                        gflops=costs[v.key][0],
                        kept=costs[v.key][1],
                        img_per_s=b / t,
                        ms_per_batch=1e3 * t,
                        peak_mib=peak / 2**20,
                        speedup=speedup,
                        ideal=ideal,
                        efficiency=speedup / ideal,
                        vs_eager=vs_eager,
                        vs_seed_ats=vs_seed,
                    )
                )
    bar.close()
    return rows


# ---------------------------------------------------------------- accuracy vs GFLOPs: the frontier

# the simple peers the recommended method must match or beat at every cost
PEERS = ("topk", "random", "tome")


@dataclass
class FrontierConfig:
    """Every method calibrated to each GFLOP target on the calibration split (labels: their
    accuracy is maximised), then measured on the test split, for each checkpoint."""

    checkpoints: tuple[str, ...]
    data: str = "demo"
    methods: tuple[str, ...] = (
        "auto",
        "paper",
        "ats",
        "ats-fuse",
        "ats-merge",
        "topk",
        "evit",
        "random",
        "tome",
    )
    targets: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    calib_images: int | None = None  # None: the whole calibration split
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        from ats_vit.budget import METHODS

        if not self.checkpoints:
            raise ValueError("checkpoints must name at least one checkpoint")
        known = ("auto", *METHODS)
        bad = [m for m in self.methods if m not in known]
        if bad or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {known}, got {self.methods}")
        if not self.targets or not all(0.0 < t <= 1.0 for t in self.targets):
            raise ValueError(f"targets must be GFLOP fractions in (0, 1], got {self.targets}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


FRONTIER_COLUMNS = (
    ("checkpoint", "checkpoint", "<12"),
    ("method", "method", "<10"),
    ("chosen", "chosen", "<10"),
    ("target", "target", ".2f"),
    ("gflops_ratio", "GFLOPs", ".3f"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("ci95_pct", "±", ".2f"),
    ("calib_score_pct", "calib %", ".2f"),
    ("start_layer", "start", "d"),
    ("temperature", "temp", ".3g"),
    ("kept", "kept (last)", ".1f"),
)


def binomial_ci95(accuracy: float, n: int) -> float:
    """Half-width of the 95% normal interval of an accuracy measured on ``n`` images."""
    return 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 1e-12) / n)


def frontier(cfg: FrontierConfig) -> list[dict]:
    """Test accuracy and GFLOPs of every method at every target on every checkpoint.

    Settings are chosen on the calibration split only (:class:`ats_vit.budget.Calibration`);
    the test split is measured once per chosen budget. A target a method cannot reach is
    skipped (no row). Dense rows have method ``"dense"``.
    """
    from ats_vit.budget import BudgetError, Calibration, measure
    from ats_vit.checkpoint import load_model
    from ats_vit.data import load_split, take

    rows = []
    bar = progress_bar(
        total=len(cfg.checkpoints) * len(cfg.methods) * len(cfg.targets), desc="frontier", unit="budget"
    )
    for checkpoint in cfg.checkpoints:
        name = Path(checkpoint).parent.name or str(checkpoint)
        model, model_cfg = load_model(checkpoint)
        model.eval()
        calib_x, calib_y = take(
            load_split(cfg.data, "calib", model_cfg.image_size), cfg.calib_images, cfg.seed
        )
        test_x, test_y = take(load_split(cfg.data, "test", model_cfg.image_size))
        dense_pred, dense_cost = measure(model, test_x, None, batch_size=cfg.batch_size)
        dense_gflops = dense_cost.double().mean().item()
        accuracy = (dense_pred == test_y).float().mean().item()
        rows.append(
            dict(
                checkpoint=name,
                method="dense",
                chosen="dense",
                target=1.0,
                gflops=dense_gflops,
                gflops_ratio=1.0,
                accuracy=accuracy,
                ci95=binomial_ci95(accuracy, len(test_y)),
                calib_score=float("nan"),
                start_layer=model_cfg.depth,
                temperature=1.0,
                kept=float(model_cfg.num_patches),
                budget=None,
                test_images=len(test_y),
            )
        )
        search = Calibration(model, calib_x, calib_y, batch_size=cfg.batch_size, progress=False)
        for method in cfg.methods:
            for target in cfg.targets:
                torch.manual_seed(cfg.seed)  # the random peers draw at eval too
                bar.set_postfix(checkpoint=name, method=method, target=target, refresh=False)
                bar.update()
                try:
                    budget = search(target, method)
                except BudgetError:
                    continue
                torch.manual_seed(cfg.seed)
                pred, cost = measure(model, test_x, budget, batch_size=cfg.batch_size)
                accuracy = (pred == test_y).float().mean().item()
                rows.append(
                    dict(
                        checkpoint=name,
                        method=method,
                        chosen=budget.method,
                        target=target,
                        gflops=cost.double().mean().item(),
                        gflops_ratio=cost.double().mean().item() / dense_gflops,
                        accuracy=accuracy,
                        ci95=binomial_ci95(accuracy, len(test_y)),
                        calib_score=budget.calibration["accuracy"],
                        start_layer=budget.start_layer,
                        temperature=budget.temperature,
                        kept=float(budget.max_tokens[-1]),
                        budget=budget.to_dict(),
                        test_images=len(test_y),
                    )
                )
    bar.close()
    for r in rows:
        r["accuracy_pct"], r["ci95_pct"] = 100 * r["accuracy"], 100 * r["ci95"]
        r["calib_score_pct"] = 100 * r["calib_score"]
    return rows


# ---------------------------------------------------------------- training speed


@dataclass
class TrainSpeedConfig:
    """Training steps (forward, backward, AdamW) per second of a checkpoint's model, dense and
    with each budget active, timed interleaved on one batch of the demo data."""

    checkpoint: str
    budgets: tuple[str, ...]  # budget files
    batch_size: int = 64
    warmup: int = 2
    repeats: int = 10
    min_seconds: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.budgets:
            raise ValueError("budgets must name at least one budget file")
        if self.batch_size < 1 or self.repeats < 1 or self.warmup < 0:
            raise ValueError(
                f"batch_size and repeats must be >= 1 and warmup >= 0, got {self.batch_size}, "
                f"{self.repeats}, {self.warmup}"
            )


TRAIN_SPEED_COLUMNS = (
    ("variant", "variant", "<28"),
    ("gflops_ratio", "GFLOPs (fwd)", ".3f"),
    ("steps_per_s", "steps/s", ".2f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
)


def train_speed(cfg: TrainSpeedConfig) -> list[dict]:
    """steps/s of each variant; speed-up over dense measured in the same run, ideal = dense
    forward GFLOPs / the variant's (training costs about three forward passes in both)."""
    import copy

    import torch.nn.functional as F

    from ats_vit.budget import Budget, measure
    from ats_vit.checkpoint import load_model
    from ats_vit.data import load_split, take

    base, model_cfg = load_model(cfg.checkpoint)
    images, labels = take(load_split("demo", "train", model_cfg.image_size), cfg.batch_size, cfg.seed)
    variants = {"dense": None, **{Path(p).stem: Budget.load(p) for p in cfg.budgets}}
    models, steps, costs = {}, {}, {}
    for name, budget in variants.items():
        model = copy.deepcopy(base)
        _, cost = measure(model, images, budget)  # configures the model with the budget too
        costs[name] = cost.double().mean().item()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step(model=model, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(images), labels).backward()
            opt.step()

        models[name], steps[name] = model, step
    torch.manual_seed(cfg.seed)
    bar = progress_bar(total=len(steps) * (cfg.warmup + cfg.repeats), desc="train speed", unit="step")
    times = time_round_robin(steps, cfg.warmup, cfg.repeats, progress=bar, min_seconds=cfg.min_seconds)
    bar.close()
    rows = []
    for name in variants:
        speedup, ideal = times["dense"] / times[name], costs["dense"] / costs[name]
        rows.append(
            dict(
                variant=name,
                gflops_ratio=costs[name] / costs["dense"],
                steps_per_s=1 / times[name],
                speedup=speedup,
                ideal=ideal,
                efficiency=speedup / ideal,
            )
        )
    return rows
