"""The Optuna sweeper of `hparams_search=reg_optuna` (`hydra/sweeper=tolerant_optuna`).

Hydra instantiates sweepers only from classes under `hydra_plugins`, so the class lives here;
what it does differently lives in `posttrain.optuna_sweeper`, imported when a sweep starts (as
hydra-optuna-sweeper does), so every other command's plugin scan stays cheap.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper


class TolerantOptunaSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's `OptunaSweeper` with the same settings, in which a failed trial
    is marked FAIL in the study and the search goes on to `n_trials`."""

    def __init__(self, **settings: Any) -> None:
        """`settings`: those of `OptunaSweeper` (sampler, direction, storage, n_trials, ...)."""
        from posttrain.optuna_sweeper import TolerantOptunaSweeperImpl

        self.sweeper = TolerantOptunaSweeperImpl(**settings)
