"""Evaluate a checkpoint on its test split: `python eval.py ckpt_path=<run>/checkpoints/best.ckpt`.

The data, model and method are rebuilt from the config the training run stored in the
checkpoint, so evaluation needs nothing but the file; trainer/logger/paths come from
`conf/eval.yaml` (e.g. run it on another device).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from posttrain.train import CONFIG_DIR

EVAL_KEYS = {"task_name", "ckpt_path", "data", "method", "trainer", "logger",
             "callbacks", "paths", "hydra", "calibration", "tta"}  # fmt: skip
# Method keys that act at test time; everything else was fixed by training.
TEST_TIME_METHOD_KEYS = ("eval_inner_steps", "inner_lr")
# Trainer keys that only fitting reads: `trainer.test` runs the same with any value.
TRAINING_ONLY_TRAINER_KEYS = (
    "max_epochs", "max_steps", "min_epochs", "min_steps", "max_time", "accumulate_grad_batches",
    "gradient_clip_val", "gradient_clip_algorithm", "check_val_every_n_epoch",
    "val_check_interval", "limit_train_batches", "num_sanity_val_steps",
)  # fmt: skip


# Data keys that only choose training images or episodes: a test reads none of them.
TRAINING_ONLY_DATA_KEYS = ("samples_per_class", "train_episodes")


def ignored_data_keys(data: DictConfig, trained: DictConfig, calibrating: bool) -> dict[str, str]:
    """The `data.*` overrides an evaluation would accept and not read, each with why.

    `eval.py data.samples_per_class=5` changed nothing: the per-class subset is drawn from
    the training pool only (as are training episodes, and the targets a multi-task run
    hides with `missing`). Nor did `data.batch_size=7` where the run sets
    `data.eval_batch_size`, or `data.val_episodes` without `calibration=temperature`.
    """
    chooses = "it chooses training images (or episodes)"
    hidden = [f"targets.{task}.missing" for task, spec in (data.get("targets") or {}).items()
              if isinstance(spec, DictConfig) and "missing" in spec]  # fmt: skip
    ignored = {key: chooses for key in TRAINING_ONLY_DATA_KEYS if key in data}
    ignored.update({key: chooses for key in hidden})
    if "batch_size" in data and data.get("eval_batch_size", trained.get("eval_batch_size")):
        ignored["batch_size"] = "it sizes the training batches (`data.eval_batch_size` the test's)"
    if "val_episodes" in data and not calibrating:
        ignored["val_episodes"] = "only validation reads it, which eval.py runs only to calibrate"
    return ignored


def check_data_overrides(data: DictConfig, trained: DictConfig, calibrating: bool) -> None:
    """One paragraph for a `data.*` override the evaluation would not read
    (`ignored_data_keys`); the test split stays the checkpoint's."""
    from posttrain.errors import PosttrainError

    for key, why in ignored_data_keys(data, trained, calibrating).items():
        raise PosttrainError(
            f"Config key `data.{key}` changes nothing in eval.py: {why}, and eval.py tests "
            "the checkpoint on its test split. Drop it. Test-time data keys: "
            "`data.eval_batch_size` (`data.meta_batch_size` for episodes), `data.num_workers`, "
            "and for episodes `data.ways`, `data.shots`, `data.queries`, `data.test_episodes`; "
            "another `data.dataset` or image folder's `data.root` tests on other data."
        )


def check_trainer_overrides(overrides: list[str], needs: dict[str, str]) -> None:
    """`eval.py trainer.max_epochs=50` was accepted and changed nothing: eval composes the
    training Trainer config, and a test reads none of the fitting keys (nor the validation
    limit, unless calibration fits on the validation split: `needs`)."""
    from posttrain.errors import PosttrainError

    ignored = [*TRAINING_ONLY_TRAINER_KEYS, *([] if "val" in needs else ["limit_val_batches"])]
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key.startswith("trainer.") and key.removeprefix("trainer.") in ignored:
            raise PosttrainError(
                f"Config key `{key}` changes nothing in eval.py: it tests the checkpoint, and "
                "only fitting reads it. Drop it. Test-time trainer keys: "
                "`trainer.limit_test_batches`, `trainer.precision`, `trainer.accelerator`, "
                "`trainer.devices`, `trainer.deterministic` (and `trainer.limit_val_batches` "
                "with `calibration=temperature`, which fits on the validation split)."
            )


def evaluation_config(trained: DictConfig, cfg: DictConfig) -> DictConfig:
    """The trained run's config with the evaluation's overrides applied, or one paragraph
    saying why an override cannot apply (it is never accepted and ignored).

    Weights come from the checkpoint alone: `model.pretrained` is dropped, so a fine-tuned
    checkpoint evaluates where its source weights are absent.
    """
    from omegaconf import OmegaConf, open_dict

    from posttrain.errors import require

    unknown = sorted(set(cfg) - EVAL_KEYS)
    seed = (
        " Nothing in an evaluation is random: the test split and test episodes are fixed by "
        "the checkpoint's `data.seed`, so a `seed` would change no number."
        if "seed" in unknown
        else ""
    )
    require(
        not unknown,
        f"`eval.py` does not take {', '.join(f'`{k}`' for k in unknown)}: the model, "
        f"optimizer and regularizers come from the checkpoint.{seed} It takes `data.*`, "
        f"`method.{'`/`method.'.join(TEST_TIME_METHOD_KEYS)}` (MAML), `trainer.*`, "
        "`calibration=`, `tta=`.",
    )
    applicable = [key for key in TEST_TIME_METHOD_KEYS if key in trained.method]
    for key in cfg.method:
        require(
            key in applicable,
            f"Config key `method.{key}` cannot change at evaluation: training fixed it. "
            f"Test-time keys of this checkpoint's method: {', '.join(applicable) or 'none'}.",
        )
    calibrating = "_target_" in (cfg.get("calibration") or {})
    check_data_overrides(cfg.data, trained.data, calibrating)
    evaluated = OmegaConf.merge(trained, {"data": cfg.data, "method": cfg.method})
    check_same_test_split(trained.data, evaluated.data)
    with open_dict(evaluated):
        evaluated.model.pretrained = None
        if (evaluated.get("reg") or {}).get("l2sp") is not None:  # trained from the checkpoint
            evaluated.reg.l2sp.start = str(cfg.ckpt_path)
        if evaluated.model.get("pretrained_head"):  # the checkpoint holds the trained head
            evaluated.model.pretrained_head = False
        if evaluated.method.get("finetune") is not None:  # what is evaluated: the checkpoint
            evaluated.method.finetune.weights = str(cfg.ckpt_path)
        if "ways" in cfg.data and trained.data.get("train_ways", "absent") is None:
            evaluated.data.train_ways = trained.data.ways  # the head keeps its training size
    return evaluated


def check_same_test_split(trained: DictConfig, evaluated: DictConfig) -> None:
    """On the same data, the checkpoint is tested on its own test split: another `data.seed`
    (or fraction, classes, options) re-draws the split, and 244 of the 359 digits a
    `data.seed=1` evaluation tested had trained a `data.seed=0` checkpoint. Other data
    (another `data.dataset`, or an image folder's `data.root`) holds no training image."""
    from posttrain.data.splits import split_difference
    from posttrain.errors import PosttrainError

    moved = split_difference(evaluated, trained)
    if moved is None or moved[0] in ("data.dataset", "data.root"):
        return
    key, asked, trained_with = moved
    raise PosttrainError(
        f"Config key `{key}` cannot change at evaluation: `{key}={asked}` (the checkpoint "
        f"trained with `{key}={trained_with}`) re-draws which images are validation and test, "
        "so the new test split would hold images this checkpoint trained on. eval.py tests on "
        "the checkpoint's own split; to test on other data, point `data.dataset` (or an image "
        "folder's `data.root`) at it."
    )


def check_not_a_training_folder(output_dir: Path) -> None:
    """eval.py writes its own metrics.json: in a training run's folder it would replace the
    record of that run (its test numbers, its status)."""
    from posttrain.errors import require

    require(
        not (output_dir / "checkpoints").is_dir(),
        f"Config key `hydra.run.dir`: {output_dir} is a training run's folder, and eval.py "
        "would replace its metrics.json with the evaluation's. Leave `hydra.run.dir` out "
        "(evaluations get their own folder under outputs/eval/) or name a new folder.",
    )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint (with `tta=` views, then `calibration=`); writes metrics.json in
    the eval run folder."""
    import lightning as L
    from omegaconf import OmegaConf

    from posttrain.calibration import calibrate_after_test, calibration_for, splits_needed
    from posttrain.checkpoints import check_resumable, load_checkpoint, stored_config
    from posttrain.checks import (
        RefuseEmptySplits,
        RefuseInputsTheModelCannotTake,
        check_run_config,
    )
    from posttrain.runs import (
        build_components,
        build_trainer,
        check_folder_is_free,
        epoch_metrics,
        hydra_choices_and_overrides,
        record_run,
        record_start,
        resolved_config,
    )
    from posttrain.tta import VIEWS, augmented_predictions, check_tta

    check_run_config(cfg, seeded=False)
    check_not_a_training_folder(Path(cfg.paths.output_dir))
    check_folder_is_free(Path(cfg.paths.output_dir), "this evaluation", resumable=False)
    checkpoint = load_checkpoint(cfg.ckpt_path, key="ckpt_path")
    trained = OmegaConf.create(stored_config(checkpoint, cfg.ckpt_path, key="ckpt_path"))
    evaluated = evaluation_config(trained, cfg)
    # The trained run's seed: nothing here draws from it, and the start statement names it.
    L.seed_everything(int(trained.get("seed") or 0), workers=True, verbose=False)
    datamodule, method = build_components(evaluated)
    check_resumable(checkpoint, method, cfg.ckpt_path)  # e.g. a 10-class head on 100 classes
    datamodule.check_checkpoint_data(checkpoint, resuming=False)  # its test split's images
    calibration = calibration_for(cfg, method)
    check_tta(cfg.tta, method)
    needs = {"test": "the evaluation is its test", **splits_needed(calibration)}
    check_trainer_overrides(hydra_choices_and_overrides()[1], needs)
    record_start(cfg)  # a killed evaluation never reads as the folder's earlier record
    trainer = build_trainer(
        cfg, extra_callbacks=[RefuseEmptySplits(("test",), needs), RefuseInputsTheModelCannotTake()]
    )
    metrics: dict[str, float] = {"test/tta_views": float(len(VIEWS[cfg.tta]))}
    with augmented_predictions(cfg.tta, method), warnings.catch_warnings():
        # Lightning asks for the training callbacks (checkpointing, LR monitor) to restore
        # their state; a test does not use them.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        results = trainer.test(
            method, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False
        )
        for result in results:
            metrics.update(epoch_metrics(result))
        metrics.update(calibrate_after_test(calibration, trainer, method))
    config = {
        **resolved_config(cfg),
        "trained": OmegaConf.to_container(trained),
        "evaluated": OmegaConf.to_container(evaluated),
    }
    record_run(trainer, cfg, config, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    from posttrain.runs import guarded

    return guarded(evaluate, cfg)


def open_overrides(argv: list[str]) -> list[str]:
    """`data.shots=5` as `+data.shots=5`: eval's `data`/`method` start empty (the trained
    run's config fills them), so in Hydra every key there is an addition; `model.*` and `seed`
    too, so that eval's own paragraph refuses them rather than Hydra's bare "not in struct"."""
    return [
        f"+{arg}" if arg.startswith(("data.", "method.", "model.", "seed=")) else arg
        for arg in argv
    ]


def main() -> float | None:
    """`python eval.py ckpt_path=...`"""
    import sys

    from posttrain.run_names import refuse_unwritable_output

    refuse_unwritable_output(sys.argv[1:])
    sys.argv[1:] = open_overrides(sys.argv[1:])
    return hydra_main()


if __name__ == "__main__":
    main()
