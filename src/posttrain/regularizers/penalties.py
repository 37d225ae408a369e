"""Penalties added to the training loss: L1 and L2 on the weights.

L2 here is a term in the loss, so adaptive optimizers (Adam) rescale its gradient; decoupled
weight decay (`optimizer.weight_decay` with AdamW) shrinks weights directly instead. With
plain SGD the two coincide: `0.5 * weight * ||w||^2` has gradient `weight * w`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from posttrain.errors import require


def penalized_parameters(model: nn.Module, include_1d: bool) -> list[nn.Parameter]:
    """Trainable weights; biases and norm parameters (1-D) only when `include_1d`."""
    return [p for p in model.parameters() if p.requires_grad and (include_1d or p.ndim > 1)]


def check_weight(key: str, weight: float) -> float:
    require(
        isinstance(weight, int | float) and weight >= 0,
        f"Config key `{key}` must be a number >= 0, got {weight!r}.",
    )
    return float(weight)


def one_d_note(include_1d: bool) -> str:
    return " (biases and norm weights included)" if include_1d else " (biases and norms excluded)"


class L1Penalty:
    """`weight * sum |w|`: pushes weights to exactly zero (sparsity)."""

    def __init__(self, weight: float = 1e-5, include_1d: bool = False) -> None:
        self.weight = check_weight("reg.l1.weight", weight)
        self.include_1d = include_1d

    def penalty(self, model: nn.Module) -> Tensor:
        params = penalized_parameters(model, self.include_1d)
        return self.weight * torch.stack([p.abs().sum() for p in params]).sum()

    def describe(self) -> str:
        return f"l1 penalty, weight {self.weight:g}{one_d_note(self.include_1d)}"


class L2Penalty:
    """`0.5 * weight * sum w^2`: the classic L2 penalty in the loss."""

    def __init__(self, weight: float = 1e-4, include_1d: bool = False) -> None:
        self.weight = check_weight("reg.l2.weight", weight)
        self.include_1d = include_1d

    def penalty(self, model: nn.Module) -> Tensor:
        params = penalized_parameters(model, self.include_1d)
        return 0.5 * self.weight * torch.stack([p.pow(2).sum() for p in params]).sum()

    def describe(self) -> str:
        return f"l2 penalty, weight {self.weight:g}{one_d_note(self.include_1d)}"


class L2SP:
    """L2-SP (Li et al. 2018): `alpha/2 ||w - w_pretrained||^2` on the backbone plus
    `beta/2 ||w||^2` on the new head, so fine-tuning stays near the starting point.

    The reference is the backbone as it is when the regularizer is attached, i.e. right
    after `model.pretrained` was loaded.
    """

    def __init__(self, alpha: float = 0.01, beta: float = 0.01, include_1d: bool = False) -> None:
        self.alpha = check_weight("reg.l2sp.alpha", alpha)
        self.beta = check_weight("reg.l2sp.beta", beta)
        self.include_1d = include_1d
        self.reference: dict[str, Tensor] = {}

    def modify_model(self, model: nn.Module) -> None:
        """Snapshot the starting backbone weights (nothing in the network changes)."""
        self.reference = {
            name: p.detach().clone()
            for name, p in model.features.named_parameters()
            if self.include_1d or p.ndim > 1
        }

    def penalty(self, model: nn.Module) -> Tensor:
        require(bool(self.reference), "L2-SP needs its reference weights: attach it to a model.")
        drift = []
        for name, p in model.features.named_parameters():
            if name in self.reference and p.requires_grad:
                start = self.reference[name]
                if start.device != p.device:
                    start = self.reference[name] = start.to(p.device)
                drift.append((p - start).pow(2).sum())
        head = [p.pow(2).sum() for p in penalized_parameters(model.head, self.include_1d)]
        zero = model.head.weight.new_zeros(())
        backbone_term = torch.stack(drift).sum() if drift else zero
        head_term = torch.stack(head).sum() if head else zero
        return 0.5 * self.alpha * backbone_term + 0.5 * self.beta * head_term

    def describe(self) -> str:
        return (
            f"l2sp: alpha={self.alpha:g} pulls {len(self.reference)} backbone tensors toward "
            f"their starting (pretrained) values, beta={self.beta:g} L2 on the head"
        )
