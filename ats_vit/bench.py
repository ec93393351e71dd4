"""Benchmarks behind ``ats-vit bench`` and ``benchmarks/``: speed against the FLOP ideal, and
accuracy against GFLOPs for ATS and simple peers.

Every speed number is a ratio measured in one run: all models run interleaved round-robin
after warm-up, and each cell is the median of the repeats, so machine noise hits all of them
alike. Nothing here is asserted as a timing in tests.
"""

from __future__ import annotations

import json
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

from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.sampling import SAMPLERS

__all__ = [
    "PeersConfig",
    "SpeedConfig",
    "machine",
    "peak_memory",
    "peers",
    "print_table",
    "speed",
    "time_round_robin",
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
    families: tuple[str, ...] = FAMILIES
    batch_sizes: tuple[int, ...] = (1, 16, 64)
    warmup: int = 1
    repeats: int = 5
    min_seconds: float = 3.0  # per variant and batch: short calls are repeated more
    seed: int = 0
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)

    def __post_init__(self) -> None:
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
        counter = ats_timm.apply(copy.deepcopy(dense_timm), layers=[], max_tokens=1)
        variants.append(_Variant("timm", "dense", dense_timm, True, timm_cost(counter)))
        for sampler in cfg.samplers:
            patched = ats_timm.apply(
                copy.deepcopy(dense_timm), layers=layers, max_tokens=cfg.max_tokens, sampler=sampler
            )
            variants.append(_Variant("timm", f"ATS {sampler}", patched, False, timm_cost(patched)))

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

        def ours(sched: tuple[int, ...], sampler: str = "inverse_transform") -> ViT:
            model = ViT(max_tokens_per_depth=sched, sampler=sampler, **sizes)
            return model if weights is None else load_vit_pytorch_state_dict(model, weights)

        def ours_cost(model: ViT) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
            return lambda x: _trace_cost(model.cost, model.forward_features(x)[3])

        dense_ours = ours(dense_schedule)
        variants.append(_Variant("ours", "dense", dense_ours, True, ours_cost(dense_ours)))
        for sampler in cfg.samplers:
            model = ours(schedule, sampler)
            variants.append(_Variant("ours", f"ATS {sampler}", model, False, ours_cost(model)))

    for v in variants:
        v.model.to(device).eval()
    return variants, image_hw


SPEED_COLUMNS = (
    ("batch", "batch", "d"),
    ("family", "family", "<6"),
    ("variant", "variant", "<26"),
    ("gflops", "GFLOPs", ".3f"),
    ("kept", "kept", ".1f"),
    ("img_per_s", "img/s", ".2f"),
    ("peak_mib", "peak MiB", ".1f"),
    ("speedup", "speed-up", ".2f"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
    ("vs_seed_ats", "vs seed ATS", ".2f"),
)


def speed(cfg: SpeedConfig) -> list[dict]:
    """Throughput, peak activation memory, GFLOPs and efficiency of every variant and batch.

    speed-up: throughput over the same family's dense model; ideal: the family's dense GFLOPs
    over the variant's (from the tokens actually kept); efficiency = speed-up / ideal;
    vs seed ATS: throughput over the seed's ATS model. NaN where a column does not apply.
    """
    from tqdm.auto import tqdm

    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    variants, image_hw = _variants(cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)
    rows = []
    # per variant and batch: a counting pass, the timed calls, a memory pass
    calls = len(cfg.batch_sizes) * len(variants) * (cfg.warmup + cfg.repeats + 2)
    bar = tqdm(total=calls, desc="speed", unit="forward")
    with torch.inference_mode():
        for b in cfg.batch_sizes:
            bar.set_postfix(batch=b)
            x = torch.randn(b, 3, *image_hw, generator=gen).to(device)
            costs = {}
            for v in variants:
                torch.manual_seed(cfg.seed)
                flops, kept = v.cost(x)
                costs[v.family, v.name] = (flops.double().mean().item(), kept.double().mean().item())
                bar.update()
            times = time_round_robin(
                {f"{v.family}/{v.name}": (lambda m=v.model, x=x: m(x)) for v in variants},
                cfg.warmup,
                cfg.repeats,
                device,
                progress=bar,
                min_seconds=cfg.min_seconds,
            )
            dense = {v.family: v for v in variants if v.dense}
            seed_ats = next((v for v in variants if v.family == "seed" and not v.dense), None)
            for v in variants:
                t = times[f"{v.family}/{v.name}"]
                base = dense[v.family]
                speedup = times[f"{base.family}/{base.name}"] / t
                ideal = costs[base.family, base.name][0] / costs[v.family, v.name][0]
                vs_seed = float("nan") if seed_ats is None else times[f"seed/{seed_ats.name}"] / t
                peak = peak_memory(lambda m=v.model, x=x: m(x), device)
                bar.update()
                rows.append(
                    dict(
                        batch=b,
                        family=v.family,
                        variant=v.name,
                        gflops=costs[v.family, v.name][0],
                        kept=costs[v.family, v.name][1],
                        img_per_s=b / t,
                        ms_per_batch=1e3 * t,
                        peak_mib=peak / 2**20,
                        speedup=speedup,
                        ideal=ideal,
                        efficiency=speedup / ideal,
                        vs_seed_ats=vs_seed,
                    )
                )
    bar.close()
    return rows


# ---------------------------------------------------------------- accuracy vs GFLOPs against peers


@dataclass
class PeersConfig:
    """ATS (both samplers) at caps ``keeps`` from ``start_layer`` on, against top-k and random
    selection keeping, layer by layer, the mean number of tokens ATS kept (matched GFLOPs).
    Random samplers (gumbel, random) are averaged over ``seeds`` runs."""

    checkpoint: str
    data: str = "demo"
    keeps: tuple[float, ...] = (0.75, 0.5, 0.35, 0.25)
    start_layer: int = 3
    samplers: tuple[str, ...] = ("inverse_transform", "gumbel")
    peers: tuple[str, ...] = ("topk", "random")
    seeds: int = 3
    batch_size: int = 256

    def __post_init__(self) -> None:
        if self.seeds < 1 or self.batch_size < 1:
            raise ValueError(f"seeds and batch_size must be >= 1, got {self.seeds}, {self.batch_size}")
        if not self.keeps or not all(0.0 < k < 1.0 for k in self.keeps):
            raise ValueError(f"keeps must be ratios in (0, 1) (dense is always included), got {self.keeps}")
        for name, values, accepted in (
            ("samplers", self.samplers, ("inverse_transform", "gumbel")),
            ("peers", self.peers, ("topk", "random")),
        ):
            if not values or any(v not in accepted for v in values):
                raise ValueError(f"{name} must be a non-empty subset of {accepted}, got {values}")


PEERS_COLUMNS = (
    ("matched_to", "matched to", "<22"),
    ("method", "method", "<20"),
    ("gflops", "GFLOPs", ".4f"),
    ("gflops_vs_dense", "vs dense", ".0%"),
    ("kept", "kept (last)", ".1f"),
    ("accuracy_pct", "accuracy %", ".2f"),
    ("accuracy_std_pct", "± std", ".2f"),
)


def peers(cfg: PeersConfig, data) -> list[dict]:
    """Accuracy, GFLOPs and kept tokens of ATS and its peers on ``data``, no fine-tuning."""
    from tqdm.auto import tqdm

    from ats_vit.train import budget_schedule, evaluate, load_checkpoint, model_with_budget

    base, state, _, _ = load_checkpoint(cfg.checkpoint)
    if not 0 <= cfg.start_layer < base.depth:
        raise ValueError(f"start_layer must be in [0, {base.depth}), got {cfg.start_layer}")
    random_samplers = ("gumbel", "random")
    plan = 1 + len(cfg.samplers) * len(cfg.keeps) * (1 + len(cfg.peers))
    bar = tqdm(total=plan, desc="peers", unit="eval")

    def run(schedule: tuple[int, ...] | None, sampler: str) -> dict:
        model = model_with_budget(base, state, cfg.checkpoint, schedule, sampler)
        seeds = range(cfg.seeds if sampler in random_samplers and schedule is not None else 1)
        results = []
        for seed in seeds:
            torch.manual_seed(seed)
            results.append(evaluate(model, data, cfg.batch_size))
        bar.update(1)
        acc = [r["accuracy"] for r in results]
        kept = torch.tensor([r["kept_per_layer"] for r in results]).mean(0)
        return dict(
            schedule=None if schedule is None else list(schedule),
            accuracy=statistics.fmean(acc),
            accuracy_std=statistics.pstdev(acc),
            runs=len(acc),
            kept_per_layer=kept.tolist(),
            kept=kept[-1].item(),
            gflops=statistics.fmean(r["gflops"] for r in results),
        )

    dense = run(None, "inverse_transform")
    rows = [dict(matched_to="-", method="dense", **dense)]
    for sampler in cfg.samplers:
        for keep in cfg.keeps:
            ats = run(budget_schedule(base, keep, cfg.start_layer), sampler)
            label = f"ATS {sampler} {keep:g}"
            rows.append(dict(matched_to=label, method=f"ATS {sampler}", keep=keep, **ats))
            # the peers keep, at every layer, the tokens ATS kept on average there
            matched = tuple(max(1, round(k)) for k in ats["kept_per_layer"])
            for peer in cfg.peers:
                rows.append(dict(matched_to=label, method=peer, keep=keep, **run(matched, peer)))
    bar.close()
    for r in rows:
        r["gflops_vs_dense"] = r["gflops"] / dense["gflops"]
        r["accuracy_pct"] = 100 * r["accuracy"]
        r["accuracy_std_pct"] = 100 * r["accuracy_std"]
    return rows
