"""Penalties added to the training loss: L1 and L2 on the weights.

L2 here is a term in the loss, so adaptive optimizers (Adam) rescale its gradient; decoupled
weight decay (`optimizer.weight_decay` with AdamW) shrinks weights directly instead. With
plain SGD the two coincide: `0.5 * weight * ||w||^2` has gradient `weight * w`, which is also
what torch Adam's own (coupled) `weight_decay` adds to the gradient.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from posttrain.errors import PosttrainError, is_number, require, require_bool
from posttrain.regularizers.base import ModelParts


def penalized_parameters(parameters: Iterable[nn.Parameter], include_1d: bool) -> list[Tensor]:
    """Trainable weights; biases and norm parameters (1-D) only when `include_1d`."""
    return [p for p in parameters if p.requires_grad and (include_1d or p.ndim > 1)]


def summed(terms: list[Tensor], like: Tensor) -> Tensor:
    """The sum of `terms`, or a zero on `like`'s device when there are none."""
    return torch.stack(terms).sum() if terms else like.new_zeros(())


def check_weight(key: str, weight: float) -> float:
    require(
        is_number(weight) and weight >= 0,
        f"Config key `{key}` must be a number >= 0, got {weight!r}.",
    )
    return float(weight)


def check_include_1d(key: str, include_1d: bool) -> bool:
    """A real boolean: Hydra keeps `no`/`off` as strings, which are truthy, so
    `reg.l2.include_1d=no` penalized biases and norms while the user had asked not to."""
    require_bool(key, include_1d)
    return include_1d


def one_d_note(include_1d: bool) -> str:
    return " (biases and norm weights included)" if include_1d else " (biases and norms excluded)"


class L1Penalty:
    """`weight * sum |w|`: pushes weights to exactly zero (sparsity)."""

    key = "l1"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def __init__(self, weight: float = 1e-5, include_1d: bool = False) -> None:
        self.weight = check_weight("reg.l1.weight", weight)
        self.include_1d = check_include_1d("reg.l1.include_1d", include_1d)

    def penalty(self, parts: ModelParts) -> Tensor:
        """Over every trainable tensor the method trains: backbone and all its heads."""
        params = penalized_parameters(parts.weights(), self.include_1d)
        return self.weight * torch.stack([p.abs().sum() for p in params]).sum()

    def describe(self) -> str:
        return f"l1 penalty, weight {self.weight:g}{one_d_note(self.include_1d)}"


class L2Penalty:
    """`0.5 * weight * sum w^2`: the classic L2 penalty in the loss."""

    key = "l2"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def __init__(self, weight: float = 1e-4, include_1d: bool = False) -> None:
        self.weight = check_weight("reg.l2.weight", weight)
        self.include_1d = check_include_1d("reg.l2.include_1d", include_1d)

    def penalty(self, parts: ModelParts) -> Tensor:
        """Over every trainable tensor the method trains: backbone and all its heads."""
        params = penalized_parameters(parts.weights(), self.include_1d)
        return 0.5 * self.weight * torch.stack([p.pow(2).sum() for p in params]).sum()

    def describe(self) -> str:
        return f"l2 penalty, weight {self.weight:g}{one_d_note(self.include_1d)}"


def check_l2sp_start(cfg: Any) -> None:
    """In training `reg.l2sp.start` is `${model.pretrained}` (eval.py points it at the
    evaluated checkpoint): the reference is the weights training starts from, so another
    value would be accepted and ignored."""
    l2sp = (cfg.get("reg") or {}).get("l2sp")
    if l2sp is None or l2sp.get("start") == cfg.model.get("pretrained"):
        return
    raise PosttrainError(
        f"Config key `reg.l2sp.start={l2sp.get('start')}`: L2-SP pulls the backbone toward the "
        "weights training starts from, which are `model.pretrained="
        f"{cfg.model.get('pretrained')}`. Set `model.pretrained` to the reference weights and "
        "leave `reg.l2sp.start` out."
    )


class L2SP:
    """L2-SP (Li et al. 2018): `alpha/2 ||w - w_start||^2` on the backbone plus
    `beta/2 ||w||^2` on the method's classifier heads, so fine-tuning stays near the
    starting point.

    The reference is the backbone as training starts: right after `model.pretrained` was
    loaded (and after `method.finetune.reinit_top_layers` restarted its top layers, whose
    discarded weights would be no reference). A method without heads of its own (ProtoNet)
    is refused unless `beta=0`.
    """

    key = "l2sp"
    refusal_hint = ", or set `reg.l2sp.beta=0` to keep only the backbone term"

    def __init__(
        self,
        alpha: float = 0.01,
        beta: float = 0.01,
        include_1d: bool = False,
        start: str | None = None,
    ) -> None:
        """`start` is `${model.pretrained}`: without pretrained weights the reference would be
        the random initialization, and the penalty would pull toward noise while the log
        said "pretrained"."""
        self.alpha = check_weight("reg.l2sp.alpha", alpha)
        self.beta = check_weight("reg.l2sp.beta", beta)
        self.include_1d = check_include_1d("reg.l2sp.include_1d", include_1d)
        require(
            bool(start),
            "`reg=l2sp` pulls the backbone toward its pretrained weights, but `model.pretrained` "
            "is not set, so the reference would be the random initialization. Set "
            "`model.pretrained` (`imagenet` for torchvision models, a posttrain checkpoint or a "
            "state-dict file); to penalize weights toward zero, use `reg=l2`.",
        )
        self.start = start
        self.reference: dict[str, Tensor] = {}

    @property
    def needs(self) -> frozenset[str]:
        return frozenset({"weights", "backbone"} | ({"classifier_heads"} if self.beta else set()))

    def modify_model(self, parts: ModelParts) -> None:
        """Snapshot the starting backbone weights (nothing in the network changes)."""
        self.reference = {
            name: p.detach().clone()
            for name, p in parts.backbone.named_parameters()
            if self.include_1d or p.ndim > 1
        }

    def penalty(self, parts: ModelParts) -> Tensor:
        require(bool(self.reference), "L2-SP needs its reference weights: attach it to a model.")
        drift = []
        for name, p in parts.backbone.named_parameters():
            if name in self.reference and p.requires_grad:
                start = self.reference[name]
                if start.device != p.device:
                    start = self.reference[name] = start.to(p.device)
                drift.append((p - start).pow(2).sum())
        heads = [p for head in parts.heads for p in head.parameters()]
        head = [p.pow(2).sum() for p in penalized_parameters(heads, self.include_1d)]
        like = next(iter(self.reference.values()))
        return 0.5 * self.alpha * summed(drift, like) + 0.5 * self.beta * summed(head, like)

    def describe(self) -> str:
        return (
            f"l2sp: alpha={self.alpha:g} pulls {len(self.reference)} backbone tensors toward "
            f"their starting (pretrained) values, beta={self.beta:g} L2 on the heads"
        )
