"""Classification metrics shared by every method: one torchmetrics collection per split."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassCalibrationError,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

from posttrain.errors import is_number

SPLITS = ("train", "val", "test")

# Every name a run logs, documented once (README "Metrics" renders this list; a test keeps
# the two equal and checks that every method logs only these). `{split}` is train, val or
# test; `{task}` a multi-task target name.
METRICS: dict[str, str] = {
    "train/loss_step": "the method's training loss on each logging step (penalty excluded)",
    "{split}/loss": "epoch mean of the method's loss (training: penalty excluded)",
    "train/penalty": "epoch mean of the regularizers' penalty (l1, l2, l2sp)",
    "train/distill_loss": "epoch mean of distillation's soft part: T^2 times the KL divergence "
    "of the student's softened predictions from the teacher's, over the labelled batch and, "
    "with `method.unlabelled=true`, the transfer-set batch (distill; weighed by `method.alpha`)",
    "train/label_loss": "epoch mean of distillation's hard part, the student's cross-entropy on "
    "the labels (distill; weighed by 1 - `method.alpha`)",
    "teacher/val_acc": "the distillation teacher's accuracy on the student's validation images "
    "as the student's batches reach it (resized to the teacher's size, renormalized), measured "
    "once when fitting starts (distill)",
    "teacher/val_acc_own_input": "the same teacher on the same images prepared its own way (its "
    "`data.image_size`, its statistics); a gap of more than 2 points is a warning (distill)",
    "{split}/acc": "top-1 accuracy (episodic methods: mean query accuracy per episode)",
    "{split}/f1_macro": "macro-averaged F1 (supervised, finetune, distill)",
    "{split}/ece": "expected calibration error, 15 bins (supervised, finetune, distill)",
    "val/acc_best": "best `val/acc` so far: the default sweep objective",
    "val/acc_gap": "train minus validation accuracy of the same epoch, the over-fitting signal "
    "(logged in epochs that validate, and only where both measure the same task: episodic "
    "runs need equal ways and adaptation steps)",
    "{split}/acc_ci95": "half-width of the 95% interval of the episode mean (val, test; "
    "from 2 episodes on)",
    "{split}/episodes": "number of episodes behind `{split}/acc` (val, test; episodic methods)",
    "{split}/images": "number of images behind `{split}/acc` (val, test; supervised, finetune, "
    "distill, multitask): fewer than the split holds under `trainer.limit_{split}_batches`",
    "{split}/{task}/acc": "accuracy of one multi-task target",
    "{split}/{task}/loss": "epoch mean of one multi-task target's loss over the images that "
    "have the target (absent ones excluded)",
    "train/{task}/weight": "current loss weight of one multi-task target",
    "lr-{optimizer}": "learning rate per parameter group (LearningRateMonitor)",
    "epoch": "epochs completed (metrics.json)",
    "global_step": "optimizer steps completed (metrics.json)",
    "test/temperature": "temperature T fitted on the validation logits (`calibration=temperature`"
    "; exactly 1 when no validation image is misclassified or the validation predictions are "
    "no better than chance: no T minimizes the NLL then)",
    "test/nll": "test negative log-likelihood before calibration (`calibration=temperature`)",
    "test/nll_calibrated": "test negative log-likelihood of the logits divided by T",
    "test/ece_calibrated": "`test/ece` of the logits divided by T (before: `test/ece`)",
    "test/acc_calibrated": "top-1 accuracy of the logits divided by T (equals `test/acc`)",
    "test/calibration_seconds": "wall time of calibration: val/test logits and fitting T",
    "test/tta_views": "views each test logit is averaged over (`eval.py tta=`: none 1, "
    "flip 2, shift 5)",
}


def documented_metric(name: str) -> bool:
    """Whether `name` is one of `METRICS` (placeholders match one path segment or more)."""
    for pattern in METRICS:
        regex = re.escape(pattern).replace(r"\{split\}", "(train|val|test)")
        regex = regex.replace(r"\{task\}", "[^/]+").replace(r"\{optimizer\}", ".+")
        if re.fullmatch(regex, name):
            return True
    return False


# Which way each metric improves, for the `mode` of whatever monitors it.
IMPROVES = {"acc": "max", "acc_best": "max", "f1_macro": "max", "loss": "min", "ece": "min",
            "acc_gap": "min", "acc_ci95": "min", "penalty": "min"}  # fmt: skip


def check_monitor(prefix: str, monitor: object, mode: object) -> None:
    """`<prefix>.monitor` (checkpointing, early stopping) is an epoch metric of training or
    validation, watched the way it improves. A typo was a traceback after the first epoch;
    `monitor=val/loss` with `mode=max` kept the worst checkpoint as `best.ckpt` and stopped
    training while the loss still fell."""
    from posttrain.errors import require, require_choice

    key = f"{prefix}.monitor"
    require(
        isinstance(monitor, str)
        and monitor.startswith(("train/", "val/"))
        and not monitor.endswith("_step")
        and documented_metric(monitor),
        f"Config key `{key}` is {monitor!r}, which is not an epoch metric of training or "
        f"validation: use one such as `val/acc` (with `{prefix}.mode=max`) or `val/loss` (with "
        f"`{prefix}.mode=min`); README 'Metrics' lists them.",
    )
    require_choice(f"{prefix}.mode", mode, ("min", "max"))
    improves = IMPROVES.get(str(monitor).rsplit("/", 1)[-1])
    require(
        improves in (None, mode),
        f"Config key `{prefix}.mode={mode}` does not fit `{key}={monitor}`, which improves as "
        f"it {'rises' if improves == 'max' else 'falls'}: the run would keep and act on its "
        f"worst epochs. Set `{prefix}.mode={improves}`.",
    )


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Top-1 accuracy, macro-F1 and expected calibration error, named `<split>/<metric>`."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "f1_macro": MulticlassF1Score(num_classes, average="macro"),
            "ece": MulticlassCalibrationError(num_classes, n_bins=15),
        },
        prefix=prefix,
    )


class ImageCounts(nn.Module):
    """How many images `val/*` and `test/*` cover (`{split}/images`), summed over DDP ranks:
    `trainer.limit_val_batches=0.5` scores 64 of the 143 validation images, and only the
    record can say so (the start statement gives the split's size)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_split = nn.ModuleDict({split: SumMetric() for split in ("val", "test")})

    def update(self, split: str, count: int) -> None:
        if split in self.by_split:
            self.by_split[split].update(count)

    def compute_and_reset(self, split: str) -> dict[str, Tensor]:
        if split not in self.by_split:
            return {}
        metric = self.by_split[split]
        count = metric.compute().float()  # every rank: it reduces
        metric.reset()
        return {f"{split}/images": count}


class SplitMetrics(nn.Module):
    """Metric collections for train/val/test plus the test confusion matrix."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.by_split = nn.ModuleDict(
            # `train` would clash with nn.Module.train, hence the suffix.
            {
                f"{split}_metrics": classification_metrics(num_classes, f"{split}/")
                for split in SPLITS
            }
        )
        self.confusion = MulticlassConfusionMatrix(num_classes)
        self.images = ImageCounts()

    def update(self, split: str, logits: Tensor, targets: Tensor) -> None:
        probabilities = logits.detach().float().softmax(dim=-1)
        self.by_split[f"{split}_metrics"].update(probabilities, targets)
        self.images.update(split, len(targets))
        if split == "test":
            self.confusion.update(probabilities, targets)

    def compute_and_reset(self, split: str) -> dict[str, Tensor]:
        collection = self.by_split[f"{split}_metrics"]
        values = collection.compute()
        collection.reset()
        return {**values, **self.images.compute_and_reset(split)}


def confusion_figure(matrix: Tensor, class_names: list[str] | None = None) -> Any:
    """A matplotlib figure of a row-normalized confusion matrix, counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.cpu()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    size = len(counts)
    names = class_names if class_names and len(class_names) == size else list(map(str, range(size)))
    figure, axes = plt.subplots(figsize=(2 + 0.5 * size, 2 + 0.5 * size))
    axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if size <= 30:
        for row in range(size):
            for col in range(size):
                color = "white" if rates[row, col] > 0.5 else "black"
                value = int(counts[row, col])
                axes.text(col, row, value, ha="center", va="center", fontsize=7, color=color)
        axes.set_xticks(range(size), names, rotation=90, fontsize=7)
        axes.set_yticks(range(size), names, fontsize=7)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.tight_layout()
    return figure


def to_floats(values: dict[str, Any]) -> dict[str, float]:
    """Plain floats of scalar tensors/numbers, for metrics.json and TensorBoard hparams."""
    out = {}
    for key, value in values.items():
        if isinstance(value, Tensor) and value.numel() == 1:
            out[key] = float(value.item())
        elif is_number(value):
            out[key] = float(value)
    return out


__all__ = [
    "METRICS",
    "SplitMetrics",
    "check_monitor",
    "classification_metrics",
    "confusion_figure",
    "documented_metric",
    "to_floats",
]


class ValidationTracker(nn.Module):
    """`val/acc_best` (the default sweep objective) and `val/acc_gap` (train minus val
    accuracy, the over-fitting signal), kept the same way by every method."""

    def __init__(self) -> None:
        super().__init__()
        self.best = MaxMetric()
        self.best.persistent(True)  # in checkpoints: a resumed run keeps its best so far
        self.last_val_acc: float | None = None
        self.last_val_epoch: int | None = None

    def after_validation(self, val_acc: Tensor, epoch: int) -> dict[str, Tensor]:
        self.best.update(val_acc)
        self.last_val_acc, self.last_val_epoch = float(val_acc), epoch
        return {"val/acc_best": self.best.compute()}

    def gap(self, train_acc: Tensor, epoch: int) -> dict[str, Tensor]:
        """Only in an epoch that validated: with `trainer.check_val_every_n_epoch=2` the
        other epochs subtracted the previous epoch's `val/acc` from this epoch's `train/acc`,
        and the run's final `val/acc_gap` mixed two epochs."""
        if self.last_val_acc is None or self.last_val_epoch != epoch:
            return {}
        return {"val/acc_gap": train_acc - self.last_val_acc}


def log_step_loss(module: Any, loss: Tensor) -> None:
    """`train/loss_step`, on the steps whose logs the Trainer writes (`log_every_n_steps`).

    Each `self.log` call costs a fraction of a millisecond of bookkeeping (a few % of a
    small model's step); on the other steps Lightning would drop the value anyway.
    """
    connector = getattr(module.trainer, "_logger_connector", None)
    if connector is None or connector.should_update_logs:
        module.log("train/loss_step", loss)


class DivergenceGuard:
    """Stops a run whose training loss became NaN/inf, or grew far above where it started
    (`GROWTH` x the first step's loss, at least `GROWTH` above it: a finite blow-up, e.g.
    `optimizer.lr=1e6`, that would otherwise end "completed" with a loss of 1e13).

    Steps only accumulate a flag on the loss's device; reading it (a device sync) happens
    once per epoch, so GPU steps are never stalled by the check.
    """

    GROWTH = 10.0

    def __init__(self) -> None:
        self.nonfinite: Tensor | None = None
        self.start: Tensor | None = None  # the first step's loss: the reference

    def observe(self, loss: Tensor, total: Tensor | None = None) -> None:
        """`loss`: the method's loss, what `train/loss` averages (the epoch check compares it
        with the first step's); `total`: with the penalty, what backpropagates, whose NaN/inf
        stops the run too. A reference with the penalty (1e8 under `reg.l2.weight=1e6`)
        hid a blow-up of the loss itself below its limit. A NaN/inf of `loss` is one of the
        total too (the penalty is finite or itself NaN/inf), so the total alone is checked."""
        bad = ~torch.isfinite((loss if total is None else total).detach())
        self.nonfinite = bad if self.nonfinite is None else self.nonfinite | bad
        if self.start is None:
            self.start = loss.detach().clone()

    def limit(self) -> float | None:
        """The epoch loss above which the run counts as diverged."""
        if self.start is None or not bool(torch.isfinite(self.start)):
            return None
        start = float(self.start)
        return start + self.GROWTH * max(abs(start), 1.0)

    def check(self, epoch: int, epoch_loss: Tensor | None = None) -> None:
        from posttrain.errors import RunDiverged

        nonfinite, self.nonfinite = self.nonfinite, None
        advice = (
            "Lower `optimizer.lr` or the regularization strengths (`reg.*`); checkpoints of "
            "earlier epochs are kept in the run folder."
        )
        if nonfinite is not None and bool(nonfinite):
            raise RunDiverged(
                f"Training diverged: the loss became NaN/inf in epoch {epoch}. {advice}"
            )
        limit = self.limit()
        if epoch_loss is not None and limit is not None and float(epoch_loss) > limit:
            raise RunDiverged(
                f"Training diverged: the mean training loss of epoch {epoch} is "
                f"{float(epoch_loss):.4g}, more than {self.GROWTH:g}x above the first step's "
                f"{float(self.start):.4g}. {advice}"
            )

    def state(self) -> dict[str, Any]:
        return {"start": None if self.start is None else float(self.start)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.start = None if state["start"] is None else torch.tensor(state["start"])


class EpochMeans(nn.Module):
    """Epoch means of plain values (losses, penalties), reduced across ranks here.

    Methods compute these in their epoch-end hooks, so every rank runs the same collectives
    in the same order. (Lightning's lazy `sync_dist` reduction of `self.log` values runs
    inside the progress bar, which exists on rank 0 only, and deadlocked DDP next to
    torchmetrics' own synchronization.)
    """

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.names = list(names)
        self.means = nn.ModuleDict({self.key(n): MeanMetric() for n in self.names})

    @staticmethod
    def key(name: str) -> str:
        return name.replace("/", "__").replace(".", "_")

    def update(self, name: str, value: Tensor, weight: int | Tensor = 1) -> None:
        self.means[self.key(name)].update(value.detach().float(), weight)

    def compute_and_reset(self, prefix: str) -> dict[str, Tensor]:
        values = {}
        for name in self.names:
            metric = self.means[self.key(name)]
            if not name.startswith(prefix) or metric.update_count == 0:
                continue
            value = metric.compute()  # on every rank: it reduces across them
            # 0/0: every update averaged over nothing (a task whose targets were all absent
            # this epoch, on every rank); no mean exists, so none is logged.
            if not (bool(torch.isnan(value)) and float(metric.weight) == 0):
                values[name] = value
            metric.reset()
        return values
