"""Config values checked before any work, each refusal one paragraph naming the key.

Hydra passes `trainer.*` and `seed` through untyped, so `trainer.max_epochs=abc` reached
Lightning and failed deep inside it (or mid-run); precision 64 failed at the first batch
(float data into a double model). These checks run first, in every entry point.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning.pytorch.callbacks import Callback

from posttrain.errors import PosttrainError, is_number, require, require_choice

# Precisions posttrain runs (Lightning's names); the data pipeline makes float32 batches,
# which the mixed and float32 modes take as they are.
PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "16-mixed", "16")
CPU_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16")
WHOLE_NUMBERS = {
    "trainer.max_epochs": -1,  # minimum accepted value (-1: unlimited, Lightning's convention)
    "trainer.max_steps": -1,
    "trainer.log_every_n_steps": 1,
    "trainer.num_sanity_val_steps": -1,
    "trainer.accumulate_grad_batches": 1,
    "trainer.num_nodes": 1,
    "trainer.check_val_every_n_epoch": 1,  # 0 divided by zero at the first epoch's end
}
# The seeds numpy accepts (`seed_everything` failed with a traceback outside them).
SEED_RANGE = (0, 2**32 - 1)


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole_numbers(values: dict[str, Any]) -> None:
    for key, minimum in WHOLE_NUMBERS.items():
        value = values.get(key)
        if value is None:
            continue
        require(
            is_whole(value) and value >= minimum,
            f"Config key `{key}` must be a whole number >= {minimum}, got {value!r}.",
        )


def check_deterministic(trainer: dict[str, Any]) -> None:
    """Lightning takes any value: another string (`no`, `off`) or a number was truthy and
    switched on half of it (the cuDNN flags, not `torch.use_deterministic_algorithms`)."""
    value = trainer.get("deterministic")
    require(
        value is None or isinstance(value, bool) or value == "warn",
        f"Config key `trainer.deterministic` is {value!r}; valid: true (deterministic "
        "algorithms, an error where one has none), warn (the same, a warning instead), false "
        "or null (PyTorch's defaults).",
    )


def check_batch_limits(trainer: dict[str, Any]) -> None:
    for split in ("train", "val", "test"):
        key, value = f"limit_{split}_batches", trainer.get(f"limit_{split}_batches")
        require(
            value is None
            or (is_whole(value) and value >= 0)
            or (isinstance(value, float) and 0.0 <= value <= 1.0),
            f"Config key `trainer.{key}` must be a number of batches (0, 1, 2, ...) or a "
            f"fraction in [0.0, 1.0], got {value!r}.",
        )


def batch_limit(limit: int | float | None, batches: int) -> int:
    """How many batches Lightning's `limit_<split>_batches` lets a split of `batches` run
    (a whole number caps it; a fraction is rounded down, as Lightning does)."""
    if limit is None:
        return batches
    if isinstance(limit, int):
        return min(batches, limit)
    return int(batches * limit)


def process_batches(loader: Any, world_size: int) -> int:
    """Batches one process gets from `loader`, the fewest any process gets: under DDP
    Lightning's distributed sampler gives each process ceil(N / world) items (padded, the
    training split); validation and test shares are unpadded (`evaluation_sampler`), the
    smallest floor(N / world). The limit applies to that share; every process computes the
    same number, so all refuse together."""
    from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler

    size = getattr(loader, "batch_size", None)
    if world_size <= 1 or not size:
        return len(loader)
    if isinstance(getattr(loader, "sampler", None), UnrepeatedDistributedSampler):
        return math.ceil(len(loader.dataset) // world_size / size)
    return math.ceil(math.ceil(len(loader.dataset) / world_size) / size)


class RefuseEmptySplits(Callback):
    """At set-up (data ready, no step taken) refuses a `trainer.limit_<split>_batches` that
    leaves a split the run uses no batches.

    `check_batch_limits` can only see the value: 0.5 is a valid fraction until the split turns
    out to be one batch, where Lightning rounds it to 0 and stopped with a traceback (fitting),
    or a finished training died in calibration (`torch.cat` of nothing) or in its test. A
    split in `runs` may be switched off with an explicit 0 (`limit_test_batches=0`: train
    without a test); a split in `needs` may not, and each says why it is needed.
    """

    def __init__(self, runs: Iterable[str], needs: dict[str, str] | None = None) -> None:
        self.needs = dict(needs or {})
        self.splits = [*dict.fromkeys([*runs, *self.needs])]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        datamodule = trainer.datamodule
        for split in self.splits:
            limit = getattr(trainer, f"limit_{split}_batches")
            if limit == 0 and split not in self.needs:
                continue  # switched off on purpose; nothing reads its numbers
            loader = getattr(datamodule, f"{split}_dataloader")()
            batches = process_batches(loader, trainer.world_size)
            if batches == 0 or batch_limit(limit, batches) > 0:
                continue  # an empty split is the DataModule's to refuse, naming its own key
            raise PosttrainError(empty_split_message(split, limit, batches, loader, self.needs))


class RefuseInputsTheModelCannotTake(Callback):
    """At set-up (data loaded, model on the CPU, no step taken) one forward of the backbone on
    two blank images of the data's input shape. Observed: `experiment=digits_protonet
    data.image_size=8` (convnet4 halves the side four times) ended in torch's "Output size is
    too small" traceback at the first training step."""

    LARGEST_TRIED = 128  # sides tried when looking for the smallest one the model takes

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        datamodule = trainer.datamodule
        channels, height, width = datamodule.input_shape()
        features = pl_module.model.features
        problem = forward_problem(features, channels, height, width)
        if problem is None:
            return
        smallest = next(
            (side for side in range(max(height, width) + 1, self.LARGEST_TRIED + 1)
             if forward_problem(features, channels, side, side) is None),
            None,
        )  # fmt: skip
        if smallest is None:
            return  # not the size (no larger one helps): the run shows what it is
        from posttrain.console import hydra_choices

        model = hydra_choices().get("model")
        named = f"`model={model}`" if model else "the model"
        size = datamodule.image_size or "null"
        raise PosttrainError(
            f"Config key `data.image_size={size}` gives the model images of "
            f"{height}x{width} pixels, too small for {named}: its layers shrink them to "
            f"nothing (torch: {problem}). Refused before any training. Valid: "
            f"`data.image_size={smallest}` or larger, or another `model=`."
        )


def forward_problem(features: Any, channels: int, height: int, width: int) -> str | None:
    """What torch says when `features` cannot take blank (2, channels, height, width) inputs,
    or None. Evaluation mode and no gradient: no BatchNorm statistic or weight is touched."""
    import torch

    modes = {module: module.training for module in features.modules()}
    features.eval()
    try:
        with torch.no_grad():  # `forward`, not `__call__`: `model.compile=true` compiled that
            features.forward(torch.zeros(2, channels, height, width))
    except RuntimeError as error:
        return str(error).splitlines()[0]
    finally:
        for module, training in modes.items():
            module.training = training
    return None


def empty_split_message(
    split: str, limit: int | float, batches: int, loader: Any, needs: dict[str, str]
) -> str:
    """One paragraph: the key and value, the split's size, why it is needed, what is valid."""
    key = f"trainer.limit_{split}_batches"
    images = len(getattr(loader, "dataset", ())) or "?"
    size = getattr(loader, "batch_size", None)
    shape = f"{batches} batch(es) of {size}" if size else f"{batches} batch(es)"
    how = "runs none of them" if limit == 0 else f"rounds {limit} x {batches} down to 0"
    why = f" and {needs[split]}" if split in needs else ""
    return (
        f"Config key `{key}={limit}` leaves the {split} split no batches: it has {images} "
        f"images in {shape} per process, and the limit {how}{why}. Refused before any "
        f"training. Valid: a whole number of batches (e.g. `{key}=1`), a fraction of at "
        f"least {1 / batches:.3g}, or `{key}=null` (all {batches})"
        + ("." if split in needs else f", or `{key}=0` to skip the {split} split.")
    )


def check_gradient_clipping(trainer: dict[str, Any]) -> None:
    """Lightning skips clipping for a value <= 0 and for an algorithm without a value, so
    `gradient_clip_val=-1` or `+trainer.gradient_clip_algorithm=value` alone trained unclipped
    without a word; a non-number or another algorithm was a traceback."""
    value = trainer.get("gradient_clip_val")
    algorithm = trainer.get("gradient_clip_algorithm")
    require(
        value is None or (is_number(value) and value >= 0),
        f"Config key `trainer.gradient_clip_val` must be a number > 0 (the largest gradient norm, "
        f"or value with `trainer.gradient_clip_algorithm=value`), or 0/null for no clipping, "
        f"got {value!r}.",
    )
    if algorithm is not None:
        require_choice("trainer.gradient_clip_algorithm", algorithm, ("norm", "value"))
    require(
        algorithm is None or bool(value),
        f"Config key `trainer.gradient_clip_algorithm={algorithm}` takes effect only with a "
        "clipping threshold, and `trainer.gradient_clip_val` is "
        f"{value!r}: set it (e.g. `trainer.gradient_clip_val=1.0`) or drop the algorithm.",
    )


def uses_cpu(trainer: dict[str, Any]) -> bool:
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    return not torch.cuda.is_available()


def check_accelerator(trainer: dict[str, Any]) -> None:
    """`trainer=gpu` on a machine without CUDA ended in Lightning's traceback."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda"):
        import torch

        require(
            torch.cuda.is_available(),
            f"Config key `trainer.accelerator={accelerator}` needs a CUDA GPU, and none is "
            "available here. Use `trainer=cpu` or `trainer.accelerator=auto` (which picks the "
            "GPU when there is one).",
        )


def check_precision(trainer: dict[str, Any]) -> None:
    precision = str(trainer.get("precision", "32-true"))
    require(
        precision in PRECISIONS,
        f"Config key `trainer.precision` is {precision!r}; posttrain runs "
        f"{', '.join(PRECISIONS)} (float32 batches; 64-bit and other modes are not supported).",
    )
    require(
        precision in CPU_PRECISIONS or not uses_cpu(trainer),
        f"Config key `trainer.precision={precision}` needs a GPU, and this run is on the CPU "
        f"(`trainer.accelerator={trainer.get('accelerator', 'auto')}`, no CUDA device "
        f"found). On the CPU use one of {', '.join(CPU_PRECISIONS)}.",
    )


def check_monitored_callbacks(callbacks: dict[str, Any]) -> None:
    """What a `monitor` of `cfg.callbacks` watches, before any training.

    A name no run logs (`val/accuracy`) failed with Lightning's traceback at the end of the
    first epoch. A monitored checkpoint keeping `save_top_k` > 1 (or -1) under one file name
    (`best`) wrote every kept epoch over the same file while Lightning counted k slots, so
    each epoch was saved as if it ranked: `best.ckpt` held the last epoch, tested as the best.
    """
    from posttrain.methods.metrics import check_monitor

    for name, entry in callbacks.items():
        if not isinstance(entry, dict) or entry.get("monitor") is None:
            continue
        check_monitor(f"callbacks.{name}", entry["monitor"], entry.get("mode", "min"))
        top_k, filename = entry.get("save_top_k", 1), str(entry.get("filename") or "")
        if top_k in (0, 1) or "{" in filename or entry.get("enable_version_counter", True):
            continue
        raise PosttrainError(
            f"Config key `callbacks.{name}.save_top_k={top_k}` keeps several checkpoints under "
            f"one file name (`callbacks.{name}.filename={filename}`): each would overwrite the "
            f"last, and `{filename}.ckpt` would hold the latest epoch, tested as the best by "
            f"`{entry.get('monitor')}`. Keep `save_top_k=1`, or give each kept epoch its own "
            f"name, e.g. `\"callbacks.{name}.filename='{filename}-{{epoch}}'\"`."
        )


# The top-level keys of `python train.py`'s config (conf/train.yaml and its groups).
TRAIN_KEYS = frozenset({"task_name", "seed", "ckpt_path", "optimized_metric", "data", "model",
                        "method", "optimizer", "scheduler", "reg", "trainer", "logger",
                        "callbacks", "calibration", "paths"})  # fmt: skip
# Keys of eval.py only, and where they belong instead.
EVAL_ONLY = {"tta": "python eval.py ckpt_path=<run>/checkpoints/best.ckpt tta=flip"}


def check_train_keys(cfg: Any) -> None:
    """A key added with `+key=...` that nothing reads would be accepted and ignored (e.g.
    `+tta=flip`, which only `eval.py` applies)."""
    unknown = sorted(set(cfg) - TRAIN_KEYS)
    if not unknown:
        return
    hints = " ".join(
        f"`{key}` is an option of eval.py: `{EVAL_ONLY[key]}`."
        for key in unknown
        if key in EVAL_ONLY
    )
    raise PosttrainError(
        f"`train.py` has no config key {', '.join(f'`{key}`' for key in unknown)}: nothing "
        f"would read it. {hints} Its top-level keys: {', '.join(sorted(TRAIN_KEYS))}."
    )


def check_run_config(cfg: Any, *, seeded: bool = True) -> None:
    """`seed` (a run that has one: `seeded`) and the `trainer.*` keys Lightning would take
    without checking."""
    from omegaconf import OmegaConf

    if seeded:
        seed = cfg.get("seed")
        low, high = SEED_RANGE
        require(
            is_whole(seed) and low <= seed <= high,
            f"Config key `seed` must be a whole number from {low} to {high}, got {seed!r}.",
        )
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(trainer, dict)
    check_whole_numbers({f"trainer.{key}": value for key, value in trainer.items()})
    check_batch_limits(trainer)
    check_deterministic(trainer)
    check_gradient_clipping(trainer)
    check_accelerator(trainer)
    check_precision(trainer)
    callbacks = cfg.get("callbacks")  # null or {} with callbacks=none
    if callbacks:
        check_monitored_callbacks(OmegaConf.to_container(callbacks, resolve=True))  # type: ignore[arg-type]
