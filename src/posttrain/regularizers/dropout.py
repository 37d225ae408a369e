"""Dropout on the embedding every method predicts from, and in existing dropout layers."""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from posttrain.errors import require
from posttrain.regularizers.base import ModelParts


class Dropout:
    """Dropout with probability `p` on the embedding (`ImageClassifier.head_dropout`, which
    the classifier head, ProtoNet's prototypes, MAML's adapted forward and the multi-task
    heads all read) and in the backbone's existing dropout layers."""

    key = "dropout"
    needs: ClassVar[frozenset[str]] = frozenset({"embedding_dropout"})

    def __init__(self, p: float = 0.5) -> None:
        require(
            isinstance(p, int | float) and 0 <= p < 1,
            f"Config key `reg.dropout.p` must be in [0, 1), got {p!r}.",
        )
        self.p = float(p)
        self.existing_layers = 0

    def modify_model(self, parts: ModelParts) -> None:
        layers = [m for m in parts.model.modules() if isinstance(m, nn.Dropout)]
        for layer in layers:
            layer.p = self.p
        self.existing_layers = len(layers)
        parts.model.head_dropout = nn.Dropout(self.p)

    def describe(self) -> str:
        return (
            f"dropout p={self.p:g} on the embedding "
            f"(and in {self.existing_layers} existing dropout layers)"
        )
