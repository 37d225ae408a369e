"""Model soups from a sweep: `python -m posttrain.soup <multirun folder> [--recipe greedy|uniform]`.

Wortsman et al. 2022: models fine-tuned from one pretrained starting point usually lie in
one basin of the loss, so the average of their weights is itself a good model, often better
than the best of them, at no training cost. The sweep's completed jobs that share an
architecture, a starting point, a method, a data split (`posttrain.data.splits`) and an input
size with the largest such group are the candidate ingredients; every other job is refused
with one line saying why.

- `uniform`: the mean of every candidate's weights.
- `greedy` (default): candidates in order of `val/acc_best`, best first; each is kept only
  if the soup's validation accuracy does not drop with it.

Floating-point tensors are averaged; integer buffers (BatchNorm's `num_batches_tracked`)
are counts and extra states (multi-task DWA's loss history) are bookkeeping, both taken from
the first ingredient. The averaged BatchNorm statistics describe no
model (the mean of variances is not the variance of the averaged network), so they are
re-estimated on the training images (torch's `update_bn`, without augmentation) before
every validation and the test, unless every ingredient's recipe kept them frozen. The soup
is scored with the data, method, batch limits (`trainer.limit_val_batches`,
`limit_test_batches`) and precision of the best job's stored config, so its numbers count
the images the jobs' did:
validation accuracy to choose ingredients, the test split once at the end (not at all when
the jobs ran no test: `trainer.limit_test_batches=0`).

Writes `<multirun>/soup_<recipe>/checkpoints/soup.ckpt` (loadable by `eval.py ckpt_path=...`
and `model.pretrained=...`) and `metrics.json`, and rewrites the sweep report with the soup
beside the jobs.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from posttrain.errors import PosttrainError, is_number, require

if TYPE_CHECKING:
    from posttrain.report import JobRow

RECIPES = ("greedy", "uniform")
# Model keys that do not change the weights' layout (the starting point is compared apart).
NOT_ARCHITECTURE = frozenset({"pretrained", "pretrained_head", "channels_last", "compile"})
# Checkpoint entries that belong to one job's training (resume state), not to the soup:
# `reg=ema|swa` jobs also carry their raw weights, the average's count and what their
# `state_dict` holds (`posttrain.regularizers.averaging.WEIGHTS_KEY`).
TRAINING_ONLY_KEYS = (
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
    "posttrain_random_state",
    "posttrain_divergence",
    "current_model_state",
    "averaging_state",
    "posttrain_weights",
)
# The soup is scored as its jobs were: where they ran no test, neither does it.
NOT_TESTED = (
    "nothing: the jobs ran with `trainer.limit_test_batches=0`, so they have no test/* and "
    "neither has the soup; validation alone chose it"
)


@dataclass
class Candidate:
    """A completed job whose best checkpoint could be an ingredient."""

    folder: str
    checkpoint: Path
    config: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    val_acc_best: float
    # The images its splits were drawn from (`posttrain.data.splits.data_listing`).
    listing: dict[str, Any] | None = None

    def state(self) -> dict[str, Any]:
        """The weights, read again when needed: a sweep of big models does not fit in memory."""
        from posttrain.checkpoints import load_checkpoint

        return load_checkpoint(self.checkpoint, key="checkpoint")["state_dict"]

    def architecture(self) -> dict[str, Any]:
        return {k: v for k, v in self.config["model"].items() if k not in NOT_ARCHITECTURE}

    def starting_point(self) -> str:
        """Where training started: pretrained weights, or the seed's random initialization
        (jobs trained from scratch share a starting point only when they share `seed`)."""
        model, finetune = self.config["model"], self.config["method"].get("finetune") or {}
        source = model.get("pretrained") or finetune.get("weights")
        head = ", model.pretrained_head=true" if model.get("pretrained_head") else ""
        if source:
            return f"model.pretrained={source}{head}"
        return f"random initialization of seed={self.config.get('seed')} (model.pretrained=null)"

    def method(self) -> str:
        return str(self.config["method"].get("_target_"))

    def trains_statistics(self) -> bool:
        return statistics_are_trained(self.config)

    def data(self) -> dict[str, Any]:
        return self.config.get("data") or {}

    def inputs(self) -> tuple[str, str]:
        """What the weights were trained and judged on: the validation/test split (greedy
        chooses on validation, which no ingredient may have trained on; the test must be
        new to all of them) and the input size, as a comparable key."""
        from posttrain.data.splits import as_typed, split_settings

        return repr(sorted(split_settings(self.data()).items())), as_typed(
            self.data().get("image_size")
        )


@dataclass
class Selection:
    """The candidates that can be averaged (best `val/acc_best` first) and the refusals."""

    candidates: list[Candidate]
    refused: list[str] = field(default_factory=list)
    completed: int = 0


class StateSum:
    """A running sum of state dicts, so a soup grows one ingredient at a time."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}  # float tensors, summed in float64
        self.dtypes: dict[str, torch.dtype] = {}
        self.kept: dict[str, Any] = {}  # integer buffers and extra states: not weights
        self.count = 0

    def add(self, state: dict[str, Any]) -> None:
        for name, tensor in state.items():
            if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
                self.kept.setdefault(name, copy.deepcopy(tensor))
            elif name in self.sums:
                self.sums[name] += tensor.double()
            else:
                self.sums[name] = tensor.to(torch.float64, copy=True)
                self.dtypes[name] = tensor.dtype
        self.count += 1

    def mean(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The mean of what was added (and of `extra`, which is not added), in stored dtypes."""
        count = self.count + (extra is not None)
        averaged = {
            name: ((total + extra[name].double() if extra is not None else total) / count).to(
                self.dtypes[name]
            )
            for name, total in self.sums.items()
        }
        return {**self.kept, **averaged}


def average_state_dicts(states: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The uniform soup: float tensors averaged, integer buffers and extra states from the
    first state."""
    total = StateSum()
    for state in states:
        total.add(state)
    require(total.count > 0, "A soup needs at least one state dict.")
    return total.mean()


# Choosing the ingredients ---------------------------------------------------------------------


def sweep_rows(sweep: Path) -> list[JobRow]:
    """The sweep's job rows, or one paragraph for a folder that is no multirun."""
    from posttrain.report import collect

    require(
        sweep.is_dir(),
        f"posttrain.soup: {sweep} does not exist or is not a folder. Give the folder of a "
        "Hydra multirun: the `hydra.sweep.dir` of a `python train.py -m ...` sweep (by default "
        "`outputs/train/multiruns/<time>_<id>`).",
    )
    rows = collect(sweep)
    require(
        bool(rows),
        f"posttrain.soup: {sweep} is not a multirun folder: it has no job folders "
        "(`<job>/.hydra/overrides.yaml`) and no `multirun.yaml`. Give the `hydra.sweep.dir` "
        "of a `python train.py -m ...` sweep.",
    )
    completed = [row for row in rows if row.status == "completed"]
    statuses = ", ".join(sorted({f"{row.folder}: {row.status}" for row in rows})[:6])
    require(
        bool(completed),
        f"posttrain.soup: none of the {len(rows)} jobs in {sweep} completed ({statuses}), so "
        "there are no trained weights to average. Finish the sweep (re-running its command "
        "with the same `hydra.sweep.dir` completes the missing jobs) and run the soup again.",
    )
    return rows


def read_candidate(sweep: Path, row: JobRow) -> Candidate | str:
    """A completed job's best checkpoint as a candidate, or why it cannot be one."""
    from posttrain.checkpoints import load_checkpoint, stored_config
    from posttrain.data.splits import stored_listing

    if row.status != "completed":
        reason = f": {row.error}" if row.error else ""
        return f"{row.folder}: not completed (status {row.status}{reason})"
    file = sweep / row.folder / "checkpoints" / "best.ckpt"
    if not file.is_file():
        return f"{row.folder}: no checkpoints/best.ckpt (the job kept no best weights)"
    try:
        checkpoint = load_checkpoint(file, key="checkpoint")
        config = stored_config(checkpoint, file, key="checkpoint")
    except PosttrainError as error:
        return f"{row.folder}: unreadable best.ckpt ({error})"
    state = checkpoint.get("state_dict") or {}
    shapes = {k: tuple(v.shape) for k, v in state.items() if isinstance(v, Tensor)}
    val = row.metrics.get("val/acc_best", -math.inf)
    return Candidate(row.folder, file, config, shapes, val, stored_listing(checkpoint))


def compatibility(candidate: Candidate) -> tuple[str, tuple[str, str], str, str]:
    """What must be equal for weights to be averaged: method, data split and input size,
    layout and starting point."""
    layout = repr((sorted(candidate.architecture().items()), sorted(candidate.shapes.items())))
    return candidate.method(), candidate.inputs(), layout, candidate.starting_point()


def data_difference(candidate: Candidate, reference: Candidate) -> str | None:
    """Another validation/test split, other classes or another input size, by config key."""
    from posttrain.data.splits import as_typed, split_difference

    differs = split_difference(candidate.data(), reference.data())
    if differs is not None:
        key, ours, theirs = differs
        return (
            f"another data split or classes ({key}={ours}, not {theirs} as in "
            f"{reference.folder}: it trained on images the soup validates or tests on, or "
            "predicts other classes)"
        )
    ours, theirs = (as_typed(c.data().get("image_size")) for c in (candidate, reference))
    if ours != theirs:
        return f"another input size (data.image_size={ours}, not {theirs} as in {reference.folder})"
    return None


def difference(candidate: Candidate, reference: Candidate) -> str:
    """Why `candidate` cannot join `reference`'s soup, named by config key."""
    if candidate.method() != reference.method():
        return f"another method ({candidate.method()}, not {reference.method()})"
    data = data_difference(candidate, reference)
    if data is not None:
        return data
    ours, theirs = candidate.architecture(), reference.architecture()
    for key in sorted(set(ours) | set(theirs)):
        if ours.get(key) != theirs.get(key):
            return (
                f"another architecture (model.{key}={ours.get(key)}, not {theirs.get(key)} as "
                f"in {reference.folder})"
            )
    if candidate.shapes != reference.shapes:
        names = sorted(set(candidate.shapes) ^ set(reference.shapes)) or [
            k for k in candidate.shapes if candidate.shapes[k] != reference.shapes[k]
        ]
        name = names[0]
        return (
            f"another architecture (weights differ in names or shapes, e.g. {name}: "
            f"{candidate.shapes.get(name)} here, {reference.shapes.get(name)} in "
            f"{reference.folder})"
        )
    return (
        f"another starting point ({candidate.starting_point()}, not "
        f"{reference.starting_point()} as in {reference.folder})"
    )


def select(sweep: Path) -> Selection:
    """The largest group of compatible completed jobs (ties: the group of the best job)."""
    rows = sweep_rows(sweep)
    read = [read_candidate(sweep, row) for row in rows]
    refused = [item for item in read if isinstance(item, str)]
    candidates = sorted(
        (item for item in read if isinstance(item, Candidate)), key=lambda c: -c.val_acc_best
    )
    groups: dict[tuple[str, tuple[str, str], str, str], list[Candidate]] = {}
    for candidate in candidates:
        groups.setdefault(compatibility(candidate), []).append(candidate)
    chosen = max(groups.values(), key=len) if groups else []
    for candidate in candidates:
        if candidate not in chosen:
            refused.append(f"{candidate.folder}: {difference(candidate, chosen[0])}")
    completed = sum(row.status == "completed" for row in rows)
    return Selection(chosen, refused, completed)


def require_soupable(selection: Selection, sweep: Path) -> None:
    """Enough ingredients, of a method whose weights mean the same thing when averaged."""
    from hydra.utils import get_class

    from posttrain.methods.meta import EpisodicLearner

    candidates = selection.candidates
    if candidates and issubclass(get_class(candidates[0].method()), EpisodicLearner):
        raise PosttrainError(
            f"posttrain.soup: the jobs in {sweep} use an episodic method "
            f"({candidates[0].config['method'].get('algorithm')}, `method=maml|protonet`), "
            "whose weights are not averaged here: they are an initialization (MAML) or an "
            "embedding (ProtoNet) judged only after adapting to each episode, with BatchNorm "
            "statistics taken per episode, so a soup's validation accuracy and re-estimated "
            "statistics would not mean what the recipe assumes. Soups take sweeps of "
            "`method=finetune`, `method=supervised` or `method=multitask`."
        )
    reasons = "; ".join(selection.refused) or "no other jobs"
    require(
        len(candidates) >= 2,
        f"posttrain.soup: a soup needs at least 2 compatible completed jobs, but {sweep} has "
        f"{len(candidates)} ({selection.completed} completed in all; refused: {reasons}). "
        "Ingredients must share the architecture (`model.*`), the starting point "
        "(`model.pretrained`, or `seed` when trained from scratch), the method, the data "
        "split and classes (`data.seed`, `data.classes`, ...) and `data.image_size`.",
    )


def check_same_images(candidates: list[Candidate], listing: dict[str, Any], sweep: Path) -> None:
    """Every ingredient was trained on the images the soup is chosen and scored on: an image
    folder whose files changed since draws other validation and test splits from the same
    config, which would then hold images the jobs trained on."""
    from posttrain.data.splits import listing_change

    changed = [
        f"{candidate.folder}: {change}"
        for candidate in candidates
        if (change := listing_change(candidate.listing, listing)) is not None
    ]
    shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
    require(
        not changed,
        f"posttrain.soup: the data changed since {len(changed)} of the {len(candidates)} "
        f"compatible jobs in {sweep} trained ({shown}). Their validation and test splits were "
        "drawn from the images then, so a soup chosen and scored on the splits drawn now "
        "would be judged on images they trained on, and its numbers would not be true. "
        "Restore the files as they were, or run the sweep again on the data as it is (another "
        "`hydra.sweep.dir`).",
    )


# Scoring a soup -------------------------------------------------------------------------------


def statistics_are_trained(config: dict[str, Any]) -> bool:
    """False where the recipe froze the backbone's BatchNorm statistics (linear probe,
    `freeze_bn_stats`): there the averaged (pretrained) statistics are the model's own."""
    finetune = config["method"].get("finetune") or {}
    return finetune.get("policy", "full") != "linear_probe" and not finetune.get("freeze_bn_stats")


def reestimates(ingredients: Iterable[Candidate]) -> bool:
    """Whether a mix's BatchNorm statistics must be re-estimated: unless every ingredient kept
    the same frozen (pretrained) ones. One that trained them (a `policy=full` job beside a
    `linear_probe` one) makes the averaged statistics describe no model."""
    return any(ingredient.trains_statistics() for ingredient in ingredients)


# What the jobs' own validation and test were run with, so the soup is scored on the same
# images at the same precision (a bare Trainer scored all 359 test images of jobs that had
# reported `trainer.limit_test_batches=1`: 32).
SCORING_KEYS = ("limit_val_batches", "limit_test_batches", "precision")


def scoring_settings(reference: Candidate) -> dict[str, Any]:
    """The reference job's batch limits and precision, and a device that runs it (the CPU,
    unless that precision needs a GPU), for the soup's Trainer."""
    from posttrain.checks import CPU_PRECISIONS

    trainer = reference.config.get("trainer") or {}
    settings = {key: trainer.get(key) for key in SCORING_KEYS}
    settings["precision"] = str(settings["precision"] or "32-true")
    on_cpu = settings["precision"] in CPU_PRECISIONS
    require(
        on_cpu or torch.cuda.is_available(),
        f"posttrain.soup: {reference.folder} ran with `trainer.precision="
        f"{settings['precision']}`, which needs a GPU, and none is available here; the soup is "
        "scored at its jobs' precision, so that its numbers compare with theirs. Run the soup "
        "on a machine with a CUDA GPU.",
    )
    return {**settings, "accelerator": "cpu" if on_cpu else "gpu"}


class SoupJudge:
    """The best job's data, method, batch limits and precision, built once from its stored
    config (on the CPU unless that precision needs a GPU)."""

    def __init__(self, reference: Candidate, folder: Path) -> None:
        import lightning as L
        from omegaconf import OmegaConf

        from posttrain.console import quiet_console
        from posttrain.evaluate import evaluation_config
        from posttrain.runs import build_components

        trained = OmegaConf.create(reference.config)
        weights_from = OmegaConf.create(
            {"ckpt_path": str(reference.checkpoint), "data": {}, "method": {}}
        )
        config = evaluation_config(trained, weights_from)  # `model.pretrained` dropped
        L.seed_everything(int(config.get("seed", 0)), verbose=False)
        self.datamodule, self.method = build_components(config)
        self.datamodule.setup("fit")
        quiet_console()
        self.settings = scoring_settings(reference)
        self.trainer = L.Trainer(
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=folder,
            **self.settings,
        )

    def training_inputs(self) -> Iterator[Tensor]:
        """Training images as the model sees them (resized, normalized; not augmented), in
        a fixed order: equal weights get equal statistics, so greedy's ties are exact."""
        from torch.utils.data import DataLoader

        shuffled = self.datamodule.train_dataloader()
        ordered = DataLoader(
            shuffled.dataset, batch_size=shuffled.batch_size, collate_fn=shuffled.collate_fn
        )
        for batch in ordered:
            yield self.datamodule.on_after_batch_transfer(batch, 0)[0]

    def load(self, state: dict[str, Any], reestimate: bool) -> None:
        """The weights; with `reestimate`, BatchNorm statistics from the training images. On
        the network itself, whose `train()` puts every BatchNorm in training mode: the
        method's keeps `freeze_bn_stats` ones in eval mode, whose statistics `update_bn`
        would reset and never re-estimate."""
        from torch.optim.swa_utils import update_bn

        self.method.load_state_dict(state)
        if reestimate:
            with torch.no_grad():
                update_bn(self.training_inputs(), self.method.model)

    def score(self, split: str) -> dict[str, float]:
        """`val/*` or `test/*` metrics of the loaded weights; none where the jobs' limit runs
        no batch of the split (`trainer.limit_test_batches=0`: they reported no `test/*`)."""
        from posttrain.runs import epoch_metrics

        run = self.trainer.validate if split == "val" else self.trainer.test
        results = run(self.method, datamodule=self.datamodule, verbose=False)
        if not results:
            return {}
        metrics = epoch_metrics(results[0])
        return {k: v for k, v in metrics.items() if k.startswith(f"{split}/") and "best" not in k}

    def val_acc(self, state: dict[str, Any], reestimate: bool) -> float:
        self.load(state, reestimate)
        return self.score("val")["val/acc"]


@dataclass
class Step:
    """One candidate tried: the soup's validation accuracy with it, and whether it stayed."""

    job: str
    val_acc: float
    kept: bool


def greedy_soup(judge: SoupJudge, candidates: list[Candidate]) -> tuple[StateSum, list[Step]]:
    """Best job first; each next one stays only if validation accuracy does not drop."""
    soup = StateSum()
    soup.add(candidates[0].state())
    kept_so_far = [candidates[0]]
    best = judge.val_acc(soup.mean(), reestimates(kept_so_far))
    steps = [Step(candidates[0].folder, best, kept=True)]
    for candidate in candidates[1:]:
        state = candidate.state()
        accuracy = judge.val_acc(soup.mean(extra=state), reestimates([*kept_so_far, candidate]))
        kept = accuracy >= best
        if kept:
            soup.add(state)
            kept_so_far.append(candidate)
            best = accuracy
        steps.append(Step(candidate.folder, accuracy, kept))
    return soup, steps


def uniform_soup(judge: SoupJudge, candidates: list[Candidate]) -> tuple[StateSum, list[Step]]:
    soup = StateSum()
    for candidate in candidates:
        soup.add(candidate.state())
    accuracy = judge.val_acc(soup.mean(), reestimates(candidates))
    return soup, [Step(c.folder, accuracy, kept=True) for c in candidates]


# Writing it -----------------------------------------------------------------------------------


def soup_checkpoint(reference: Candidate, state: dict[str, Any], info: dict) -> dict:
    """The best job's checkpoint (config, data statistics, versions) with the soup's weights
    and without that job's training state, which belongs to no soup."""
    from posttrain.checkpoints import SOUP_KEY, load_checkpoint

    checkpoint = load_checkpoint(reference.checkpoint, key="checkpoint")
    for key in TRAINING_ONLY_KEYS:
        checkpoint.pop(key, None)
    return {**checkpoint, "state_dict": state, SOUP_KEY: info}


def write_soup(folder: Path, checkpoint: dict, record: dict[str, Any]) -> None:
    import io

    from posttrain.checkpoints import write_atomically
    from posttrain.runs import write_json

    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    # The record goes first and comes back last: a kill in between leaves a soup.ckpt without
    # a metrics.json (an unfinished soup), never a record describing another soup.ckpt.
    (folder / "metrics.json").unlink(missing_ok=True)
    write_atomically(buffer.getbuffer(), folder / "checkpoints" / "soup.ckpt")
    write_json(folder / "metrics.json", record)


def check_soup_folder_is_free(folder: Path, replace: bool) -> None:
    """A made soup is kept: evaluations and runs started from its soup.ckpt name that file,
    and a second soup of a sweep that has changed since would replace it without a word."""
    from posttrain.report import read_record

    record = folder / "metrics.json"
    if replace or not record.is_file():
        return  # nothing there, or a soup stopped before its record (it holds no result)
    made, what = read_record(record), "(its metrics.json is unreadable)"
    ingredients = made.get("ingredients") if isinstance(made, dict) else None
    if isinstance(made, dict) and isinstance(ingredients, list) and is_number(made.get("val/acc")):
        what = f"of {len(ingredients)} job(s), val/acc {made['val/acc']:.4f}"
    raise PosttrainError(
        f"{folder} already holds a soup {what}; making it again would replace its soup.ckpt "
        "and metrics.json, which evaluations and runs started from that file name. Pass "
        "`--replace` to make it again from the sweep as it is now, or copy the folder away "
        "first to keep both."
    )


def job_name(folder: str) -> str:
    """`job 4` for Hydra's `4_<overrides>` folders (the report lists the overrides)."""
    number = folder.split("_", 1)[0]
    return f"job {number}" if number.isdigit() else folder


def summary(record: dict[str, Any], folder: Path, best: Candidate) -> str:
    """The one paragraph the console shows."""
    chosen = ", ".join(job_name(job) for job in record["ingredients"])
    reference = job_name(best.folder)
    limits = ", ".join(f"{k}={v}" for k, v in record["scored_with_trainer"].items())
    test = (
        f"test/acc {record['test/acc']:.4f}"
        if "test/acc" in record
        else "no test (its jobs ran with trainer.limit_test_batches=0)"
    )
    statistics = (
        "BatchNorm statistics re-estimated on the training images"
        if record["bn_reestimated"]
        else "BatchNorm statistics kept (every ingredient's recipe froze them)"
    )
    return (
        f"posttrain.soup: {record['recipe']} soup of {len(record['ingredients'])} of "
        f"{record['candidates']} compatible jobs ({chosen}): val/acc {record['val/acc']:.4f}, "
        f"{test}; the best single job ({reference}) had val/acc_best "
        f"{best.val_acc_best:.4f}. {len(record['refused'])} job(s) refused. {statistics}; "
        f"scored with {reference}'s data, method, batch limits and precision ({limits}) in "
        f"{record['seconds']:.1f} s. Wrote "
        f"{folder / 'checkpoints' / 'soup.ckpt'} and metrics.json; the sweep report lists it."
    )


def make_soup(
    sweep_dir: str | Path, recipe: str = "greedy", replace: bool = False
) -> dict[str, Any]:
    """Choose, average, score and write the soup of the multirun in `sweep_dir`; a soup
    already made there is replaced only when asked (`replace`)."""
    from posttrain.errors import require_choice
    from posttrain.report import write_report

    require_choice("--recipe", recipe, RECIPES)
    started = time.time()
    sweep = Path(sweep_dir)
    selection = select(sweep)
    require_soupable(selection, sweep)
    for line in selection.refused:
        print(f"refused {line}", flush=True)
    folder = sweep / f"soup_{recipe}"
    check_soup_folder_is_free(folder, replace)
    reference = selection.candidates[0]
    judge = SoupJudge(reference, folder)
    check_same_images(selection.candidates, judge.datamodule.listing, sweep)
    cook = greedy_soup if recipe == "greedy" else uniform_soup
    soup, steps = cook(judge, selection.candidates)
    ingredients = [step.job for step in steps if step.kept]
    reestimated = reestimates(c for c in selection.candidates if c.folder in ingredients)
    judge.load(soup.mean(), reestimated)
    state = copy.deepcopy(judge.method.state_dict())  # extra states (`*._extra_state`) too
    metrics = {**judge.score("val"), **judge.score("test")}
    record = {
        "status": "completed",
        "recipe": recipe,
        **metrics,
        **({} if "test/acc" in metrics else {"tested": NOT_TESTED}),
        "ingredients": ingredients,
        "candidates": len(selection.candidates),
        "steps": [vars(step) for step in steps],
        "refused": selection.refused,
        "scored_with": reference.folder,
        "scored_with_trainer": {k: judge.settings[k] for k in SCORING_KEYS},
        "bn_reestimated": reestimated,
        "seconds": round(time.time() - started, 2),
    }
    info = {"recipe": recipe, "ingredients": ingredients, "sweep": str(sweep)}
    write_soup(folder, soup_checkpoint(reference, state, info), record)
    write_report(sweep)
    print(summary(record, folder, reference), flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m posttrain.soup",
        description="Average the weights of a sweep's compatible completed jobs (model soup).",
    )
    parser.add_argument("sweep_dir", help="a Hydra multirun folder (its hydra.sweep.dir)")
    parser.add_argument("--recipe", choices=RECIPES, default="greedy")
    parser.add_argument(
        "--replace", action="store_true", help="make the soup again over one made before"
    )
    args = parser.parse_args(argv)
    try:
        make_soup(args.sweep_dir, args.recipe, args.replace)
    except PosttrainError as error:
        print(f"\n{error}\n", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
