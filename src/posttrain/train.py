"""The one training entry point: compose -> seed -> instantiate -> fit -> test -> record.

Generic on purpose: it knows no concrete data, model or method; those sit behind `_target_`
in `conf/`. Heavy imports happen inside the task so `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from posttrain.run_names import refuse_unwritable_output, register_resolvers

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
register_resolvers()  # before Hydra composes: the run folder's name uses `${run_id:}`


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, test the best checkpoint, write metrics.json; returns the flat metrics."""
    import lightning as L

    from posttrain.calibration import calibrate_after_test, calibration_for, splits_needed
    from posttrain.checkpoints import (
        CONFIG_KEY,
        RandomStateInCheckpoint,
        check_resumable,
        check_resumed_method,
        check_training_state,
        load_checkpoint,
        resume_path,
    )
    from posttrain.checks import (
        RefuseEmptySplits,
        RefuseInputsTheModelCannotTake,
        check_run_config,
        check_train_keys,
    )
    from posttrain.ddp_jobs import remember_job_for_ddp_children
    from posttrain.interrupts import (
        CompletedEpochs,
        RunInterrupted,
        ValidateWhenStoppingMidEpoch,
        stop_on_signals,
    )
    from posttrain.loggers import TrimLogsToRestoredStep
    from posttrain.methods.finetune import check_gradual_keys
    from posttrain.regularizers.penalties import check_l2sp_start
    from posttrain.resume import refuse_unresumable_changes
    from posttrain.runs import (
        ConfigInCheckpoint,
        build_components,
        build_trainer,
        check_folder_is_free,
        is_multirun,
        record_run,
        record_start,
        resolved_config,
    )
    from posttrain.sweep_jobs import completed_sweep_job, keep_job_record, unfinished_sweep_job

    # Before any check that could record a failure: a re-run sweep keeps what finished, and
    # refuses (recording nothing) a folder whose finished job had another config.
    done = completed_sweep_job(cfg)
    if done is not None:
        return done
    check_train_keys(cfg)
    check_l2sp_start(cfg)
    check_gradual_keys(cfg)
    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # the start statement says it
    ckpt_path = cfg.get("ckpt_path") or unfinished_sweep_job(cfg)
    config = resolved_config(cfg)
    ckpt_path = resume_path(ckpt_path, cfg.paths.output_dir)
    resumed = load_checkpoint(ckpt_path, key="ckpt_path") if ckpt_path else None
    if resumed is not None:
        check_training_state(resumed, ckpt_path)  # a soup holds weights, not a run
    if resumed is not None and isinstance(resumed.get(CONFIG_KEY), dict):
        refuse_unresumable_changes(resumed[CONFIG_KEY], config, ckpt_path)  # before any work
    if not is_multirun() and not continues_in_place(ckpt_path, cfg.paths.output_dir):
        # A sweep decides about its job folders; anything but the folder's own run continued
        # in place would overwrite its record and checkpoints.
        what = f"continuing {ckpt_path} there" if ckpt_path else "a new run"
        check_folder_is_free(Path(cfg.paths.output_dir), what)
    remember_job_for_ddp_children(cfg.paths.output_dir)
    datamodule, method = build_components(cfg)
    calibration = calibration_for(cfg, method)  # refused here, before any training
    if resumed is not None:
        check_resumable(resumed, method, ckpt_path)  # before any work is done
        check_resumed_method(resumed, method)
        datamodule.check_checkpoint_data(resumed, resuming=True)  # the same images
    # Refusals above leave the folder's record alone (`runs.may_replace_record`); from here a
    # kill leaves `running`, never the folder's earlier record.
    record_start(cfg)
    keep_job_record(cfg, config)
    epochs = CompletedEpochs()
    needs = {"train": "training needs it", **splits_needed(calibration)}
    splits = RefuseEmptySplits(("train", "val", "test"), needs)
    always = [
        splits,
        RefuseInputsTheModelCannotTake(),
        ConfigInCheckpoint(config),
        RandomStateInCheckpoint(cfg.seed),
        epochs,
        TrimLogsToRestoredStep(),
    ]
    trainer = build_trainer(cfg, extra_callbacks=[*always, ValidateWhenStoppingMidEpoch()])

    try:  # a signal here says how far training got; `runs.guarded` covers the rest of the run
        with stop_on_signals():
            metrics, tested = fit_and_test(trainer, method, datamodule, ckpt_path, epochs)
            metrics.update(calibrate_after_test(calibration, trainer, method))  # best.ckpt's
    except RunInterrupted as stop:
        stop.epochs_completed, stop.global_step = epochs.completed, trainer.global_step
        raise
    record_run(trainer, cfg, config, metrics, tested=tested)
    return metrics


def fit_and_test(
    trainer: Any, method: Any, datamodule: Any, ckpt_path: str | None, epochs: Any
) -> tuple[dict[str, float], str]:
    """Fit, then test the best checkpoint: the final epoch metrics and the test metrics, and
    which weights the test measured (`tested_weights`), or that it measured none."""
    from posttrain.runs import epoch_metrics

    trainer.fit(method, datamodule=datamodule, ckpt_path=ckpt_path)
    # A resume's own epochs may have validated never, or not trained at all (stopped while
    # testing): the checkpoint's metrics stand where this fit logged nothing newer.
    metrics = {**epochs.restored, **epoch_metrics(trainer.callback_metrics)}
    # Read before testing: testing `best.ckpt` restores the callbacks' state of that epoch.
    metrics.update({"epoch": float(epochs.completed), "global_step": float(trainer.global_step)})
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    tested = tested_weights(trainer.checkpoint_callback, best, epochs.completed, no_best(trainer))
    for result in trainer.test(method, datamodule=datamodule, ckpt_path=best, verbose=False):
        metrics.update(epoch_metrics(result))
    if not any(name.startswith("test/") for name in metrics):  # limit_test_batches=0
        tested = "nothing: no test batch ran (`trainer.limit_test_batches=0`), so no test/*"
    else:
        tested = "; ".join([tested, *weights_notes(trainer)])
    return metrics, tested


def continues_in_place(ckpt_path: str | None, output_dir: str) -> bool:
    """Whether `ckpt_path` is a checkpoint of the run in `output_dir` (`ckpt_path=last`, or
    its file named by path): a resume from another run's checkpoint into a folder holding a
    completed run replaced that run's checkpoints and metrics.json without a word."""
    if ckpt_path is None:
        return False
    return Path(ckpt_path).resolve().parent == (Path(output_dir) / "checkpoints").resolve()


def weights_notes(trainer: Any) -> list[str]:
    """What callbacks say the tested weights were (`reg=ema|swa`: their average, or the raw
    weights where none had been made: SWA's best epoch before `start_epoch`, early stopping
    before it), so a test of raw weights never reads as one of the average."""
    notes = (getattr(c, "tested_weights", lambda: None)() for c in trainer.callbacks)
    return [note for note in notes if note]


def tested_weights(
    checkpointing: Any,
    best: str | None,
    epochs_completed: int,
    why_no_best: str,
) -> str:
    """Which weights `test/*` measured, in words for metrics.json and the summary: the best
    checkpoint, or the final weights when no best checkpoint was kept (`callbacks=console`,
    `callbacks=none`, `no_best`), so a test of the last epoch never reads as one of the best."""
    monitor = getattr(checkpointing, "monitor", None)
    score = getattr(checkpointing, "best_model_score", None)
    if best and monitor and score is not None:
        return f"{Path(best).name}: the epoch with the best {monitor} ({float(score):.4f})"
    # An unmonitored checkpoint (`+trainer.enable_checkpointing=true` without
    # callbacks.model_checkpoint) keeps the last epoch: its `best_model_path` is that file.
    kept = f" ({Path(best).name}, a checkpoint of the last epoch)" if best else ""
    return (
        f"the final weights, after epoch {epochs_completed}{kept}: no best checkpoint was "
        f"kept ({why_no_best})"
    )


def no_best(trainer: Any) -> str:
    """Why fitting left no best checkpoint, for `tested_weights`. A checkpoint callback that
    is on but never saw its metric (`trainer.limit_val_batches=0`) was said to be off."""
    checkpointing = trainer.checkpoint_callback
    monitor = getattr(checkpointing, "monitor", None)
    if trainer.fast_dev_run:
        return "`trainer.fast_dev_run`, as in debug=fast, writes none"
    if monitor is None or getattr(checkpointing, "save_top_k", 1) == 0:
        return "callbacks.model_checkpoint is off"
    never_ran = (
        ": no validation ran, e.g. `trainer.limit_val_batches=0` or "
        "`trainer.check_val_every_n_epoch` above the epochs trained"
        if monitor.startswith("val/")
        else ""
    )
    return f"callbacks.model_checkpoint ranks epochs by {monitor}, which none logged{never_ran}"


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    from posttrain.runs import guarded

    return guarded(train, cfg)


def main() -> float | None:
    """`python train.py [group=option] [key=value]`: returns the metric a sweeper optimizes."""
    from posttrain.ddp_jobs import pin_ddp_child_to_its_job

    pin_ddp_child_to_its_job()
    refuse_unwritable_output(sys.argv[1:])
    return hydra_main()


if __name__ == "__main__":
    main()
