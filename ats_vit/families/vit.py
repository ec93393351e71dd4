"""Our own :class:`~ats_vit.vit.ViT` as a family: it samples natively, nothing is patched."""

from __future__ import annotations

from torch import Tensor, nn

from ats_vit.families.base import Family
from ats_vit.sampling import AdaptiveTokenSampling
from ats_vit.tokens import TokenState
from ats_vit.vit import ViT

__all__ = ["ViTFamily", "family"]

MODELS = (ViT,)


class ViTFamily(Family):
    model: ViT

    def __init__(self, model: ViT) -> None:
        super().__init__(
            model,
            "ats_vit.ViT",
            list(model.blocks),
            model.cost,
            image_size=model.image_size,
            patch_size=model.patch_size,
            channels=model.channels,
            num_classes=model.head.out_features,
        )

    def sampling_layers(self) -> list[AdaptiveTokenSampling]:
        return self.model.sampling_layers()

    def run(self, images: Tensor, start: int = 0, hidden: Tensor | None = None) -> tuple[Tensor, TokenState]:
        resume = None if hidden is None else (start, hidden)
        x, state = self.model.forward_tokens(images, resume=resume)
        self.model.last_state = state
        return self.model.forward_head(x), state

    def _run_block(self, block: nn.Module, x: Tensor, state: TokenState) -> Tensor:
        return block(x, state)

    def last_state(self) -> TokenState:
        if self.model.last_state is None:
            raise ValueError("no forward pass of this ats_vit.ViT has run yet")
        return self.model.last_state


def family(model: ViT) -> ViTFamily:
    return ViTFamily(model)
