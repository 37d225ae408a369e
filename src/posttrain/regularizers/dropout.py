"""Dropout: set every existing dropout layer and put one in front of the classifier head."""

from __future__ import annotations

from torch import nn

from posttrain.errors import require


class Dropout:
    """Dropout with probability `p` before the head (any backbone) and in existing layers."""

    def __init__(self, p: float = 0.5) -> None:
        require(
            isinstance(p, int | float) and 0 <= p < 1,
            f"Config key `reg.dropout.p` must be in [0, 1), got {p!r}.",
        )
        self.p = float(p)
        self.existing_layers = 0

    def modify_model(self, model: nn.Module) -> None:
        layers = [m for m in model.modules() if isinstance(m, nn.Dropout)]
        for layer in layers:
            layer.p = self.p
        self.existing_layers = len(layers)
        model.head_dropout = nn.Dropout(self.p)

    def describe(self) -> str:
        return (
            f"dropout p={self.p:g} before the head "
            f"(and in {self.existing_layers} existing dropout layers)"
        )
