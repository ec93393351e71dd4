"""Speed against the FLOP ideal: a timm ViT dense and ATS-patched, ``ats_vit.ViT`` and
vit-pytorch's ATS ViT (the seed) at the same sizes, timed interleaved in one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ats_vit._progress import bar as progress_bar
from ats_vit.bench.common import peak_memory, use_threads
from ats_vit.flops import TokenTrace, ViTCost, gflops
from ats_vit.options import DROPPED, MERGING_SAMPLERS, SAMPLERS, Rule, SamplingOptions
from ats_vit.timing import speedup, time_round_robin

__all__ = ["SpeedConfig", "speed"]

FAMILIES = ("timm", "ours", "seed")


@dataclass
class SpeedConfig:
    """A timm ViT dense and ATS-patched, ``ats_vit.ViT`` and vit-pytorch's (the seed) at the
    same sizes; ours and the seed share weights. Layers ``start_layer..depth-1`` keep at most
    ``cap`` patch tokens."""

    model: str = "deit_small_patch16_224"
    img_size: int | None = None  # None: the model's default
    pretrained: bool = False
    start_layer: int = 3
    cap: int = 108
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
        for name in ("cap", "repeats", "threads"):
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
    model: Any  # an nn.Module, or its compiled twin
    dense: bool
    cost: Callable[[Tensor], tuple[Tensor, Tensor]]  # images -> ((b,) GFLOPs, (b,) kept after the last layer)
    compiled: bool = False
    eager: str | None = None  # for a compiled variant, the name of its eager twin

    @property
    def key(self) -> str:
        return f"{self.family}/{self.name}"


def _rules(cfg: SpeedConfig) -> list[tuple[str, SamplingOptions]]:
    """(name, sampling options) of every ATS variant to time."""
    rules = []
    for sampler in cfg.samplers:
        merging = sampler in MERGING_SAMPLERS
        for dropped in ("merge",) if merging else cfg.dropped:
            for static in (False, True) if cfg.static else (False,):
                suffix = "" if dropped == "discard" or merging else f" {dropped}"
                name = f"ATS {sampler}{suffix}" + (" static" if static else "")
                rules.append((name, SamplingOptions(sampler, dropped=dropped, static_shape=static)))  # type: ignore[arg-type]
    return rules


def _trace_cost(cost: ViTCost, trace: TokenTrace) -> tuple[Tensor, Tensor]:
    return gflops(cost, trace), trace.counts[-1]


def _seed_trace(model: Any, x: Tensor, num_patches: int) -> TokenTrace:
    """Tokens each layer of a vit-pytorch ATS ViT kept, read off its attention outputs
    (out, mask, sampled ids) with forward hooks."""
    trace = TokenTrace(num_patches, num_prefix_tokens=1)

    def hook(_module: Any, _inputs: Any, output: Any) -> None:
        _, mask, sampled_ids = output
        trace.counts.append(mask.sum(dim=1) - 1)
        trace.rules.append(None if sampled_ids is None else Rule.SCORE)
        trace.received.append(False)

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
    from ats_vit.families import family_of
    from ats_vit.vit import ViT, load_vit_pytorch_state_dict

    torch.manual_seed(cfg.seed)
    kwargs: dict[str, Any] = {} if cfg.img_size is None else dict(img_size=cfg.img_size)
    if not timm.is_model(cfg.model):
        raise ValueError(f"timm has no model named {cfg.model!r}")
    dense_timm: Any = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    cost = family_of(copy.deepcopy(dense_timm)).cost  # refuses (one line) what ats-vit cannot serve
    if not 0 <= cfg.start_layer < cost.depth:
        raise ValueError(f"start_layer must be in [0, {cost.depth}) for {cfg.model}, got {cfg.start_layer}")
    variants: list[_Variant] = []

    def timm_cost(patched: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def measure(x: Tensor) -> tuple[Tensor, Tensor]:
            patched(x)
            info = ats_timm.last_info(patched)
            return info.gflops, info.kept_per_layer[:, -1]

        return measure

    if "timm" in cfg.families:
        # the baseline is timm's own model; a copy patched to sample nowhere counts its FLOPs
        counter = ats_timm.apply(copy.deepcopy(dense_timm), caps=None).to(device).eval()
        variants.append(_Variant("timm", "dense", dense_timm, True, timm_cost(counter)))
        for name, rule in _rules(cfg):
            patched = ats_timm.apply(
                copy.deepcopy(dense_timm), caps=cfg.cap, start_layer=cfg.start_layer, options=rule
            )
            variants.append(_Variant("timm", name, patched, False, timm_cost(patched)))

    n = cost.num_patches
    image_hw = tuple(dense_timm.patch_embed.img_size)
    sizes: dict[str, Any] = dict(
        image_size=image_hw,
        patch_size=tuple(dense_timm.patch_embed.patch_size),
        num_classes=dense_timm.num_classes,
        dim=cost.dim,
        depth=cost.depth,
        heads=cost.heads,
        dim_head=cost.attn_dim // cost.heads,
        mlp_dim=int(cost.mlp_hidden),
    )
    dense_schedule = (n,) * cost.depth
    schedule = (n,) * cfg.start_layer + (min(n, cfg.cap),) * (cost.depth - cfg.start_layer)
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

            def measure(x: Tensor, model: Any = model) -> tuple[Tensor, Tensor]:
                return _trace_cost(seed_cost, _seed_trace(model, x, n))

            variants.append(_Variant("seed", name, model, dense, measure))

    if "ours" in cfg.families:

        def ours(sched: tuple[int, ...]) -> ViT:
            model = ViT(max_tokens_per_depth=sched, **sizes)
            return model if weights is None else load_vit_pytorch_state_dict(model, weights)

        def ours_cost(model: ViT) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
            return lambda x: _trace_cost(model.cost, model.forward_tokens(x)[1].trace)

        dense_ours = ours(dense_schedule)
        variants.append(_Variant("ours", "dense", dense_ours, True, ours_cost(dense_ours)))
        for name, rule in _rules(cfg):
            model = ours(schedule).set_sampling(schedule, rule)
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
    ("speedup_iqr", "(IQR)", "<11"),
    ("ideal", "ideal", ".2f"),
    ("efficiency", "efficiency", ".2f"),
    ("vs_eager", "vs eager", ".2f"),
    ("vs_seed_ats", "vs seed ATS", ".2f"),
)


def _channels(model: nn.Module) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj.in_channels if isinstance(proj, nn.Conv2d) else 3


def speed(cfg: SpeedConfig) -> list[dict[str, Any]]:
    """Throughput, peak activation memory, GFLOPs and efficiency of every variant and batch.

    speed-up: throughput over the same family's dense model, compiled over compiled; ideal:
    that dense model's GFLOPs over the variant's (from the tokens actually kept); efficiency
    = speed-up / ideal; vs eager: a compiled variant's throughput over its eager twin's; vs
    seed ATS: throughput over the seed's ATS model. NaN where a column does not apply.
    """
    device = torch.device(cfg.device)
    use_threads(cfg.threads)
    variants, image_hw = _variants(cfg, device)
    channels = _channels(variants[0].model)
    gen = torch.Generator().manual_seed(cfg.seed)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    rows = []
    # per variant and batch: a counting pass, the timed calls, a memory pass
    calls = len(cfg.batch_sizes) * len(variants) * (cfg.warmup + cfg.repeats + 2)
    bar = progress_bar(total=calls, desc="speed", unit="forward")
    with torch.inference_mode(), autocast:
        for b in cfg.batch_sizes:
            bar.set_postfix(batch=b, refresh=False)
            x = torch.randn(b, channels, *image_hw, generator=gen).to(device)
            costs = {}
            for v in variants:
                torch.manual_seed(cfg.seed)
                flops, kept = v.cost(x)
                costs[v.key] = (flops.double().mean().item(), kept.double().mean().item())
                bar.update()
            timings = time_round_robin(
                {v.key: partial(v.model, x) for v in variants},
                cfg.warmup,
                cfg.repeats,
                device,
                progress=bar,
                min_seconds=cfg.min_seconds,
            )
            times = {key: t.median for key, t in timings.items()}
            dense = {(v.family, v.compiled): v for v in variants if v.dense}
            seed_ats = next((v for v in variants if v.family == "seed" and not v.dense), None)
            for v in variants:
                t = times[v.key]
                base = dense[v.family, v.compiled]
                up = speedup(timings[base.key], timings[v.key])
                ideal = costs[base.key][0] / costs[v.key][0]
                q1, q3 = up.quartiles()
                vs_seed = float("nan") if seed_ats is None else times[seed_ats.key] / t
                vs_eager = times[f"{v.family}/{v.eager}"] / t if v.compiled else float("nan")
                # the dispatch mode that follows CPU tensors does not see inside compiled code
                peak = float("nan") if v.compiled else peak_memory(partial(v.model, x), device)
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
                        speedup=up.median,
                        speedup_q1=q1,
                        speedup_q3=q3,
                        ideal=ideal,
                        efficiency=up.median / ideal,
                        vs_eager=vs_eager,
                        vs_seed_ats=vs_seed,
                        speedup_iqr=f"{q1:.2f}-{q3:.2f}",
                    )
                )
    bar.close()
    return rows
