"""The one training entry point: compose -> seed -> instantiate -> fit -> test -> record.

Generic on purpose: it knows no concrete data, model or method; those sit behind `_target_`
in `conf/`. Heavy imports happen inside the task so `--help` and `--cfg job` stay fast.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def train(cfg: DictConfig) -> dict[str, float]:
    """Train, test the best checkpoint, write metrics.json; returns the flat metrics."""
    import lightning as L
    from hydra.utils import instantiate

    from posttrain.checkpoints import load_checkpoint
    from posttrain.methods.metrics import to_floats
    from posttrain.runs import (
        ConfigInCheckpoint,
        build_trainer,
        log_hparams,
        print_summary,
        resolved_config,
        write_json,
    )

    L.seed_everything(cfg.seed, workers=True)
    if cfg.get("ckpt_path"):
        load_checkpoint(cfg.ckpt_path, key="ckpt_path")  # fail before any work is done
    config = resolved_config(cfg)
    datamodule = instantiate(cfg.data)
    model = instantiate(
        cfg.model, num_classes=datamodule.num_classes, in_channels=datamodule.in_channels
    )
    method = instantiate(cfg.method, model=model, _convert_="all")
    trainer = build_trainer(cfg, extra_callbacks=[ConfigInCheckpoint(config)])

    trainer.fit(method, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    metrics = to_floats(trainer.callback_metrics)
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
    for result in trainer.test(method, datamodule=datamodule, ckpt_path=best):
        metrics.update(to_floats(result))
    metrics.update({"epoch": float(trainer.current_epoch), "global_step": float(trainer.global_step)})

    output_dir = Path(cfg.paths.output_dir)
    if trainer.is_global_zero:
        write_json(output_dir / "metrics.json", {"status": "completed", **metrics})
        log_hparams(trainer, config, metrics)
        print_summary(output_dir, metrics, cfg.paths.log_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """`python train.py [group=option] [key=value]`: returns the metric a sweeper optimizes."""
    from posttrain.runs import guarded

    return guarded(train, cfg)


if __name__ == "__main__":
    main()
