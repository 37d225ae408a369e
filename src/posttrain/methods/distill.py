"""Knowledge distillation (Hinton et al. 2015): a student learns from a frozen teacher.

Training loss: `alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))
+ (1 - alpha) * CE(student, labels)`. `T^2` keeps the soft part's gradients on the scale of
the hard part's as `T` grows (the paper's advice). Validation and test are the student's own
cross-entropy and metrics, exactly as `method=supervised` reports them.

`method.unlabelled=true` adds a transfer set (the paper's term): every step also draws
`data.batch_size` training images that `data.samples_per_class` left out, without their
labels, augmented like the labelled batch, and the soft part averages over both batches.
Where labels are scarce and images are not, this is where a teacher's knowledge reaches the
student. The draws have their own generator, saved with checkpoints (exact resume).

Why a subclass of `SupervisedClassifier` rather than a `MethodCore` of its own: the student
*is* a supervised classifier in everything but its training loss (forward, metrics,
confusion matrix, evaluation of its checkpoint), and composing one would forward each of
those hooks again. What distillation adds is the training step, the teacher's lifecycle and
two logged loss parts.

The teacher (`posttrain.models.teacher`) is loaded when fitting starts, not when the method
is built: `eval.py` and `model.pretrained` rebuild or read this run's checkpoint without the
teacher file. Its checks (file, classes, channels, method) still run before any training.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from posttrain.errors import is_number, require
from posttrain.methods.core import StepOutput
from posttrain.methods.metrics import EpochMeans
from posttrain.methods.supervised import SupervisedClassifier
from posttrain.models.teacher import (
    Teacher,
    accuracy_on_student_inputs,
    adapter_warning,
    check_same_teacher,
    load_teacher,
)
from posttrain.regularizers import RegularizerSet

log = logging.getLogger("posttrain")

LOSS_PARTS = ("distill_loss", "label_loss")
DRAWS_KEY = "posttrain_unlabelled_draws"
TEACHER_KEY = "posttrain_teacher"  # the teacher file a checkpoint's run distilled from


def distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """`T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def check_settings(teacher: str | None, temperature: float, alpha: float, unlabelled: bool) -> None:
    """`method.teacher` is set, `method.temperature` > 0, `method.alpha` in (0, 1],
    `method.unlabelled` a boolean."""
    require(
        bool(teacher),
        "`method=distill` needs a teacher: set `method.teacher` to the checkpoint of a "
        "trained posttrain run, e.g. `method.teacher=outputs/<run>/checkpoints/best.ckpt`.",
    )
    require(
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature > 0,
        f"Config key `method.temperature` (softening of both distributions) must be a "
        f"positive number, got {temperature!r}; Hinton et al. use 1-20, 4 is common.",
    )
    require(
        is_number(alpha) and 0 < alpha <= 1,
        f"Config key `method.alpha` (the teacher's share of the loss) must be in (0, 1], got "
        f"{alpha!r}: 1 learns from the teacher alone; 0 would ignore it (that is "
        "`method=supervised`).",
    )
    require(
        isinstance(unlabelled, bool),
        f"Config key `method.unlabelled` must be true or false, got {unlabelled!r}.",
    )


class Distillation(SupervisedClassifier):
    """A supervised student trained on a frozen teacher's soft predictions and the labels."""

    # Every supervised capability keeps its meaning: regularizers act on the student; the
    # teacher sees the same (augmented, mixed) batch; mixup/cutmix soft targets and label
    # smoothing shape the label part (`alpha=1` leaves no label part: smoothing is refused).
    OFFERS = SupervisedClassifier.OFFERS

    def __init__(
        self,
        model: nn.Module,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        regularizers: RegularizerSet | None = None,
        teacher: str | None = None,
        temperature: float = 4.0,
        alpha: float = 0.9,
        unlabelled: bool = False,
    ) -> None:
        super().__init__(model, optimizer, scheduler, regularizers)
        check_settings(teacher, temperature, alpha, unlabelled)
        require(
            not (alpha == 1 and self.regularizers.label_smoothing > 0),
            "`reg=label_smoothing` cannot be used with `method=distill method.alpha=1`: the "
            "loss then has no label part to smooth. Lower `method.alpha` below 1 or remove "
            "`label_smoothing` from `reg=`.",
        )
        self.teacher_path, self.temperature, self.alpha = str(teacher), float(temperature), alpha
        # The supervised means plus this method's two training loss parts.
        self.means = EpochMeans([*self.means.names, *(f"train/{p}" for p in LOSS_PARTS)])
        self.teacher: Teacher | None = None  # a plain object: never in state_dict or optimizer
        self.teacher_accuracy: dict[str, float] = {}  # measured when fitting starts
        self.transfer_set: TransferSet | None = None  # method.unlabelled: images, no labels
        self.unlabelled = unlabelled

    @property
    def method_name(self) -> str:
        return "distill"

    def setup(self, stage: str) -> None:
        """Load and check the teacher before fitting; the data is set up by now (classes,
        channels, normalization), the model not yet on its device."""
        if stage != "fit" or self.teacher is not None:
            return
        datamodule = self.trainer.datamodule
        inputs = student_inputs(datamodule)  # refuses data that is no image classification
        self.teacher = load_teacher(
            self.teacher_path,
            self.model.head.out_features,
            datamodule.in_channels,
            datamodule.settings,
            datamodule.listing,
        )
        self.teacher.adapt_to(*inputs)
        log.info("%s", self.teacher.describe())
        if self.unlabelled:
            self.transfer_set = TransferSet(datamodule)
            log.info("%s", self.transfer_set.describe())

    def on_fit_start(self) -> None:
        """The student is on its device now; the teacher follows it there and is measured on
        the student's validation images (`measure_teacher`)."""
        super().on_fit_start()
        assert self.teacher is not None, "setup('fit') loads the teacher"
        self.teacher.follow(self.model.head.weight)
        self.teacher_accuracy = self.measure_teacher()

    def measure_teacher(self) -> dict[str, float]:
        """`teacher/val_acc` (through the student's inputs) and `teacher/val_acc_own_input`,
        logged with each training epoch so they reach metrics.json; a loud warning when the
        student's inputs cost the teacher accuracy. Skipped without validation batches."""
        from posttrain.checks import batch_limit

        assert self.teacher is not None
        datamodule = self.trainer.datamodule
        batches = batch_limit(self.trainer.limit_val_batches, len(datamodule.val_dataloader()))
        if batches == 0:
            log.info("teacher not measured: `trainer.limit_val_batches=0` runs no validation")
            return {}
        device = self.model.head.weight.device
        with self.trainer.precision_plugin.val_step_context():  # as in training: autocast
            accuracy = accuracy_on_student_inputs(self.teacher, datamodule, batches, device)
        log.info(
            "teacher accuracy on the student's validation images: %.4f through the student's "
            "inputs, %.4f prepared its own way",
            accuracy["teacher/val_acc"],
            accuracy["teacher/val_acc_own_input"],
        )
        warning = adapter_warning(accuracy, self.teacher)
        if warning is not None:
            log.warning("%s", warning)
        return accuracy

    def extra_epoch_values(self, split: str) -> dict[str, Tensor]:
        """The teacher's measured accuracy (`measure_teacher`), with every training epoch."""
        values = super().extra_epoch_values(split)
        if split == "train":
            values.update({k: torch.tensor(v) for k, v in self.teacher_accuracy.items()})
        return values

    def step(self, batch: tuple[Tensor, Tensor], split: str) -> StepOutput:
        """Training: the distillation loss; validation/test: the supervised step."""
        if split != "train":
            return super().step(batch, split)
        assert self.teacher is not None, "fitting loads the teacher"
        labelled, logits = self.cross_entropy_step(batch, split)
        soft_loss = distillation_loss(logits, self.teacher.logits(batch[0]), self.temperature)
        if self.transfer_set is not None:
            images = self.transfer_set.draw(len(batch[0]), self.trainer, logits.device)
            extra = distillation_loss(self(images), self.teacher.logits(images), self.temperature)
            soft_loss = (len(batch[0]) * soft_loss + len(images) * extra) / (
                len(batch[0]) + len(images)
            )
        loss = self.alpha * soft_loss + (1 - self.alpha) * labelled.loss
        parts = {"distill_loss": soft_loss, "label_loss": labelled.loss}
        return StepOutput(loss, labelled.size, parts)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.transfer_set is not None:
            checkpoint[DRAWS_KEY] = self.transfer_set.draws.get_state()
        if self.teacher is not None:
            checkpoint[TEACHER_KEY] = {"file": self.teacher_path, "sha256": self.teacher.digest}

    def check_resume(self, checkpoint: dict[str, Any]) -> None:
        """Before a resume does any work (`checkpoints.check_resumed_method`): the teacher
        file holds the teacher the run started with, not a retrained one under its name."""
        check_same_teacher(checkpoint.get(TEACHER_KEY), self.teacher_path)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume draws the transfer-set images the uninterrupted run would have drawn (set-up,
        which builds the transfer set, runs before Lightning restores a checkpoint)."""
        super().on_load_checkpoint(checkpoint)
        if self.transfer_set is not None and DRAWS_KEY in checkpoint:
            self.transfer_set.draws.set_state(checkpoint[DRAWS_KEY])


class TransferSet:
    """The unlabelled training images of `method.unlabelled`, drawn a batch at a time.

    Inputs are made by the DataModule's `training_input`, as a labelled training batch is:
    resized, through the `reg=` transforms (augment, mixup, cutmix: teacher and student see the
    same views; the transforms' label output is dropped), then normalized.
    """

    def __init__(self, datamodule: Any) -> None:
        self.datamodule = datamodule
        self.images = (
            datamodule.unlabelled_images() if hasattr(datamodule, "unlabelled_images") else None
        )
        require(
            self.images is not None and len(self.images) > 0,
            "`method.unlabelled=true` distills on the training images `data.samples_per_class` "
            "leaves out, and this run leaves none out: set `data.samples_per_class` (e.g. 10, "
            "the labelled images per class) on image-classification data, or set "
            "`method.unlabelled=false`.",
        )
        # Its own generator, seeded from the run's seed without drawing from the global
        # generator: the labelled batches stay those of the same seed trained alone.
        self.draws = torch.Generator().manual_seed((torch.initial_seed() * 1_000_003 + 1) % 2**63)

    def describe(self) -> str:
        return f"transfer set: {len(self.images)} unlabelled training images"

    def draw(self, count: int, trainer: Any, device: torch.device) -> Tensor:
        """`count` images drawn with replacement, model-ready on `device`. Every process
        draws the same indices and keeps its own share, so under DDP ranks see different
        images and the generator stays the same on all of them (one state to checkpoint)."""
        world, rank = trainer.world_size, trainer.global_rank
        indices = torch.randint(len(self.images), (count * world,), generator=self.draws)
        mine = indices[rank * count : (rank + 1) * count]
        images = self.images[mine].to(device)
        no_labels = torch.zeros(len(images), dtype=torch.long, device=device)
        return self.datamodule.training_input(images, no_labels)[0]


def student_inputs(datamodule: Any) -> tuple[tuple[Tensor, Tensor], tuple[int, int]]:
    """The student's input normalization and the data's native image size (what a teacher
    trained with `data.image_size=null` saw), from the DataModule after its set-up."""
    state = datamodule.state_dict()
    require(
        "mean" in state and getattr(datamodule, "splits", None),
        "`method=distill` needs image-classification data (`data=digits`, `cifar10`, "
        "`imagefolder`, ...): the teacher sees the student's images.",
    )
    height, width = datamodule.splits["train"].images.shape[-2:]
    return (torch.tensor(state["mean"]), torch.tensor(state["std"])), (int(height), int(width))


__all__ = ["Distillation", "distillation_loss"]
