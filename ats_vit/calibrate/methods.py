"""The methods :func:`~ats_vit.calibrate.calibrate` searches: a selection rule and the knob it turns.

- ``"paper"``: the paper's ATS exactly (temperature 1) in the paper's configuration: one cap
  from the start layer on (with adaptive counts, later layers sample only when an image keeps
  more); the cap is the knob.
- ``"official"``: the authors' released ATS (adaptive through de-duplication), one cap from the
  start layer on.
- ``"ats-fuse"``: the paper's inverse-transform sampling with the temperature knob, the dropped
  tokens of each image fused into one; the cap decays geometrically from the start layer and
  the temperature sets how much of it is used.
- ``"topk"``, ``"evit"`` (top-k with fusion, EViT), ``"random"``, ``"tome"`` (ToMe),
  ``"pitome"`` (PiToMe), ``"dct"`` (OpenToMe's cosine transform, many-to-many): the peers,
  each keeping a fixed count that decays geometrically from the start layer.
- ``"auto"`` (recommended): the members of :data:`AUTO`, one of them kept by
  :func:`ats_vit.calibrate.choice.prefer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ats_vit import _validate
from ats_vit.budget import Budget

__all__ = ["AUTO", "METHODS", "METHOD_CHOICES", "RECOMMENDED", "Method", "caps_for"]


@dataclass(frozen=True)
class Method:
    """A way of selecting tokens and the knob :func:`~ats_vit.calibrate.calibrate` turns to
    meet a cost.

    ``knob="temperature"``: the ATS temperature, for each cap decay in ``decays``;
    ``knob="decay"``: the cap decay itself (caps ``round(n * decay ** (l - start + 1))``);
    ``knob="keep"``: one cap ``round(n * keep)`` in every layer from the start (the paper's
    configuration: with ATS, later layers sample only when an image still has more).
    """

    sampler: str
    dropped: str = "discard"
    knob: str = "decay"
    decays: tuple[float, ...] = ()

    def budget(
        self,
        name: str,
        start: int,
        knob: float,
        temperature: float,
        *,
        depth: int,
        num_patches: int,
        cost: str = "gflops",
    ) -> Budget:
        """The budget of this method from layer ``start`` at a knob value (the cap decay, or the
        keep ratio) and temperature, for a model of ``depth`` layers and ``num_patches`` patches."""
        layers = depth - start
        if self.knob == "keep":
            caps = (max(1, round(num_patches * knob)),) * layers
        else:
            caps = caps_for(knob, num_patches, layers)
        return Budget(
            start_layer=start,
            caps=caps,
            sampler=self.sampler,
            temperature=temperature,
            dropped=self.dropped,
            depth=depth,
            num_patches=num_patches,
            method=name,
            cost=cost,
        )


METHODS: dict[str, Method] = {
    "paper": Method("inverse_transform", knob="keep"),
    "official": Method("official", knob="keep"),
    "ats-fuse": Method("inverse_transform", "fuse", "temperature", (0.5, 0.7, 0.85, 0.95)),
    "topk": Method("topk"),
    "evit": Method("topk", "fuse"),
    "random": Method("random"),
    "tome": Method("tome", "merge"),
    "pitome": Method("pitome", "merge"),
    "dct": Method("dct"),
}
# what method="auto" searches (the first is kept unless another is ahead by SWITCH_Z:
# choice.prefer; with a latency model, the fastest of the equally accurate: choice.choose).
# Chosen by benchmarks/auto_rule.py's rule, fixed before the run, on the selection seeds 100 and
# 101 of demo, gap and glyphs196 (data and weights in no reported table; auto_rule.json): ToMe
# first, never switching, had the highest mean test accuracy of the lists tried that were not
# tied with it (93.75% over 30 points; 1.0's ats-fuse + official + paper + tome at z 0.5: 93.67%)
AUTO = ("tome", "ats-fuse")
RECOMMENDED = "auto"
# every name `method=` accepts
METHOD_CHOICES = (RECOMMENDED, *METHODS)
# names that 0.x accepted, and what to use instead (1.0 removed them: they measured no better)
REMOVED = {
    "ats": "ats-fuse",
    "ats-merge": "ats-fuse",
    "tome-early": "tome",
    "hybrid": "auto",
}


def members(method: str) -> tuple[str, ...]:
    """The methods a search of ``method`` runs (``"auto"``: those of :data:`AUTO`)."""
    return AUTO if method == RECOMMENDED else (method,)


def check_method(method: object) -> str:
    """``method`` if :func:`~ats_vit.calibrate.calibrate` knows it, else a ``ValueError`` that
    names the accepted ones (and, for a name 0.x had, what replaced it)."""
    if isinstance(method, str) and method.endswith("+search"):
        raise ValueError(
            f"method={method!r}: the '+search' schedule search was removed in 1.0 (it helped at 1 of 18 "
            f"frontier points); use method={method.removesuffix('+search')!r}"
        )
    if isinstance(method, str) and method in REMOVED:
        raise ValueError(
            f"method={method!r} was removed in 1.0 (it measured no better; CHANGELOG.md): use "
            f"{REMOVED[method]!r}. Accepted: {', '.join(METHOD_CHOICES)}"
        )
    return str(_validate.choice("method", method, METHOD_CHOICES))


def caps_for(decay: float, num_patches: int, layers: int) -> tuple[int, ...]:
    """``layers`` caps decaying geometrically from ``num_patches``: ``round(n * decay ** (i + 1))``
    (at least one token)."""
    return tuple(max(1, round(num_patches * decay ** (i + 1))) for i in range(layers))
