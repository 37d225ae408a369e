"""Data augmentation on whole training batches, on the training device.

Every image in a batch draws its own random parameters: translation and flips are
vectorized (one `grid_sample` call), the RandAugment/TrivialAugment policies of torchvision
transforms v2 run image by image because v2 shares one random draw across a batch tensor.
Validation and test batches are never augmented (the DataModule only applies training
transforms while the trainer is training).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.nn import functional as F

from posttrain.errors import is_number, require, require_bool, require_choice


def random_translate_flip(images: Tensor, translate: float, flip: bool) -> Tensor:
    """Shift each image by up to `translate` x size pixels (zero fill) and maybe mirror it."""
    batch = images.shape[0]
    height, width = images.shape[-2:]
    theta = torch.zeros(batch, 2, 3, device=images.device)
    theta[:, 0, 0] = 1.0
    theta[:, 1, 1] = 1.0
    if flip:
        mirrored = torch.rand(batch, device=images.device) < 0.5
        theta[:, 0, 0] = torch.where(mirrored, -1.0, 1.0)
    if translate > 0:
        # Whole-pixel shifts, expressed in the [-1, 1] grid coordinates of grid_sample.
        for axis, size in ((0, width), (1, height)):
            limit = round(translate * size)
            shift = torch.randint(-limit, limit + 1, (batch,), device=images.device)
            theta[:, axis, 2] = shift.float() * 2 / size
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def is_count(value: object, low: int, high: int | None = None) -> bool:
    """`value` is an int (not a bool) in [low, high] (high None: no upper bound)."""
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and low <= value
        and (high is None or value <= high)
    )


class Augment:
    """`policy`: basic (translate + optional flip), randaugment or trivialaugment on top.

    `magnitude` and `num_ops` are RandAugment's: TrivialAugment draws its own magnitude and
    applies one op per image, `basic` has no ops. Changed for a policy that ignores them, they
    are refused (runs with magnitude 0 and 30 under trivialaugment were identical)."""

    POLICIES: ClassVar[tuple[str, ...]] = ("basic", "randaugment", "trivialaugment")
    # Policy-specific keys: their defaults and the policies that read them.
    POLICY_KEYS: ClassVar[dict[str, tuple[int, tuple[str, ...]]]] = {
        "magnitude": (9, ("randaugment",)),
        "num_ops": (2, ("randaugment",)),
    }
    key = "augment"
    needs: ClassVar[frozenset[str]] = frozenset({"image_batches"})
    stage = 0  # before mixing regularizers

    def __init__(
        self,
        policy: str = "basic",
        translate: float = 0.125,
        flip: bool = False,
        magnitude: int = 9,
        num_ops: int = 2,
    ) -> None:
        require_choice("reg.augment.policy", policy, self.POLICIES)
        require_bool("reg.augment.flip", flip)  # `flip=no` is a truthy string: flips on
        require(
            is_number(translate) and 0 <= translate < 0.5,
            f"Config key `reg.augment.translate` must be in [0, 0.5), got {translate!r}.",
        )
        require(
            is_count(magnitude, 0, 30),
            f"Config key `reg.augment.magnitude` must be an integer in [0, 30] (RandAugment's "
            f"31 magnitude bins), got {magnitude!r}.",
        )
        require(
            is_count(num_ops, 1),
            f"Config key `reg.augment.num_ops` must be an integer of at least 1 (operations "
            f"per image; for none use `reg.augment.policy=basic`), got {num_ops!r}.",
        )
        self.check_policy_keys(policy, {"magnitude": magnitude, "num_ops": num_ops})
        self.policy, self.translate, self.flip = policy, translate, flip
        self.magnitude, self.num_ops = magnitude, num_ops

    @classmethod
    def check_policy_keys(cls, policy: str, values: dict[str, int]) -> None:
        """A policy-specific key changed from its default must be one `policy` reads:
        accepted and ignored, it would make a sweep over it compare identical runs."""
        for name, value in values.items():
            default, users = cls.POLICY_KEYS[name]
            require(
                value == default or policy in users,
                f"Config key `reg.augment.{name}`={value!r} is used only by "
                f"`reg.augment.policy={' or '.join(users)}`, and the policy is {policy!r}, "
                f"which ignores it: set the policy to {' or '.join(users)}, or leave "
                f"`reg.augment.{name}` at its default ({default}).",
            )

    def _policy_transform(self):
        from torchvision.transforms import v2

        if self.policy == "randaugment":
            return v2.RandAugment(num_ops=self.num_ops, magnitude=self.magnitude)
        if self.policy == "trivialaugment":
            return v2.TrivialAugmentWide()
        return None

    def batch_transform(self, num_classes: int):
        policy = self._policy_transform()

        def transform(images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
            if policy is not None:
                as_bytes = images.mul(255).round().clamp(0, 255).to(torch.uint8)
                images = torch.stack([policy(image) for image in as_bytes]).float().div(255)
            return random_translate_flip(images, self.translate, self.flip), targets

        return transform

    def describe(self) -> str:
        extra = {"randaugment": f" (magnitude {self.magnitude}, {self.num_ops} ops)"}
        return (
            f"augment {self.policy}{extra.get(self.policy, '')}: translate ±{self.translate:g} "
            f"of the size, flip {'on' if self.flip else 'off'}; training batches only"
        )
