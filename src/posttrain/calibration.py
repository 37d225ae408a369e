"""Post-hoc calibration: temperature scaling (Guo et al. 2017), after the test.

One scalar T > 0 divides the logits; it is fitted on the *validation* split by LBFGS on the
negative log-likelihood (optimizing log T keeps T positive) and applied to the test logits.
Dividing by a positive scalar keeps every argmax, so accuracy cannot move; only the
confidence does. The logits are those the test used: the tested weights (`best.ckpt`), the
trainer's precision, and the test-time augmentation of `eval.py tta=` when one is on — so
with TTA, T is fitted on augmented validation logits, the same kind it is applied to.

`python train.py calibration=temperature` / `python eval.py ckpt_path=... calibration=...`
add to metrics.json: `test/nll` and `test/ece` (the logged one) before, `test/nll_calibrated`,
`test/ece_calibrated`, `test/acc_calibrated` after, `test/temperature`, and
`test/calibration_seconds` (collecting the logits and fitting T).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.classification import MulticlassCalibrationError

from posttrain.checks import batch_limit
from posttrain.errors import require, require_count

log = logging.getLogger("posttrain")

# The bins of the logged `{split}/ece` (`posttrain.methods.metrics.classification_metrics`);
# a test keeps the two equal, so "before" here is the logged `test/ece`.
ECE_BINS = 15


@dataclass(frozen=True)
class Predictions:
    """Logits (N, classes) and integer targets (N) of one split."""

    logits: Tensor
    targets: Tensor


def expected_calibration_error(logits: Tensor, targets: Tensor) -> float:
    """The logged `{split}/ece`: top-label ECE of the softmax, 15 equal-width bins."""
    metric = MulticlassCalibrationError(logits.shape[-1], n_bins=ECE_BINS)
    return float(metric(logits.float().softmax(dim=-1), targets))


def negative_log_likelihood(logits: Tensor, targets: Tensor) -> float:
    return float(F.cross_entropy(logits.float(), targets))


def why_no_temperature_fits(logits: Tensor, targets: Tensor) -> str | None:
    """Why the validation NLL has no minimum at a finite T > 0, or None when it has one.

    The NLL is convex in 1/T. When every image is classified correctly it keeps falling as
    T -> 0 (LBFGS returned T ~ 0.003, which made every test mistake cost ~100 nats). When the
    true class's logit is on average no higher than the mean logit, it falls as T -> infinity
    (LBFGS stopped at T ~ 2e7, an arbitrary number recorded as the fit).
    """
    count = len(targets)
    if bool((logits.argmax(dim=-1) == targets).all()):
        return (
            f"all {count} validation images are classified correctly (a larger validation "
            "split, `data.val_fraction`, gives it mistakes to fit on)"
        )
    true_logit = logits.gather(1, targets[:, None]).squeeze(1)
    if float((true_logit - logits.mean(dim=-1)).mean()) <= 0:
        return (
            f"on the {count} validation images the true class scores on average no higher "
            "than the mean class (predictions no better than chance; the best fit is "
            "T -> infinity, every class equally likely)"
        )
    return None


class TemperatureScaling:
    """`calibration=temperature`: one temperature for all classes, fitted on validation."""

    def __init__(self, max_iter: int = 100) -> None:
        require_count("calibration.max_iter", max_iter, 1)
        self.max_iter = max_iter

    def fit(self, logits: Tensor, targets: Tensor) -> float:
        """The T minimizing the NLL of `logits / T` (LBFGS on log T, from T = 1), or T = 1
        with a warning where no finite T > 0 minimizes it (`why_no_temperature_fits`)."""
        logits, targets = logits.detach().float(), targets.detach()
        reason = why_no_temperature_fits(logits, targets)
        if reason is not None:
            log.warning(
                "temperature scaling: %s, so no temperature minimizes their NLL; T = 1 kept "
                "(test logits unchanged).",
                reason,
            )
            return 1.0
        log_t = torch.zeros((), device=logits.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [log_t], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits / log_t.exp(), targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        return float(log_t.detach().exp())

    def report(self, val: Predictions, test: Predictions) -> dict[str, float]:
        """Test NLL/ECE before and after scaling by the T fitted on `val`; argmax unchanged."""
        temperature = self.fit(val.logits, val.targets)
        scaled = test.logits.float() / temperature
        predicted = test.logits.argmax(dim=-1)
        if not torch.equal(scaled.argmax(dim=-1), predicted):  # a bug, never the user's input
            raise RuntimeError("temperature scaling changed a prediction")
        return {
            "test/temperature": temperature,
            "test/nll": negative_log_likelihood(test.logits, test.targets),
            "test/nll_calibrated": negative_log_likelihood(scaled, test.targets),
            "test/ece_calibrated": expected_calibration_error(scaled, test.targets),
            "test/acc_calibrated": float((scaled.argmax(dim=-1) == test.targets).float().mean()),
        }


def calibration_for(cfg: Any, method: L.LightningModule) -> TemperatureScaling | None:
    """The selected `calibration=` option (None for `calibration=none`), refused in one
    paragraph, before any work, where it cannot apply."""
    from posttrain.runs import instantiate_checked

    config = cfg.get("calibration")
    if not config or "_target_" not in config:
        return None
    check_calibrated_method(method)
    return instantiate_checked(config, "calibration")


def splits_needed(calibration: TemperatureScaling | None) -> dict[str, str]:
    """The splits calibration reads, each with why (for `checks.RefuseEmptySplits`, which
    refuses at set-up, before training, a `trainer.limit_*_batches` that leaves one empty)."""
    if calibration is None:
        return {}
    return {
        "val": "`calibration=temperature` fits its temperature on it (or use `calibration=none`)",
        "test": "`calibration=temperature` reports on it (or use `calibration=none`)",
    }


def check_calibrated_method(method: L.LightningModule) -> None:
    """Temperature scaling rescales the class logits of each image, and its "before" is the
    `test/ece` the method logs: supervised, fine-tuned and distilled classifiers have both.
    Multi-task runs predict one vector per task head and log no ECE (each head would need its
    own T); MAML and ProtoNet predict episode-relative classes from each episode's support
    set."""
    from posttrain.methods.supervised import SupervisedClassifier

    name = getattr(method, "method_name", type(method).__name__)
    require(
        isinstance(method, SupervisedClassifier),
        f"`calibration=temperature` cannot be used with `method={name}`: temperature scaling "
        "fits one temperature to one vector of class logits per image, which supervised and "
        "fine-tuned and distilled classifiers (`method=supervised`, `finetune`, `distill`) "
        "predict; multi-task "
        "runs predict one vector per task head, and MAML/ProtoNet predict classes that mean "
        "something else in every episode. Use `calibration=none` with this method.",
    )


def predictions(
    trainer: L.Trainer, method: L.LightningModule, loader: Iterable[Any], batches: int
) -> Predictions:
    """The method's logits on the first `batches` batches of `loader`, as its test step
    makes them: the datamodule's device-side transforms, eval mode, the trainer's precision."""
    datamodule = trainer.datamodule
    device = trainer.strategy.root_device
    method.to(device).eval()
    logits, targets = [], []
    with torch.no_grad(), trainer.precision_plugin.test_step_context():
        for images, labels in itertools.islice(loader, batches):
            images, labels = datamodule.on_after_batch_transfer(
                (images.to(device), labels.to(device)), 0
            )
            logits.append(method(images).float())
            targets.append(labels)
    return Predictions(torch.cat(logits), torch.cat(targets))


def gathered(trainer: L.Trainer, local: Predictions) -> Predictions:
    """Every process's predictions, concatenated (as they are outside DDP): each process
    predicts its own share of a split, the share its test scored."""
    if trainer.world_size <= 1:
        return local
    from torchmetrics.utilities.distributed import gather_all_tensors  # uneven shares too

    return Predictions(
        torch.cat(gather_all_tensors(local.logits)), torch.cat(gather_all_tensors(local.targets))
    )


def calibrate_after_test(
    calibration: TemperatureScaling | None, trainer: L.Trainer, method: L.LightningModule
) -> dict[str, float]:
    """The calibration metrics of the weights the test just used (empty without one).

    Under DDP every process predicts its own (unpadded) share of validation and test, with
    the batch limits Lightning applied to that share, and the shares are gathered: the
    calibration sees exactly the images the test scored. (Rank 0 alone over the whole
    loaders scored other images than the padded test did: 0.1504 against 0.1528.)
    """
    if calibration is None:
        return {}
    started = time.perf_counter()
    datamodule = trainer.datamodule
    val_loader, test_loader = datamodule.val_dataloader(), datamodule.test_dataloader()
    val_batches = batch_limit(trainer.limit_val_batches, len(val_loader))
    test_batches = batch_limit(trainer.limit_test_batches, len(test_loader))
    val = gathered(trainer, predictions(trainer, method, val_loader, val_batches))
    test = gathered(trainer, predictions(trainer, method, test_loader, test_batches))
    if not trainer.is_global_zero:
        return {}
    report = calibration.report(val, test)
    return {**report, "test/calibration_seconds": time.perf_counter() - started}
