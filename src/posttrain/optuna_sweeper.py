"""An Optuna search in which a failed trial is marked failed and the search goes on.

A posttrain sweep job that fails records why in its `metrics.json` and hands the sweeper NaN
(`runs.guarded`), so the sweep goes on. hydra-optuna-sweeper 1.2.0 (the newest release, pinned
with optuna 2.x) tells Optuna every return value as a COMPLETE trial: optuna 2.10 refuses NaN,
the sweeper's fallback then tells FAIL *with* the value, which Optuna refuses too, and the
search stops at the first failed trial, with no report. `TolerantOptunaSweeperImpl` keeps that
sweeper's settings, search space and study handling, and tells a job that returned a
non-finite value as a FAIL trial without a value, so no number in the study stands for it,
the sampler learns nothing from it, and the search runs on to `n_trials`. An exception that
escaped the job (a bug, not a recorded failure) still stops the search, as it stops a `-m`
sweep of Hydra's basic sweeper.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import optuna
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_optuna_sweeper._impl import (
    OptunaSweeperImpl,
    create_params_from_overrides,
)
from omegaconf import OmegaConf
from optuna.trial import Trial, TrialState

log = logging.getLogger("posttrain")


def objective_values(ret: JobReturn, objectives: int) -> list[float] | None:
    """The values a finished job hands the study, or None when the job failed: it raised (the
    exception is re-raised once the trial is told) or returned NaN/inf (a recorded failure)."""
    if ret.status != JobStatus.COMPLETED:
        return None
    returned = ret.return_value
    try:
        values = [float(returned)] if objectives == 1 else [float(v) for v in returned]
    except (TypeError, ValueError):
        raise ValueError(
            f"The job returned {returned!r}, not {objectives} number(s) to optimize: check "
            "that `optimized_metric` names a metric the run records."
        ) from None
    if len(values) != objectives:
        raise ValueError(f"The job returned {len(values)} values for {objectives} objectives.")
    return values if all(math.isfinite(v) for v in values) else None


class TolerantOptunaSweeperImpl(OptunaSweeperImpl):
    """hydra-optuna-sweeper 1.2.0's `sweep`, the same up to how each trial is told."""

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        self._process_searchspace_config()
        params_conf = self._parse_sweeper_params_config()
        params_conf.extend(arguments)
        is_grid_sampler = (
            isinstance(self.sampler, functools.partial)
            and self.sampler.func == optuna.samplers.GridSampler
        )
        distributions, fixed_params = create_params_from_overrides(params_conf)
        if is_grid_sampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info("Updating num of trials to %d due to using GridSampler.", self.n_trials)
        for name in fixed_params:
            distributions.pop(name, None)
        directions = self._get_directions()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage,
            sampler=self.sampler,
            directions=directions,
            load_if_exists=True,
        )
        log.info("Study name: %s, storage: %s, sampler: %s, directions: %s", study.study_name,
                 self.storage, type(self.sampler).__name__, directions)  # fmt: skip
        to_go = self.n_trials
        while to_go > 0:
            batch = min(to_go, self.n_jobs)
            trials = [study.ask() for _ in range(batch)]
            overrides = self._configure_trials(trials, distributions, fixed_params)
            returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            for trial, ret in zip(trials, returns, strict=True):
                tell(study, trial, ret, len(directions), is_grid_sampler)
            to_go -= batch
        self.save_results(study, directions)

    def save_results(self, study: optuna.Study, directions: list[str]) -> None:
        """`optimization_results.yaml`, as hydra-optuna-sweeper writes it, when any trial of
        the study completed; with none, there is no best value to write."""
        if not any(t.state == TrialState.COMPLETE for t in study.trials):
            log.warning("No trial of study %s completed: no best parameters to write.",
                        study.study_name)  # fmt: skip
            return
        results: dict[str, Any]
        if len(directions) == 1:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("Best parameters: %s", best.params)
            log.info("Best value: %s", best.value)
        else:
            front = [{"params": t.params, "values": t.values} for t in study.best_trials]
            results = {"name": "optuna", "solutions": front}
            log.info("Number of Pareto solutions: %d", len(front))
        OmegaConf.save(
            OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        )


def tell(study: optuna.Study, trial: Trial, ret: JobReturn, objectives: int, grid: bool) -> None:
    """Tell `study` how `trial` ended: COMPLETE with its values, or FAIL with none."""
    try:
        values = objective_values(ret, objectives)
    except ValueError:
        study.tell(trial, state=TrialState.FAIL)
        raise
    if values is None:
        study.tell(trial, state=TrialState.FAIL)
        if ret.status != JobStatus.COMPLETED:
            _ = ret.return_value  # re-raises what escaped the job, with its traceback
        log.warning("Trial %d failed (its job folder's metrics.json says why); it is marked "
                    "FAIL in the study and the search goes on.", trial.number)  # fmt: skip
        return
    try:
        study.tell(trial, values, state=TrialState.COMPLETE)
    except RuntimeError as error:  # the grid sampler stops the study once the grid is done
        if not (grid and "`Study.stop` is supposed to be invoked" in str(error)):
            raise
