"""Weight averaging during training: `reg=ema` and `reg=swa`.

Both are Lightning `WeightAveraging` callbacks, and torch's `AveragedModel` does the
averaging (EMA: `get_ema_avg_fn`; SWA: its default equal average), parameters and buffers
alike: BatchNorm statistics are averaged with the weights (Lightning's `use_buffers=True`),
not re-estimated by a pass over the data as in the SWA paper's `update_bn`.

Why `WeightAveraging` and not Lightning's `StochasticWeightAveraging`: the latter copies the
average into the model only when training ends, so every validation (`val/acc`,
`val/acc_best`, the choice of `best.ckpt`) and every checkpoint would be of the raw weights,
and the test of `best.ckpt` would never see the average. `WeightAveraging` swaps the average
in for each validation epoch and writes it as the checkpoint's `state_dict` (the raw weights
ride along as `current_model_state`, and `AveragedModel`'s count as `averaging_state`, so a
resumed run continues both exactly). `AveragedEverywhere` adds what posttrain needs on top:
the test of `best.ckpt` keeps the averaged weights, and before the first average exists
(SWA before `start_epoch`) the raw weights are validated and saved, not the initial ones.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from posttrain.errors import is_number, require

log = logging.getLogger("posttrain")

# SWA's default start, as a fraction of `trainer.max_epochs` (Izmailov et al. 2018 average
# over the last quarter of the budget).
SWA_DEFAULT_START = 0.75
# The share of the first step's weights an EMA may still hold when training ends.
STALE_SHARE = 0.01
# What a checkpoint's `state_dict` holds (the average, or the raw weights before one exists),
# in words: the test of that checkpoint says it in metrics.json's `tested`.
WEIGHTS_KEY = "posttrain_weights"


class AveragedEverywhere(WeightAveraging):
    """Validation, checkpoints and the test use the average once one exists.

    Lightning's hooks assume an average from the first step. Until the first update the
    average is a copy of the initial weights, so validating or saving it would score (and
    keep as `best.ckpt`) an untrained model: the raw weights stand in until then.
    """

    _swapped = False
    _tested: str | None = None  # what the tested checkpoint said it holds ("": it says not)
    option = "reg=averaging"
    unit = "update"  # what `n_averaged` counts

    @property
    def averaging(self) -> bool:
        """True once at least one set of weights went into the average."""
        average = self._average_model
        return average is not None and int(average.n_averaged) > 0

    def not_yet(self) -> str:
        """Why nothing is averaged yet."""
        return "no optimizer step had been taken"

    def weights_in_model(self) -> str:
        """What the model (and a checkpoint saved now) holds: the average or the raw weights."""
        if self.averaging:
            count = int(self._average_model.n_averaged)  # type: ignore[union-attr]
            units = self.unit if count == 1 else f"{self.unit}s"
            return f"the {self.option} average of the weights, over {count} {units}"
        return f"the raw weights: {self.option} had averaged nothing ({self.not_yet()})"

    def tested_weights(self) -> str | None:
        """For metrics.json's `tested`: what the tested checkpoint held (SWA's `best.ckpt`
        may be of an epoch before `start_epoch`; early stopping may end training before
        any average), or the model's own weights when the test loaded no checkpoint."""
        if self._tested is not None:
            return self._tested or None
        return self.weights_in_model()

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, WeightAveraging) and c is not self]
        require(
            not others,
            "`reg=[ema,swa]`: only one weight average can be validated and checkpointed, and "
            "both `ema` and `swa` would swap their own into the model. Choose one: `reg=ema` "
            "or `reg=swa` (other regularizers combine with either).",
        )
        super().setup(trainer, pl_module, stage)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._swapped = self.averaging
        if self._swapped:
            super().on_validation_epoch_start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._swapped:
            super().on_validation_epoch_end(trainer, pl_module)
        self._swapped = False

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """The averaged parameters and buffers; every other entry (`val/acc_best`'s tracker,
        extra states) is the run's current one, not the copy made when averaging began."""
        checkpoint[WEIGHTS_KEY] = self.weights_in_model()
        if not self.averaging:
            return
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        averaged = {name for name, _ in pl_module.named_parameters()}
        averaged |= {name for name, _ in pl_module.named_buffers()}
        current = checkpoint["current_model_state"]
        checkpoint["state_dict"].update({k: v for k, v in current.items() if k not in averaged})

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Resuming training restores raw and averaged weights; testing or evaluating a
        checkpoint keeps its `state_dict`, the averaged weights (Lightning would load the
        raw ones into the model whenever an average exists), and remembers what they are
        for `tested_weights`."""
        if trainer.state.fn != TrainerFn.FITTING:
            self._tested = str(checkpoint.get(WEIGHTS_KEY, ""))  # what the test scores
            return
        if self._average_model is None:
            return
        if "current_model_state" in checkpoint:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.averaging:
            super().on_train_end(trainer, pl_module)
        else:
            log.warning("weight averaging: training ended before any weights were averaged")


class EMACallback(AveragedEverywhere, EMAWeightAveraging):
    """Lightning's EMA, updated after every optimizer step from the first one.

    torch's EMA has no bias correction: its first update copies the weights after the first
    step, and after `t` steps the average still holds `decay**(t-1)` of them (0.99 over a
    200-step run: 14%, which scored 26% instead of 95% on `digits_lowdata`), so a decay too
    slow for the run's length is said at the start.
    """

    option, unit = "reg=ema", "optimizer step"

    def __init__(self, decay: float) -> None:
        super().__init__(decay=decay)
        self.decay = decay

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        steps = trainer.estimated_stepping_batches
        left = first_step_share(self.decay, steps) if steps != float("inf") else 0.0
        if left > STALE_SHARE:
            advice = (
                f"lower `reg.ema.decay` (below {STALE_SHARE ** (1 / (steps - 1)):.3g}) so it "
                "forgets the start"
                if steps > 1
                else "one step has nothing to average: train longer or leave out `reg=ema`"
            )
            log.warning(
                "reg.ema.decay=%g: after this run's %d optimizer steps the average still holds "
                "%.0f%% of the first step's weights; %s",
                self.decay,
                steps,
                100 * left,
                advice,
            )


def first_step_share(decay: float, steps: int) -> float:
    """The share of the first step's weights in the EMA after `steps` optimizer steps: the
    first update copies them, each of the `steps - 1` later ones keeps `decay` of the average
    (`decay**steps` overstated how fast it forgets: 28% where 31% was left)."""
    return decay ** max(steps - 1, 0)


class SWACallback(AveragedEverywhere):
    """Equal average of the weights at the end of every epoch from `start_epoch` on.

    The update is made after the epoch's last optimizer step, not in `on_train_epoch_end`:
    Lightning validates (and then checkpoints) before that hook, so an epoch-end update
    would be validated an epoch late while the checkpoint already held the newer average.
    """

    option, unit = "reg=swa", "epoch end"

    def __init__(self, start_epoch: int | None) -> None:
        super().__init__()  # no avg_fn: AveragedModel's equal (SWA) average
        self.configured_start = start_epoch
        self.start_epoch = start_epoch
        self._epoch_closing = False

    def not_yet(self) -> str:
        return (
            f"it averages from the end of epoch {self.start_epoch} on, `reg.swa.start_epoch` "
            "numbered from 0"
        )

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # Null under `max_epochs=-1` is 75% of the epochs `max_steps` allows: on_train_start.
        steps_decide = trainer.max_steps != -1 and not (trainer.max_epochs or 0) > 0
        if stage == TrainerFn.FITTING and not (self.configured_start is None and steps_decide):
            self.start_epoch = resolved_start_epoch(self.configured_start, trainer.max_epochs)
        super().setup(trainer, pl_module, stage)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """`trainer.max_steps` may end training epochs before `max_epochs`: `reg=swa
        trainer.max_steps=6` started at 75% of 30 epochs, averaged nothing and completed
        with the raw weights (a warning at the end). The start is checked against the epochs
        the run trains, and null means 75% of those."""
        if trainer.max_steps == -1:
            return
        from posttrain.methods.optim import schedule_lengths

        total, per_epoch = schedule_lengths(trainer)
        epochs = int(total // per_epoch)  # complete ones: SWA averages at an epoch's end
        if self.configured_start is None:
            self.start_epoch = int(SWA_DEFAULT_START * epochs)
        require(
            self.start_epoch < epochs,
            f"Config key `reg.swa.start_epoch` is {self.start_epoch}, but "
            f"`trainer.max_steps={trainer.max_steps}` ends training after {epochs} complete "
            f"epoch(s) of {per_epoch} optimizer steps (numbered from 0), so nothing would be "
            f"averaged. Use an epoch below {epochs}, or null for 75% of the epochs it trains.",
        )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        last_batch = batch_idx + 1 >= trainer.num_training_batches
        self._epoch_closing = last_batch and trainer.current_epoch >= self.start_epoch
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and self._epoch_closing


def resolved_start_epoch(start_epoch: int | None, max_epochs: int | None) -> int:
    """`reg.swa.start_epoch`, or 75% of `trainer.max_epochs` when null; refused unless some
    epoch from it on is trained (`max_epochs` -1/None: unbounded)."""
    limit = max_epochs if max_epochs is not None and max_epochs > 0 else None
    if start_epoch is None:
        require(
            limit is not None,
            "Config key `reg.swa.start_epoch` is null, which means 75% of "
            f"`trainer.max_epochs`, but `trainer.max_epochs` is {max_epochs!r}. Set "
            "`trainer.max_epochs` to a positive number or `reg.swa.start_epoch` to an epoch.",
        )
        return int(SWA_DEFAULT_START * limit)
    require(
        limit is None or start_epoch < limit,
        f"Config key `reg.swa.start_epoch` is {start_epoch}, but training stops after "
        f"`trainer.max_epochs={limit}` epochs (numbered from 0), so nothing would be averaged. "
        "Use an epoch below `trainer.max_epochs`, or null for 75% of it.",
    )
    return start_epoch


def is_epoch_number(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class EMA:
    """Exponential moving average of the weights (and BatchNorm statistics), updated every
    optimizer step: `avg = decay * avg + (1 - decay) * weights`."""

    key = "ema"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def __init__(self, decay: float = 0.95) -> None:
        require(
            is_number(decay) and 0 < decay < 1,
            f"Config key `reg.ema.decay` must be a number in (0, 1), got {decay!r} "
            "(0.95 averages over about the last 20 optimizer steps, 0.99 over 100).",
        )
        self.decay = float(decay)

    def callbacks(self) -> list[Any]:
        return [EMACallback(self.decay)]

    def describe(self) -> str:
        return (
            f"EMA of the weights, decay {self.decay:g} per step (validated, checkpointed and "
            "tested)"
        )


class SWA:
    """Stochastic weight averaging: the equal average of the weights at the end of each
    epoch from `start_epoch` on, on the run's own learning-rate schedule."""

    key = "swa"
    needs: ClassVar[frozenset[str]] = frozenset({"weights"})

    def __init__(self, start_epoch: int | None = None) -> None:
        require(
            start_epoch is None or is_epoch_number(start_epoch),
            f"Config key `reg.swa.start_epoch` must be an epoch number >= 0 (or null for 75% "
            f"of `trainer.max_epochs`), got {start_epoch!r}.",
        )
        self.start_epoch = start_epoch

    def callbacks(self) -> list[Any]:
        return [SWACallback(self.start_epoch)]

    def describe(self) -> str:
        start = (
            "75% of the epochs trained" if self.start_epoch is None else f"epoch {self.start_epoch}"
        )
        return (
            f"SWA: equal average of the epoch-end weights from {start} on (validated, "
            "checkpointed and tested)"
        )
