"""Every option of every config group composes, and what it sets is what runs.

Not only "the keys exist": each option's values reach the composed config, each
instantiable piece (`reg`, `model`, `data`, `method`, `optimizer`, `scheduler`, `trainer`,
`logger`, `callbacks`) is built with `hydra.utils.instantiate` (offline) and a knob set on
the command line is checked on the built object, and each experiment recipe sets what its
opening comment says.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from posttrain.checks import TRAIN_KEYS
from posttrain.resume import flat_leaves
from tests.conftest import CONF, compose_config, run_cli
from tests.fixtures import write_image_folder

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, f.stem) for group in GROUPS for f in sorted((CONF / group).glob("*.yaml"))]


def options(group: str) -> list[str]:
    return [option for g, option in OPTIONS if g == group]


def lookup(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        assert isinstance(node, dict) and part in node, f"`{dotted}` missing from the config"
        node = node[part]
    return node


def test_all_required_groups_exist() -> None:
    required = {"data", "model", "method", "reg", "trainer", "logger", "callbacks", "paths"}
    assert required | {"experiment"} <= set(GROUPS) | {"hydra"}
    assert (CONF / "hydra" / "default.yaml").is_file()


# compose_config points these at the test's folder.
REWRITTEN_BY_THE_FIXTURE = {"paths.output_dir", "paths.log_dir", "paths.data_dir"}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_option_composes_and_its_values_are_applied(make_config, group: str, option: str) -> None:
    """Every value the option file sets is in the composed config, at its place."""
    cfg = make_config(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert set(cfg) <= TRAIN_KEYS, "train.py would refuse its own option's top-level key"
    composed = OmegaConf.to_container(cfg, resolve=False)
    path = CONF / group / f"{option}.yaml"
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    own.pop("defaults", None)
    own.pop("hydra", None)  # hparams_search: checked in its own test below
    is_global = "@package _global_" in path.read_text().split("\n\n")[0]
    expected = flat_leaves(own if is_global else {group: own}, keep_empty=True)
    if not own and not is_global:
        assert composed[group] == {}, f"{group}={option} should select nothing"
    for key, value in expected.items():
        if key not in REWRITTEN_BY_THE_FIXTURE:
            assert lookup(composed, key) == value, f"{group}={option}: {key}"


def test_every_option_file_opens_with_a_comment() -> None:
    for group, option in OPTIONS:
        first = (CONF / group / f"{option}.yaml").read_text().splitlines()[0]
        assert first.startswith("#"), f"conf/{group}/{option}.yaml should open with a comment"


def test_eval_config_composes(make_config, tmp_path: Path) -> None:
    cfg = make_config(f"ckpt_path={tmp_path / 'x.ckpt'}", name="eval")
    assert cfg.ckpt_path.endswith("x.ckpt")
    assert cfg.task_name == "eval"


# --- reg: every option instantiates, and every knob reaches the regularizer -------------------

# A value unlike each knob's default; a new knob must be added here (the test says so).
NEW_KNOB_VALUES: dict[str, Any] = {
    "weight": 0.123,
    "include_1d": True,
    "alpha": 0.345,
    "beta": 0.0456,
    "switch_prob": 0.25,
    "p": 0.25,
    "epsilon": 0.15,
    "patience": 7,
    "monitor": "val/loss",
    "mode": "min",
    "policy": "randaugment",
    "translate": 0.25,
    "flip": True,
    "magnitude": 5,
    "num_ops": 3,
    "decay": 0.9,
    "start_epoch": 3,
    "start": "weights.pt",
}
# Where a knob is kept under another name on the object.
KNOB_ATTRIBUTES = {("label_smoothing", "epsilon"): "label_smoothing"}
REG_OPTIONS = [o for o in options("reg") if o != "none"]


@pytest.mark.parametrize("option", REG_OPTIONS)
def test_reg_option_instantiates_with_its_knobs(tmp_path: Path, option: str) -> None:
    defaults = OmegaConf.load(CONF / "reg" / f"{option}.yaml")[option]
    knobs = [k for k in defaults if k != "_target_"]
    missing = [k for k in knobs if k not in NEW_KNOB_VALUES]
    assert not missing, f"add a test value for reg.{option}.{missing} to NEW_KNOB_VALUES"
    overrides = [f"reg.{option}.{k}={NEW_KNOB_VALUES[k]}" for k in knobs]
    cfg = compose_config(tmp_path, [f"reg={option}", *overrides])
    (regularizer,) = [instantiate(entry) for entry in cfg.reg.values()]
    assert type(regularizer).__name__ == defaults._target_.rsplit(".", 1)[1]
    for knob in knobs:
        attribute = KNOB_ATTRIBUTES.get((option, knob), knob)
        assert getattr(regularizer, attribute) == NEW_KNOB_VALUES[knob], f"reg.{option}.{knob}"


def test_reg_none_selects_nothing_and_a_list_selects_each(tmp_path: Path) -> None:
    assert dict(compose_config(tmp_path, ["reg=none"]).reg) == {}
    cfg = compose_config(tmp_path, ["reg=[dropout,l2,augment]", "reg.l2.weight=0.5"])
    built = {name: instantiate(entry) for name, entry in cfg.reg.items()}
    assert sorted(built) == ["augment", "dropout", "l2"] and built["l2"].weight == 0.5


# --- model: every option builds a classifier whose head is sized to the data ------------------

# A knob of each model option and how it shows on the built model.
MODEL_KNOBS = {
    "small_cnn": ("model.width=8", lambda m: m.head.in_features == 4 * 8),
    "convnet4": ("model.hidden=8", lambda m: m.head.in_features == 8),
    "resnet18": ("model.small_input=true", lambda m: m.features.conv1.kernel_size == (3, 3)),
    "resnet50": ("model.small_input=true", lambda m: m.features.conv1.kernel_size == (3, 3)),
}


@pytest.mark.parametrize("option", options("model"))
def test_model_option_builds_a_head_sized_to_the_data(tmp_path: Path, option: str) -> None:
    assert option in MODEL_KNOBS, f"add model={option} to MODEL_KNOBS"
    knob, shows = MODEL_KNOBS[option]
    fake = ["data=fake", "data.options.num_classes=7", "data.options.channels=2"]
    cfg = compose_config(tmp_path, [f"model={option}", *fake, knob, "model.channels_last=true"])
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    assert model.head.out_features == 7
    assert model.eval()(torch.zeros(2, 2, 32, 32)).shape == (2, 7)  # 2 input channels work
    assert shows(model), knob
    first_conv = next(p for p in model.parameters() if p.ndim == 4)
    assert first_conv.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("option", "override", "named"),
    [
        # Overridden by the data's sizes: a 10-way, 1-channel model trained all the same.
        ("small_cnn", "+model.num_classes=5", "model.num_classes"),
        ("small_cnn", "+model.in_channels=3", "model.in_channels"),
        # Tracebacks from nn.Conv2d; a truthy string took the 3x3 stem.
        ("small_cnn", "model.width=2.5", "model.width"),
        ("convnet4", "model.hidden=0", "model.hidden"),
        ("resnet18", "model.small_input=no", "model.small_input"),
    ],
)
def test_model_knob_that_would_not_apply_is_refused(
    tmp_path: Path, option: str, override: str, named: str
) -> None:
    from posttrain.errors import PosttrainError
    from posttrain.runs import build_components, find_user_error

    cfg = compose_config(tmp_path, [f"model={option}", override])
    with pytest.raises(Exception) as refused:
        build_components(cfg)
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError) and f"`{named}" in str(error), refused.value


# --- data: every option builds its DataModule offline, with the classes and channels it claims -

# (classes a model head must predict, input channels); imagefolder options read a fixture.
DATA_SHAPES = {
    "digits": (10, 1),
    "fake": (10, 3),
    "cifar10": (10, 3),
    "cifar100": (100, 3),
    "imagefolder": (3, 3),
    "episodes_digits": (5, 1),
    "episodes_imagefolder": (5, 3),
    "omniglot": (5, 1),
}


@pytest.mark.parametrize("option", options("data"))
def test_data_option_builds_with_its_classes_and_channels(tmp_path: Path, option: str) -> None:
    assert option in DATA_SHAPES, f"add data={option} to DATA_SHAPES"
    overrides = [f"data={option}"]
    if "imagefolder" in option:
        write_image_folder(tmp_path / "images", classes=3)  # episodes: read only at setup
        overrides.append(f"data.root={tmp_path / 'images'}")
    cfg = compose_config(tmp_path / "run", overrides)
    data = instantiate(cfg.data)  # no prepare_data/setup: nothing is downloaded
    assert (data.num_classes, data.in_channels) == DATA_SHAPES[option]
    if "batch_size" in cfg.data:
        cfg = compose_config(tmp_path / "run", [*overrides, "data.batch_size=13"])
        assert instantiate(cfg.data).batch_size == 13


# --- method: every option instantiates its LightningModule with its settings --------------------

METHODS = {
    "supervised": ([], "SupervisedClassifier", "optimizer", None),
    "finetune": (["method.finetune.backbone_lr_factor=0.25"], "SupervisedClassifier",
                 "finetune", lambda h: h["backbone_lr_factor"] == 0.25),
    "maml": (["data=episodes_digits", "model=convnet4", "method.inner_lr=0.123"],
             "EpisodicLearner", "inner_lr", lambda v: v == 0.123),
    "protonet": (["data=episodes_digits", "model=convnet4"], "EpisodicLearner",
                 "algorithm", lambda v: v == "protonet"),
    "multitask": (["experiment=digits_multitask", "method.weighting=dwa"],
                  "MultiTaskClassifier", "weighting", lambda v: v == "dwa"),
    # The teacher file is read when fitting starts, not when the method is built.
    "distill": (["method.teacher=teacher.ckpt", "method.temperature=2.5"], "Distillation",
                "temperature", lambda v: v == 2.5),
}  # fmt: skip


@pytest.mark.parametrize("option", options("method"))
def test_method_option_instantiates_with_its_settings(tmp_path: Path, option: str) -> None:
    from posttrain.regularizers import RegularizerSet

    assert option in METHODS, f"add method={option} to METHODS"
    overrides, cls, key, check = METHODS[option]
    if option == "finetune":  # it needs something to fine-tune
        weights = tmp_path / "weights.pt"
        torch.save(
            instantiate(
                compose_config(tmp_path, []).model, num_classes=10, in_channels=1
            ).state_dict(),
            weights,
        )
        overrides = [*overrides, f"model.pretrained={weights}"]
    cfg = compose_config(tmp_path, [f"method={option}", *overrides, "optimizer.lr=0.0123"])
    data = instantiate(cfg.data)
    model = instantiate(cfg.model, num_classes=data.num_classes, in_channels=data.in_channels)
    method = instantiate(cfg.method, model=model, regularizers=RegularizerSet(), _convert_="all")
    assert type(method).__name__ == cls
    assert method.hparams.optimizer["lr"] == 0.0123  # `${optimizer}` reaches the method
    if check is not None:
        assert check(method.hparams[key]), f"method={option}: {key}={method.hparams[key]}"


# --- optimizer and scheduler: built as the methods build them ----------------------------------

OPTIMIZERS = {"sgd": (torch.optim.SGD, "momentum", 0.9), "adam": (torch.optim.Adam, "betas",
              (0.9, 0.999)), "adamw": (torch.optim.AdamW, "betas", (0.9, 0.999))}  # fmt: skip


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizer_option_builds_its_torch_optimizer(tmp_path: Path, option: str) -> None:
    from posttrain.methods.optim import build_optimizer

    assert option in OPTIMIZERS, f"add optimizer={option} to OPTIMIZERS"
    torch_class, key, value = OPTIMIZERS[option]
    cfg = compose_config(tmp_path, [f"optimizer={option}", "optimizer.lr=0.0123"])
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model.named_parameters(), OmegaConf.to_container(cfg.optimizer))
    assert type(optimizer) is torch_class
    for group in optimizer.param_groups:
        assert group["lr"] == 0.0123
        assert (tuple(group[key]) if key == "betas" else group[key]) == value


def lr_curve(scheduler_config: dict[str, Any], steps: int, per_epoch: int) -> list[float]:
    """The learning rate of each step, stepping the scheduler at its interval."""
    from posttrain.methods.optim import build_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    built = build_scheduler(optimizer, scheduler_config, steps, per_epoch)
    curve = []
    for step in range(steps):
        curve.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if built and (built["interval"] == "step" or (step + 1) % per_epoch == 0):
            built["scheduler"].step()
    return curve


@pytest.mark.parametrize("option", options("scheduler"))
def test_scheduler_option_shapes_the_learning_rate(tmp_path: Path, option: str) -> None:
    knobs = {
        "cosine": ["scheduler.warmup_epochs=2"],
        "step": ["scheduler.step_size=3", "scheduler.gamma=0.5"],
        "none": [],
    }
    assert option in knobs, f"add scheduler={option} here"
    cfg = compose_config(tmp_path, [f"scheduler={option}", *knobs[option]])
    curve = lr_curve(OmegaConf.to_container(cfg.scheduler), steps=40, per_epoch=4)
    if option == "none":
        assert curve == [1.0] * 40
    elif option == "step":  # halved every 3 epochs of 4 steps
        assert curve[::4] == pytest.approx([0.5 ** (epoch // 3) for epoch in range(10)])
    else:  # linear warm-up over 2 epochs (8 steps), then cosine down to 0
        assert curve[:8] == pytest.approx([(s + 1) / 8 for s in range(8)])
        assert curve[8] == pytest.approx(1.0) and curve[-1] < 0.01
        assert all(a >= b for a, b in itertools.pairwise(curve[8:]))


# --- trainer, logger, callbacks ------------------------------------------------------------------


@pytest.mark.parametrize("option", options("trainer"))
def test_trainer_option_instantiates_its_trainer(tmp_path: Path, option: str) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    overrides = [f"trainer={option}", "trainer.max_epochs=3", "trainer.precision=bf16-mixed"]
    cfg = compose_config(tmp_path, overrides)
    if option == "gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1
        if not torch.cuda.is_available():
            pytest.skip("trainer=gpu instantiates only with a CUDA device")
    if option == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
        cfg.trainer.accelerator = "cpu"  # instantiating starts no process
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert trainer.max_epochs == 3 and trainer.precision == "bf16-mixed"
    assert trainer.default_root_dir == str(tmp_path)
    assert isinstance(trainer.strategy, DDPStrategy) == (option == "ddp")
    if option == "cpu":
        assert type(trainer.accelerator).__name__ == "CPUAccelerator"


@pytest.mark.parametrize("option", options("logger"))
def test_logger_option_writes_into_the_run_folder(tmp_path: Path, option: str) -> None:
    from posttrain.runs import instantiate_named

    loggers = instantiate_named(compose_config(tmp_path, [f"logger={option}"]).logger, "logger")
    names = {"csv": ["ResumableCSVLogger"], "tensorboard": ["TensorBoardLogger"], "none": []}
    assert [type(logger).__name__ for logger in loggers] == names[option]
    for logger in loggers:
        assert Path(logger.save_dir) == tmp_path and logger.name == option


@pytest.mark.parametrize("option", options("callbacks"))
def test_callbacks_option_instantiates_callbacks(tmp_path: Path, option: str) -> None:
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from posttrain.runs import instantiate_named

    cfg = compose_config(tmp_path, [f"callbacks={option}"])
    callbacks = instantiate_named(cfg.callbacks, "callbacks")
    assert len(callbacks) == len([v for v in cfg.callbacks.values() if v])
    assert all(isinstance(callback, Callback) for callback in callbacks)
    checkpoints = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    if option == "default":  # best.ckpt by val/acc, and last.ckpt after every epoch
        best, last = checkpoints
        assert (best.monitor, best.mode, best.filename) == ("val/acc", "max", "best")
        assert (last.monitor, last.filename, last.every_n_epochs) == (None, "last", 1)
        assert {Path(c.dirpath) for c in checkpoints} == {tmp_path / "checkpoints"}


# --- experiment recipes: what each one's opening comment says -----------------------------------

EXPERIMENTS: dict[str, dict[str, Any]] = {
    # ImageNet ResNet-50, new 10-way head, CIFAR-10 at 224 px, crop+flip, SGD + momentum with
    # warm-up and cosine, mixed precision on a GPU.
    "cifar10_resnet50_finetune": {
        "data.dataset": "cifar", "data.options.classes": 10, "model.arch": "resnet50",
        "model.pretrained": "imagenet", "data.image_size": 224, "reg.augment.flip": True,
        "optimizer.name": "sgd",
        "optimizer.momentum": 0.9, "scheduler.name": "cosine", "scheduler.warmup_epochs": 1,
        "trainer.accelerator": "auto", "trainer.precision": "16-mixed",
        "method.finetune.policy": "full",
    },
    # ResNet-18 on 10 digits per class, 150 epochs.
    "digits_lowdata": {
        "model.arch": "resnet18", "data.dataset": "digits", "data.samples_per_class": 10,
        "trainer.max_epochs": 150,
    },
    # MAML / ProtoNet, 5-way few-shot on embedded digits (offline).
    "digits_maml": {
        "method.algorithm": "maml", "data.dataset": "digits", "data.ways": 5,
        "data.download": False, "model.arch": "convnet4",
    },
    "digits_protonet": {
        "method.algorithm": "protonet", "data.dataset": "digits", "data.ways": 5,
        "data.download": False, "model.arch": "convnet4",
    },
    # Three tasks on one backbone: digit (10-way), parity, >= 5; the first is the main one.
    "digits_multitask": {
        "method._target_": "posttrain.methods.multitask.MultiTaskClassifier",
        "data.targets": {"digit": {"target": "label"}, "parity": {"target": "parity"},
                         "large": {"target": "large"}},
    },
    # Pretrain the small CNN on digits 0-4.
    "digits_pretrain": {"model.arch": "small_cnn", "data.classes": [0, 1, 2, 3, 4]},
    # ResNet-18 (CIFAR-style stem) on digits upsampled to 32x32, SGD + cosine.
    "digits_resnet18": {
        "model.arch": "resnet18", "model.small_input": True, "data.image_size": 32,
        "optimizer.name": "sgd", "scheduler.name": "cosine",
    },
    # Fine-tune the digits 0-4 model on digits 5-9 with K labels per class.
    "digits_transfer": {
        "method.finetune.policy": "full", "data.classes": [5, 6, 7, 8, 9],
        "data.samples_per_class": 5, "model.arch": "small_cnn",
    },
    # Omniglot 5-way 1-shot, the papers' hyper-parameters.
    "omniglot_maml": {
        "data.dataset": "omniglot", "data.split": "vinyals",
        "data.ways": 5, "data.shots": 1, "method.algorithm": "maml",
        "method.inner_steps": 1, "method.inner_lr": 0.4, "data.meta_batch_size": 32,
        "optimizer.name": "adam", "optimizer.lr": 0.001, "method.eval_inner_steps": 3,
    },
    "omniglot_protonet": {
        "data.dataset": "omniglot", "data.split": "vinyals",
        "data.ways": 5, "data.shots": 1, "data.train_ways": 60,
        "method.algorithm": "protonet", "optimizer.name": "adam", "optimizer.lr": 0.001,
        "scheduler.name": "step", "scheduler.gamma": 0.5, "data.train_episodes": 2000,
    },
}  # fmt: skip


@pytest.mark.parametrize("option", options("experiment"))
def test_experiment_recipe_sets_what_its_comment_says(make_config, option: str) -> None:
    assert option in EXPERIMENTS, f"add experiment={option} and its claims to EXPERIMENTS"
    cfg = make_config(f"experiment={option}")
    composed = OmegaConf.to_container(cfg, resolve=False)
    for key, value in EXPERIMENTS[option].items():
        assert lookup(composed, key) == value, f"experiment={option}: {key}"


def test_transfer_recipe_demands_pretrained_weights(make_config) -> None:
    """Observed: `model.pretrained: ???` in the recipe lost to the model's `null` in Hydra's
    merge, so the recipe trained from scratch without a word. `method=finetune` now
    refuses to start without weights, before any work."""
    from posttrain.errors import PosttrainError
    from posttrain.runs import build_components, find_user_error

    with pytest.raises(Exception) as refused:
        build_components(make_config("experiment=digits_transfer"))
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError) and "model.pretrained" in str(error)


def test_hparams_search_tunes_keys_that_exist(tmp_path: Path) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg: DictConfig = compose(
            "train", overrides=["hparams_search=reg_optuna"], return_hydra_config=True
        )
    GlobalHydra.instance().clear()
    sweeper = cfg.hydra.sweeper
    assert sweeper.direction == "maximize" and cfg.optimized_metric == "val/acc_best"
    assert set(sweeper.params) == {"reg.dropout.p", "reg.l2.weight"}
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key) is not None, f"the search tunes a missing key {key}"


def test_a_top_level_key_nothing_reads_is_refused(make_config) -> None:
    """Observed: `python train.py +tta=flip` trained and tested without test-time
    augmentation (only eval.py applies it), and `+anything=1` was kept in the config."""
    from posttrain.checks import check_train_keys
    from posttrain.errors import PosttrainError

    check_train_keys(make_config())
    with pytest.raises(PosttrainError, match=r"`tta` is an option of eval\.py"):
        check_train_keys(make_config("+tta=flip"))
    with pytest.raises(PosttrainError, match="no config key `anything`"):
        check_train_keys(make_config("+anything=1"))


def slurm_launcher(*overrides: str) -> dict[str, Any]:
    """`hydra.launcher` of `python train.py hydra/launcher=slurm <overrides>`, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True
        )
    GlobalHydra.instance().clear()
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize(
    ("overrides", "tasks", "gpus"),
    [
        (["trainer=ddp", "trainer.devices=4"], 4, 4),
        (["trainer=gpu"], 1, 1),
        (["trainer=cpu"], 1, 0),  # a CPU job requested a GPU
        (["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"], 2, 0),
        (["trainer=ddp", "trainer.devices=[0,1]"], 2, 2),
    ],
)
def test_slurm_launcher_asks_for_gpus_only_for_gpu_jobs(overrides, tasks: int, gpus: int) -> None:
    launcher = slurm_launcher(*overrides)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"]) == (tasks, gpus)
    assert launcher["nodes"] == 1


def test_slurm_launcher_refuses_a_device_count_it_cannot_ask_for(tmp_path: Path) -> None:
    """Observed: the CLI printed a 40-line OmegaConf resolver traceback from inside the
    launcher; the sweep now stops in one paragraph before anything is submitted."""
    with pytest.raises(Exception, match=r"trainer.devices.*hydra/launcher=slurm"):
        slurm_launcher("trainer=ddp", "trainer.devices=auto")
    result = run_cli(
        "train.py", "-m", "hydra/launcher=slurm", "trainer.devices=auto", "seed=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert result.returncode == 2
    assert "posttrain: error: `trainer.devices`='auto'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "sweep").exists() or not any((tmp_path / "sweep").iterdir())


def fake_slurm(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`sbatch`/`srun` that keep the submitted script and refuse it: what a sweep asks for."""
    folder.mkdir()
    log = folder / "submitted.sh"
    for command in ("sbatch", "srun"):
        (folder / command).write_text('#!/bin/sh\ncat "$@" >> "$SBATCH_LOG"\nexit 1\n')
        (folder / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_LOG", str(log))
    return log


@pytest.mark.parametrize(
    ("swept", "needed"),
    [
        (["trainer=ddp", "trainer.devices=2,4"], "tasks_per_node=4, gpus_per_node=4"),
        (["trainer=ddp", "trainer.num_nodes=1,2"], "nodes=2"),
        (["trainer=default,cpu"], "tasks_per_node=1, gpus_per_node=0"),
    ],
)
def test_a_slurm_sweep_whose_jobs_need_different_requests_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swept: list[str], needed: str
) -> None:
    """Observed: hydra-submitit-launcher submits a sweep as one job array with the sweep's
    request, so `-m trainer=ddp trainer.devices=2,4` asked for 2 tasks and 2 GPUs per node
    for the 4-device job too (`trainer.accelerator=cpu,gpu`: GPUs for the CPU job)."""
    submitted = fake_slurm(tmp_path / "bin", monkeypatch)
    result = run_cli(
        "train.py", "-m", "hydra/launcher=slurm", *swept, "seed=1",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "asks SLURM once for all jobs of a sweep" in result.stderr and needed in result.stderr
    assert "Traceback" not in result.stderr and not submitted.exists()


def test_a_slurm_sweep_of_one_request_is_submitted_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    submitted = fake_slurm(tmp_path / "bin", monkeypatch)
    run_cli(
        "train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
        "seed=1,2,3", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    )  # fmt: skip
    script = submitted.read_text()  # the fake sbatch refused it: the sweep stops there
    assert "#SBATCH --array=0-2" in script and "#SBATCH --ntasks-per-node=4" in script
    assert "#SBATCH --gpus-per-node=4" in script
