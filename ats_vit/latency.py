"""Time on this device: a model of a forward pass's seconds, from measured block times.

GFLOPs do not turn into time one for one: small GEMMs run at lower rates, and every sampling
layer adds a few small ops. A :class:`LatencyModel` times one of the model's own blocks on
this device, at one batch size and dtype, on a grid of token counts: dense (``n`` tokens in
and out) and for each selection rule (``n_in`` tokens in, ``n_out`` out). A forward pass's
time is then predicted from the tokens each layer handled (a :class:`~ats_vit.flops.TokenTrace`)
by interpolating that table (its rows monotone in tokens), so a search over a hundred budgets
times no forward pass. Tables are cached on disk per model shape, device, batch size, dtype,
threads, torch version and a hash of the code timed (``$ATS_VIT_CACHE``, else
``~/.cache/ats-vit``), and built once; a rule's cells are timed the first time a prediction
needs them.

The grid inputs are identical tokens, so attention is uniform: the inverse transform then keeps
exactly its cap, and every rule runs at a known count. What a layer's input carries changes its
time, so dense blocks are also timed with token sizes (after a merge, attention adds
``log(size)``) and with padding (after adaptive counts: a key mask and packed token-wise
layers), and a sampling layer in such a context costs its plain time plus what the context
costs a dense block. A batch is predicted at its mean count when it is packed, else at its
largest. The search
that uses this model verifies the budget it chooses by timing it (:mod:`ats_vit.calibrate`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:  # POSIX: the cache's lock files; elsewhere tables are built without one
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

from ats_vit._io import write_text_atomic
from ats_vit._progress import bar as progress_bar
from ats_vit.families import Family
from ats_vit.flops import TokenTrace
from ats_vit.options import Rule, SamplingOptions
from ats_vit.sampling import PACK_MIN_PADDING, Padding, bucket_images

__all__ = ["LatencyModel", "LatencyTable", "cache_dir", "cached_tables", "clear_cache"]

FORMAT = "ats-vit-latency/1"
# the source files whose code a table times (the blocks, the selection, the table itself):
# their hash is part of the cache key, so a table timed with other code is measured afresh
TIMED_SOURCES = (
    "attention.py",
    "flops.py",
    "latency.py",
    "options.py",
    "sampling.py",
    "tokens.py",
    "families",
)
# what a layer's input carries once earlier layers selected: nothing, token sizes (after a
# merge), or padding (after an adaptive count)
CONTEXTS = ("plain", "sized", "padded")
# the share of padded slots in the grid that a "padded" block is timed on
PADDED_SHARE = 0.2
# each cell is timed for at least this long in all (short blocks get more rounds)
MIN_CELL_SECONDS = 0.05
# the 1-minute load average per CPU above which a CPU table counts as timed on a busy machine
# (this process's own threads bring it near 1 on a small machine; another job doubles it)
BUSY_LOAD = 1.5
# the options that make each rule's block run at a known count on identical tokens
RULE_OPTIONS = {
    Rule.SCORE: SamplingOptions(),
    Rule.FUSE: SamplingOptions(dropped="fuse"),
    Rule.TOME: SamplingOptions(sampler="tome"),
    Rule.PITOME: SamplingOptions(sampler="pitome"),
    Rule.DCT: SamplingOptions(sampler="dct"),
    Rule.OFFICIAL: SamplingOptions(sampler="official"),
    Rule.FIXED: SamplingOptions(sampler="topk"),
}
# the rules whole passes are timed with to fit the table to the model in place; the others
# take the multiplier of their nearest kin
REFERENCE_RULES = (Rule.SCORE, Rule.FUSE, Rule.TOME, Rule.OFFICIAL)
KIN = {
    Rule.FIXED.value: "dense",
    Rule.PITOME.value: Rule.TOME.value,
    Rule.DCT.value: "dense",
}


def code_digest(root: Path | None = None) -> str:
    """A hash of the code that a latency table times (:data:`TIMED_SOURCES` in the package
    folder ``root``, default: this package's)."""
    root = Path(__file__).parent if root is None else root
    digest = hashlib.sha1()
    for name in TIMED_SOURCES:
        path = root / name
        for file in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            digest.update(file.relative_to(root).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where latency tables are cached: ``$ATS_VIT_CACHE`` or ``~/.cache/ats-vit``."""
    root = os.environ.get("ATS_VIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ats-vit"
    )
    return Path(root) / "latency"


def cached_tables() -> list[dict[str, Any]]:
    """What the cache holds: per file, its path, what it was timed for (model, batch size,
    device, dtype, threads, torch), the rules timed, whether the machine was busy, its size;
    a file that is not a readable table is listed with its error."""
    found = []
    for path in sorted(cache_dir().glob("*.json")):
        entry: dict[str, Any] = {"path": str(path), "bytes": path.stat().st_size}
        try:
            table = LatencyTable.from_dict(json.loads(path.read_text()), str(path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            entry["error"] = str(exc)
        else:
            key = table.key
            entry.update(
                {k: key.get(k) for k in ("model", "batch_size", "device", "dtype", "threads", "torch")},
                rules=sorted(table.rules),
                disturbed=table.disturbed,
            )
        found.append(entry)
    return found


def clear_cache() -> int:
    """Remove every cached table (and its lock file); returns how many tables were removed."""
    root = cache_dir()
    tables = list(root.glob("*.json"))
    for path in [*tables, *root.glob("*.lock")]:
        path.unlink(missing_ok=True)
    return len(tables)


@dataclass
class LatencyTable:
    """Measured seconds of one block at one batch size, by token count (prefix included).

    ``widths``: ascending token counts of the grid. ``dense[i]``: a block on ``widths[i]``
    tokens; ``dense_in[context][i]``: the same whose input carries sizes or padding.
    ``rules[rule][i][j]``: a sampling block with ``widths[i]`` tokens in and ``widths[j]`` out
    (j <= i; NaN above), on a plain
    input. stem: seconds outside the blocks (embedding, norm, head). Cells
    are block times alone, scaled by ``scale`` to what the dense blocks take inside the model.
    """

    key: dict[str, Any]
    widths: list[int]
    dense: list[float]
    stem: float
    dense_in: dict[str, list[float]] = field(default_factory=dict)
    rules: dict[str, list[list[float]]] = field(default_factory=dict)
    scale: float = 1.0  # blocks in place / alone (applied to every cell)
    # multipliers per layer kind ("dense" and each rule), fitted so that the table's sums match
    # whole forward passes timed under reference budgets (what a block alone cannot show)
    fit: dict[str, float] = field(default_factory=dict)
    # the machine's load (1-minute average, over its CPUs) before and after each part was timed:
    # a table timed while other work competed for the cores is not reused (:data:`BUSY_LOAD`)
    load: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @property
    def disturbed(self) -> bool:
        """Whether any of its timings ran while the machine was busy with other work."""
        return any(value > BUSY_LOAD for value in self.load)

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> LatencyTable:
        """A table read from JSON, every field checked (``where`` names the file in errors)."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{where}: not a latency table of format {FORMAT!r}")
        fields_ = {k: v for k, v in raw.items() if k != "format"}
        try:
            table = cls(**fields_)
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None
        n = len(table.widths) if isinstance(table.widths, list) else 0
        rows = [table.dense, *table.dense_in.values()] if isinstance(table.dense_in, dict) else [table.dense]
        grids = table.rules.values() if isinstance(table.rules, dict) else []
        good = (
            n >= 2
            and isinstance(table.key, dict)
            and all(isinstance(w, int) for w in table.widths)
            and all(isinstance(row, list) and len(row) == n for row in rows)
            and all(isinstance(g, list) and len(g) == n and all(len(r) == n for r in g) for g in grids)
            and isinstance(table.fit, dict)
            and isinstance(table.stem, (int, float))
        )
        if not good:
            raise ValueError(f"{where}: a latency table of the wrong shape (widths, rows and grids disagree)")
        return table


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def _grid(num_patches: int, prefix: int, points: int) -> list[int]:
    """Token counts (prefix included) from one candidate to all, spaced geometrically."""
    counts = {num_patches, 1}
    for i in range(points):
        counts.add(max(1, round(num_patches ** (i / max(points - 1, 1)))))
    return sorted(c + prefix for c in counts)


def _padding(b: int, width: int, num_prefix: int, device: torch.device) -> Padding | None:
    """A padded grid of ``width`` slots: one image in five keeps them all and the others fewer,
    so that about :data:`PADDED_SHARE` of the grid is padding, as in a batch of adaptive counts."""
    candidates = width - num_prefix
    if candidates < 2:
        return None
    shortfall = torch.arange(b, device=device).remainder(5) * (PADDED_SHARE * candidates / 2)
    kept = (width - shortfall.round()).clamp_min(num_prefix + 1)
    mask = torch.arange(width, device=device) < kept[:, None]
    padded = 1 - mask.float().mean().item()
    rows = mask.flatten().nonzero().squeeze(1) if padded >= PACK_MIN_PADDING else None
    return Padding(mask, rows, bucket_images(kept, kept.long().tolist()))  # as compact() pads


class LatencyModel:
    """Predicted seconds of ``family``'s forward passes at ``batch_size`` on its device.

    ``dtype``: run under autocast to this dtype (e.g. ``torch.bfloat16``), None: as the
    model is. ``points``: grid widths between one candidate and all. ``repeats``: timed
    rounds per cell (interleaved; the median), more until each cell ran ``min_seconds`` in
    all. ``cache``: read and write the table on disk.
    """

    def __init__(
        self,
        family: Family,
        batch_size: int,
        *,
        dtype: torch.dtype | None = None,
        points: int = 7,
        repeats: int = 5,
        min_seconds: float = MIN_CELL_SECONDS,
        cache: bool = True,
        progress: bool = True,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.family, self.batch_size, self.dtype = family, batch_size, dtype
        self.repeats, self.min_seconds, self.progress, self.cache = repeats, min_seconds, progress, cache
        parameter = next(family.model.parameters())
        self.device, self.param_dtype = parameter.device, parameter.dtype
        cost = family.cost
        self.key = dict(
            model=type(family.model).__name__,
            depth=cost.depth,
            dim=cost.dim,
            heads=cost.heads,
            mlp_hidden=cost.mlp_hidden,
            num_patches=cost.num_patches,
            prefix=cost.num_prefix_tokens,
            device=_device_name(self.device),
            batch_size=batch_size,
            dtype=str(dtype or parameter.dtype),
            threads=torch.get_num_threads() if self.device.type == "cpu" else 0,
            torch=torch.__version__,
            points=points,
            code=code_digest(),
        )
        self._loads: list[float] = []  # the load seen around each timing since the last save
        self._holding = False  # whether this process holds the table's lock now
        with self._locked():  # one process builds a table; the others then read it
            self.table = self._load() or self._build_dense(points)
            if not self.table.fit:
                self._fit()

    # ---------------------------------------------------------------- the table on disk

    @property
    def path(self) -> Path:
        digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
        return cache_dir() / f"{digest}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the table's lock file (other processes building the same table wait); this
        process may take it again while it holds it (fitting the table times rule cells)."""
        if not self.cache or self._holding:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "a") as lock:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX)
            self._holding = True
            try:
                yield
            finally:
                self._holding = False
                if fcntl is not None:
                    fcntl.flock(lock, fcntl.LOCK_UN)

    def _load(self) -> LatencyTable | None:
        """The cached table, if there is one of this key, whole and timed on a quiet machine. A
        file that is not a table is moved aside (named on stderr) and rebuilt."""
        if not self.cache or not self.path.is_file():
            return None
        try:
            table = LatencyTable.from_dict(json.loads(self.path.read_text()), str(self.path))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
            aside = self.path.with_name(f"{self.path.stem}.bad-{int(time.time())}.json")
            self.path.replace(aside)
            detail = str(exc).removeprefix(f"{self.path}: ")
            print(f"latency cache: {self.path}: {detail}; moved to {aside}, timing afresh", file=sys.stderr)
            return None
        if table.key != self.key:
            return None
        if table.disturbed:
            print(
                f"latency cache: {self.path} was timed while the machine was busy (load "
                f"{max(table.load):.1f} per CPU); timing afresh",
                file=sys.stderr,
            )
            return None
        return table

    def _save(self) -> None:
        self.table.load += self._loads
        self._loads = []
        if self.cache:  # a temporary file of this process's own, then one rename
            write_text_atomic(self.path, json.dumps(self.table.to_dict()))

    # ---------------------------------------------------------------- timing

    def _autocast(self) -> Any:
        return torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )

    def _runner(self, width: int, context: str = "plain") -> Callable[[], object]:
        """One call of the family's middle block on ``width`` identical tokens, in a token state
        that carries sizes or padding as ``context`` says."""
        family = self.family
        block = family.blocks[family.depth // 2]
        b, p = self.batch_size, family.num_prefix_tokens
        token = torch.randn(b, 1, family.cost.dim, generator=torch.Generator().manual_seed(0))
        x = token.expand(-1, width, -1).contiguous().to(self.device, self.param_dtype)
        size = torch.ones(b, width, device=self.device) if context == "sized" else None
        padding = _padding(b, width, p, self.device) if context == "padded" else None
        autocast = self._autocast()

        @torch.inference_mode()
        def run() -> object:
            with autocast:
                return family.run_block(block, x, padding=padding, size=size)

        return run

    def _time(
        self, calls: dict[Any, Callable[[], object]], configure: Callable[[Any], None]
    ) -> dict[Any, float]:
        """Median seconds of each call, the calls interleaved round by round (the machine's load
        is noted before and after)."""
        self._note_load()
        samples: dict[Any, list[float]] = {key: [] for key in calls}
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        total = len(calls) * (self.repeats + 1)
        bar = progress_bar(total=total, desc="latency table", unit="call", disable=not self.progress)
        for key, call in calls.items():  # warm-up
            configure(key)
            call()
            bar.update()
        rounds = 0
        while rounds < self.repeats or min(map(sum, samples.values())) < self.min_seconds:
            rounds += 1
            if rounds > self.repeats and bar.total is not None:
                bar.total += len(calls)
            for key, call in calls.items():
                configure(key)
                sync()
                start = time.perf_counter()
                call()
                sync()
                samples[key].append(time.perf_counter() - start)
                bar.update()
        bar.close()
        self._note_load()
        return {key: statistics.median(s) for key, s in samples.items()}

    def _with_block(self, fn: Callable[[Any], dict[Any, float]]) -> dict[Any, float]:
        """Run ``fn`` with the middle block's sampling module free to reconfigure (and to
        select: a dense model, or a budget that leaves the block whole, marks it as keeping
        everything), then restore it and the model's train/eval mode."""
        family = self.family
        ats = family.sampling_layers()[family.depth // 2]
        saved, training = (ats.cap, ats.options), family.model.training
        keeps_all, ats.keeps_all = ats.keeps_all, False
        family.model.eval()
        try:
            return fn(ats)
        finally:
            ats.configure(*saved)
            ats.keeps_all = keeps_all
            family.model.train(training)

    def _build_dense(self, points: int) -> LatencyTable:
        family = self.family
        p, n = family.num_prefix_tokens, family.num_patches
        widths = _grid(n, p, points)
        runs: dict[Any, Callable[[], object]] = {w: self._runner(w) for w in widths}
        runs.update({(c, w): self._runner(w, c) for c in CONTEXTS[1:] for w in widths})
        images = torch.randn(self.batch_size, *family.input_shape)
        images = images.to(self.device, self.param_dtype)
        autocast = self._autocast()

        hidden = torch.zeros(
            self.batch_size, n + p, family.cost.dim, device=self.device, dtype=self.param_dtype
        )

        @torch.inference_mode()
        def whole() -> object:
            with autocast:
                return family.run(images)

        @torch.inference_mode()
        def stem_only() -> object:  # every block skipped: embedding, norm and head
            with autocast:
                return family.run(images, family.depth, hidden)

        def measure(ats: Any) -> dict[Any, float]:
            times = self._time(runs, lambda _key: ats.configure(n, SamplingOptions()))
            saved = family.caps(), family.layer_options()
            family.set_schedule(None, SamplingOptions())
            try:
                times.update(self._time({"model": whole, "stem": stem_only}, lambda _key: None))
            finally:
                family.set_schedule(*saved)
            return times

        times = self._with_block(measure)
        # a block timed alone runs warmer than inside the model (its weights and inputs stay in
        # cache), so every cell is scaled by how much slower the dense blocks run in place
        stem = times["stem"]
        scale = max(times["model"] - stem, 0.0) / (family.depth * times[widths[-1]])
        dense = _monotone([scale * times[w] for w in widths])
        dense_in = {c: _monotone([scale * times[(c, w)] for w in widths]) for c in CONTEXTS[1:]}
        self.table = LatencyTable(self.key, widths, dense, stem, dense_in, scale=scale)
        self._save()
        return self.table

    def _build_rule(self, rule: Rule) -> list[list[float]]:
        widths, p = self.table.widths, self.family.num_prefix_tokens
        options = RULE_OPTIONS[rule]
        extra = 1 if rule is Rule.FUSE else 0  # the fused token comes on top of the cap
        cells = [(i, j) for i in range(len(widths)) for j in range(i) if widths[j] - p - extra >= 1]
        runs = {(i, j): self._runner(widths[i]) for i, j in cells}

        def measure(ats: Any) -> dict[Any, float]:
            return self._time(runs, lambda cell: ats.configure(widths[cell[1]] - p - extra, options))

        times = self._with_block(measure)
        grid = [[math.nan] * len(widths) for _ in widths]
        for i in range(len(widths)):
            grid[i][i] = self.table.dense[i]  # a layer that keeps everything is dense
            for j in range(i):
                grid[i][j] = self.table.scale * times.get((i, j), math.nan)
        # fewer tokens out of as many in, or as many out of fewer in, never cost more (the
        # diagonal stays as timed: selecting can cost more than keeping everything)
        for i in range(len(widths)):
            grid[i][:i] = _monotone(grid[i][:i])
        for j in range(len(widths)):
            column = _monotone([grid[i][j] for i in range(j + 1, len(widths))])
            for i, value in enumerate(column, start=j + 1):
                grid[i][j] = value
        self.table.rules[rule.value] = grid
        self._save()
        return grid

    def _fit(self) -> None:
        """Time whole forward passes under reference budgets (each rule family, two cap decays,
        two start layers, and dense) and fit one multiplier per layer kind by least squares
        (pulled gently towards 1), so that predictions match the model in place."""
        family = self.family
        depth, n = family.depth, family.num_patches
        images = torch.randn(self.batch_size, *family.input_shape)
        images = images.to(self.device, self.param_dtype)
        configs: list[tuple[tuple[int, ...], SamplingOptions]] = [((n,) * depth, SamplingOptions())]
        for rule in REFERENCE_RULES:
            for start in (0, depth // 2):
                for decay in (0.6, 0.85):
                    caps = (n,) * start + tuple(
                        max(2, round(n * decay ** (i + 1))) for i in range(depth - start)
                    )
                    configs.append((caps, RULE_OPTIONS[rule]))
        saved, training = (family.caps(), family.layer_options()), family.model.training
        family.model.eval()
        autocast = self._autocast()
        try:
            traces = []
            with torch.inference_mode(), autocast:
                for caps, options in configs:
                    family.set_schedule(caps, options)
                    traces.append(family.run(images)[1].trace)

            def call(config: tuple[tuple[int, ...], SamplingOptions]) -> Callable[[], object]:
                @torch.inference_mode()
                def run() -> object:
                    family.set_schedule(*config)
                    with autocast:
                        return family.run(images)

                return run

            times = self._time({i: call(c) for i, c in enumerate(configs)}, lambda _key: None)
        finally:
            family.set_schedule(*saved)
            family.model.train(training)
        kinds = ["dense", *(r.value for r in REFERENCE_RULES)]
        sums = torch.tensor(
            [[self._kind_sums(t.kept_per_layer(), t.rules).get(k, 0.0) for k in kinds] for t in traces]
        )
        measured = torch.tensor([times[i] for i in range(len(configs))], dtype=sums.dtype) - self.table.stem
        # least squares with a pull towards 1 (weighted by the typical sum), so a kind seen in
        # few layers cannot wander far
        pull = 0.1 * sums.abs().mean(dim=0).clamp_min(1e-9)
        a = torch.cat((sums, torch.diag(pull)))
        y = torch.cat((measured, pull))
        solution = torch.linalg.lstsq(a, y[:, None]).solution.squeeze(1).clamp(0.5, 2.0)
        self.table.fit = {k: float(v) for k, v in zip(kinds, solution, strict=True)}
        self._save()

    def _kind_sums(self, counts: Tensor, rules: Sequence[Rule | None]) -> dict[str, float]:
        """Table seconds per batch summed by layer kind ("dense" and each rule), averaged over
        batches of ``batch_size`` images."""
        p, n = self.family.num_prefix_tokens, self.family.num_patches
        counts = counts.double().cpu()
        sums: dict[str, float] = {}
        chunks = counts.split(self.batch_size)
        for chunk in chunks:
            widths_in = torch.cat((torch.full((len(chunk), 1), float(n)), chunk[:, :-1]), dim=1)
            sized = False
            for layer, rule in enumerate(rules):
                width_in = _width(widths_in[:, layer]) + p
                width_out = _width(chunk[:, layer]) + p
                padded = bool(widths_in[:, layer].min() < widths_in[:, layer].max())
                context = "sized" if sized else "padded" if padded else "plain"
                kind = "dense" if rule is None else rule.value
                sums[kind] = sums.get(kind, 0.0) + self.layer_seconds(
                    rule, width_in, width_out, context
                ) / len(chunks)
                sized = sized or (rule is not None and rule.merges)
        return sums

    # ---------------------------------------------------------------- predicting

    def _dense_row(self, context: str) -> list[float]:
        return self.table.dense if context == "plain" else self.table.dense_in[context]

    def _grid(self, rule: Rule) -> list[list[float]]:
        """The table's cells of ``rule``, timed the first time they are needed (under the lock,
        after taking what other processes timed meanwhile)."""
        if rule.value not in self.table.rules:
            with self._locked():
                stored = self._load()
                if stored is not None:
                    self.table.rules = {**stored.rules, **self.table.rules}
                if rule.value not in self.table.rules:
                    self._build_rule(rule)
        return self.table.rules[rule.value]

    def _note_load(self) -> None:
        """Note the machine's load per CPU (CPU tables only: GPU timings do not share it)."""
        if self.device.type == "cpu" and hasattr(os, "getloadavg"):
            self._loads.append(round(os.getloadavg()[0] / (os.cpu_count() or 1), 2))

    def _rule_at(self, rule: Rule, width_in: float, width_out: float) -> float:
        grid = self._grid(rule)
        widths = self.table.widths
        width_out = min(width_out, width_in)
        # interpolate along n_out within the two bracketing n_in rows, then along n_in
        i = min(max(bisect_right(widths, width_in) - 1, 0), len(widths) - 2)
        rows = []
        for row in (i, i + 1):
            known = [(widths[j], grid[row][j]) for j in range(row + 1) if not math.isnan(grid[row][j])]
            xs, ys = zip(*known, strict=True)
            rows.append(_interp(xs, ys, min(width_out, widths[row])))
        return _interp([widths[i], widths[i + 1]], rows, width_in)

    def layer_seconds(
        self, rule: Rule | None, width_in: float, width_out: float, context: str = "plain"
    ) -> float:
        """Seconds of one block with ``width_in`` tokens in and ``width_out`` out (prefix
        included), selecting by ``rule``; None: a dense block whose input is in ``context``.
        A family scores one way in every block, so a rule's cells were timed with its scoring
        (the CLS row or received attention)."""
        dense = _interp(self.table.widths, self.table.dense, width_in)
        in_context = _interp(self.table.widths, self._dense_row(context), width_in)
        if rule is None:
            return in_context
        # a rule's cells are timed on a plain input; sizes or padding cost it what they cost
        # a dense block of that width
        return self._rule_at(rule, width_in, width_out) + in_context - dense

    def dense_seconds(self) -> float:
        """Predicted seconds of a dense forward pass at this batch size."""
        return self.table.stem + self.table.fit.get("dense", 1.0) * self.family.depth * self.table.dense[-1]

    def seconds(self, counts: Tensor, rules: Sequence[Rule | None]) -> float:
        """Predicted seconds per batch of ``batch_size`` images, averaged over the images given.

        counts: (N, depth) non-prefix tokens each block output per image (as
        ``trace.kept_per_layer()``); rules: per block, what it ran (``trace.rules``; None: kept
        all). The images are taken in batches of ``batch_size`` in order."""
        sums = self._kind_sums(counts, rules)
        fit = self.table.fit
        return self.table.stem + sum(fit.get(_kind_of(k), 1.0) * v for k, v in sums.items())

    def ratio(self, trace: TokenTrace) -> float:
        """Predicted time of the pass ``trace`` recorded, as a fraction of the dense pass."""
        return self.seconds(trace.kept_per_layer(), trace.rules) / self.dense_seconds()


def _kind_of(kind: str) -> str:
    return KIN.get(kind, kind)


def _width(counts: Tensor) -> float:
    """The token count a batch of images with these counts runs at: the mean when the padded
    grid is packed for its token-wise layers (which are most of a block's time), else the
    largest (every padded row is computed)."""
    widest, mean = counts.max().item(), counts.mean().item()
    return mean if widest > 0 and 1 - mean / widest >= PACK_MIN_PADDING else widest


def _monotone(values: Sequence[float]) -> list[float]:
    """Times by growing token count, each lowered to the least time after it (NaN: not timed,
    left alone). A block never runs faster on more tokens, so a cell above a later one is a
    busy stretch of the machine caught in the median (one table held a padded block at
    3 tokens at 1155 µs between 396 and 528 µs; timed again: 580 µs)."""
    out = list(values)
    least = math.inf
    for k in range(len(out) - 1, -1, -1):
        if not math.isnan(out[k]):
            least = out[k] = min(out[k], least)
    return out


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation (linear extrapolation beyond the ends)."""
    if len(xs) == 1:
        return float(ys[0])
    i = min(max(bisect_right(list(xs), x) - 1, 0), len(xs) - 2)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0)) if x1 != x0 else float(y0)
