"""Test-time augmentation (`python eval.py ckpt_path=... tta=flip|shift`).

Each test image's logits are the mean over augmented views of it:
- `none`: the image alone (the default);
- `flip`: the image and its horizontal mirror;
- `shift`: the image and its four translations by 1/16 of its size (at least one pixel)
  left, right, up and down, edges replicated.

The views are averaged after the backbone (`ModelParts.backbone`, the features every head
predicts from). The heads are affine and dropout is off in evaluation, so this is exactly
the mean of the views' logits — for a supervised classifier and for every head of a
multi-task one. Episodic methods (MAML, ProtoNet) predict from each episode's support set
and are refused. Calibration (`calibration=temperature`) runs inside the same augmentation,
so its temperature is fitted on augmented validation logits, the kind the test uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
from torch import Tensor, nn
from torch.nn import functional as F

from posttrain.errors import require, require_choice

View = Callable[[Tensor], Tensor]


def identity(images: Tensor) -> Tensor:
    return images


def horizontal_flip(images: Tensor) -> Tensor:
    return images.flip(-1)


def shift_pixels(images: Tensor) -> int:
    """1/16 of the image width, at least one pixel (1 px at digits' 16x16, 2 px at 32x32)."""
    return max(1, round(images.shape[-1] / 16))


def translation(down: int, right: int) -> View:
    """A view moved by `down`/`right` steps of `shift_pixels`; uncovered edges replicated."""

    def translate(images: Tensor) -> Tensor:
        step = shift_pixels(images)
        dy, dx = down * step, right * step
        height, width = images.shape[-2:]
        padding = (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0))
        padded = F.pad(images, padding, mode="replicate")
        top, left = max(-dy, 0), max(-dx, 0)
        return padded[..., top : top + height, left : left + width]

    return translate


# The first view of each is the image itself.
VIEWS: dict[str, tuple[View, ...]] = {
    "none": (identity,),
    "flip": (identity, horizontal_flip),
    "shift": (
        identity,
        translation(0, -1),
        translation(0, 1),
        translation(-1, 0),
        translation(1, 0),
    ),
}
DESCRIPTIONS = {
    "none": "the image alone",
    "flip": "the image and its horizontal mirror",
    "shift": "the image and its 4 translations by 1/16 of its size (left, right, up, down)",
}


class ViewAverage:
    """A forward hook on the backbone: its output becomes the mean over the views.

    The hooked call computed the identity view already; the others run the backbone's
    `forward` directly (not its `__call__`), so the hook does not recurse.
    """

    def __init__(self, views: tuple[View, ...]) -> None:
        self.views = views

    def __call__(self, backbone: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        (images,) = args
        total = output
        for view in self.views[1:]:
            total = total + backbone.forward(view(images))
        return total / len(self.views)


def check_tta(name: str, method: L.LightningModule) -> None:
    """`tta` is a known option and the method predicts one image at a time."""
    require_choice("tta", name, VIEWS)
    if name == "none":
        return
    method_name = getattr(method, "method_name", type(method).__name__)
    require(
        "image_batches" in getattr(method, "offers", ()),
        f"`tta={name}` cannot be used with `method={method_name}`: test-time augmentation "
        "averages each test image's logits over augmented copies of it, and an episodic "
        "method predicts the classes of each episode from that episode's support images, "
        "so there is no per-image prediction to average. Use `tta=none` with this checkpoint "
        "(`method.eval_inner_steps` and `data.shots` are its test-time knobs).",
    )


@contextmanager
def augmented_predictions(name: str, method: L.LightningModule) -> Iterator[None]:
    """Within the block, `method` predicts from the mean over the views of `tta=name`."""
    check_tta(name, method)
    if name == "none":
        yield
        return
    from posttrain.console import say

    say(f"posttrain: tta={name}: test logits are the mean over {DESCRIPTIONS[name]}")
    backbone: Any = method.regularized_parts().backbone  # type: ignore[operator]
    handle = backbone.register_forward_hook(ViewAverage(VIEWS[name]))
    try:
        yield
    finally:
        handle.remove()
