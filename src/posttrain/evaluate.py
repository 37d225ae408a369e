"""Evaluate a checkpoint on its test split: `python eval.py ckpt_path=<run>/checkpoints/best.ckpt`.

The data, model and method are rebuilt from the config the training run stored in the
checkpoint, so evaluation needs nothing but the file; trainer/logger/paths come from
`conf/eval.yaml` (e.g. run it on another device).
"""

from __future__ import annotations

import warnings

import hydra
from omegaconf import DictConfig

from posttrain.train import CONFIG_DIR


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test the checkpoint; writes metrics.json in the eval run folder."""
    import lightning as L
    from omegaconf import OmegaConf

    from posttrain.checkpoints import load_checkpoint, stored_config
    from posttrain.checks import check_run_config
    from posttrain.runs import (
        build_components,
        build_trainer,
        epoch_metrics,
        record_run,
        resolved_config,
    )

    check_run_config(cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint = load_checkpoint(cfg.ckpt_path, key="ckpt_path")
    trained = OmegaConf.create(stored_config(checkpoint, cfg.ckpt_path, key="ckpt_path"))
    datamodule, method = build_components(trained)
    trainer = build_trainer(cfg, extra_callbacks=[])
    metrics: dict[str, float] = {}
    with warnings.catch_warnings():
        # Lightning asks for the training callbacks (checkpointing, LR monitor) to restore
        # their state; a test does not use them.
        warnings.filterwarnings("ignore", message="Be aware that when using `ckpt_path`")
        results = trainer.test(
            method, datamodule=datamodule, ckpt_path=cfg.ckpt_path, verbose=False
        )
    for result in results:
        metrics.update(epoch_metrics(result))
    config = {**resolved_config(cfg), "trained": OmegaConf.to_container(trained)}
    record_run(trainer, cfg, config, metrics)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def hydra_main(cfg: DictConfig) -> float | None:
    from posttrain.runs import guarded

    return guarded(evaluate, cfg)


def main() -> float | None:
    """`python eval.py ckpt_path=...`"""
    import sys

    from posttrain.run_names import refuse_unwritable_output

    refuse_unwritable_output(sys.argv[1:])
    return hydra_main()


if __name__ == "__main__":
    main()
