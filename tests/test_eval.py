"""`eval.py` honours what it is asked: data and test-time overrides change the result where
they must, weights come from the checkpoint alone, and what cannot apply is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.evaluate import evaluate, open_overrides
from posttrain.runs import find_user_error
from posttrain.train import train
from tests.conftest import compose_config

CPU = ["logger=none", "trainer.accelerator=cpu", "trainer.devices=1"]
EPISODES = ["data.train_episodes=64", "data.val_episodes=8", "data.image_size=16"]


def trained(folder: Path, *overrides: str) -> Path:
    torch.set_num_threads(1)
    train(compose_config(folder, [*CPU, *overrides]))
    return folder / "checkpoints" / "best.ckpt"


def evaluated(folder: Path, checkpoint: Path, *overrides: str) -> dict[str, float]:
    """As `python eval.py ckpt_path=<checkpoint> <overrides>` would (its argv rewriting too)."""
    arguments = open_overrides([*CPU, f"ckpt_path={checkpoint}", *overrides])
    return evaluate(compose_config(folder, arguments, "eval"))


def refusal(folder: Path, checkpoint: Path, *overrides: str) -> str:
    with pytest.raises(Exception) as refused:
        evaluated(folder, checkpoint, *overrides)
    error = find_user_error(refused.value)
    assert isinstance(error, PosttrainError), refused.value
    return str(error)


@pytest.fixture(scope="module")
def protonet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("protonet") / "run"
    return trained(folder, "experiment=digits_protonet", "model.hidden=16", *EPISODES,
                   "trainer.max_epochs=2")  # fmt: skip


@pytest.mark.slow
def test_shots_and_episodes_overrides_apply(protonet: Path, tmp_path: Path) -> None:
    """Observed: `+data.shots=5` was accepted and the 1-shot number came back."""
    one = evaluated(tmp_path / "1", protonet, "data.test_episodes=200")
    five = evaluated(tmp_path / "5", protonet, "data.test_episodes=200", "data.shots=5")
    assert one["test/episodes"] == five["test/episodes"] == 200
    assert five["test/acc"] > one["test/acc"] + 0.02  # prototypes from 5 images, not 1
    wide = evaluated(tmp_path / "w", protonet, "data.test_episodes=200", "data.ways=10")
    assert wide["test/acc"] < one["test/acc"]  # 10-way is harder than 5-way
    record = json.loads((tmp_path / "5" / "metrics.json").read_text())
    assert record["status"] == "completed"


def test_keys_that_training_fixed_are_refused(protonet: Path, tmp_path: Path) -> None:
    assert "`model`" in refusal(tmp_path / "m", protonet, "+model.width=64")
    assert "method.inner_steps" in refusal(tmp_path / "i", protonet, "method.inner_steps=3")
    assert "none" in refusal(tmp_path / "e", protonet, "method.eval_inner_steps=3")  # ProtoNet


def test_a_seed_is_refused_as_it_changes_nothing(protonet: Path, tmp_path: Path) -> None:
    """Observed: `eval.py seed=7` was accepted, printed `seed 7` in the start statement and
    gave the `seed=0` numbers to the last digit: the test split and episodes are fixed by the
    checkpoint's `data.seed`, and nothing else in an evaluation is random."""
    assert open_overrides(["seed=7"]) == ["+seed=7"]  # eval's paragraph, not Hydra's
    message = refusal(tmp_path / "s", protonet, "seed=7")
    assert "`seed`" in message and "data.seed" in message


@pytest.mark.parametrize(
    ("override", "refused"),
    [
        ("trainer.max_epochs=50", True),
        ("trainer.gradient_clip_val=1.0", True),
        ("trainer.limit_train_batches=2", True),
        ("+trainer.min_epochs=3", True),
        ("trainer.limit_val_batches=2", True),  # no calibration: nothing reads the val split
        ("trainer.limit_test_batches=2", False),
    ],
)
def test_trainer_keys_only_fitting_reads_are_refused(
    protonet: Path, tmp_path: Path, override: str, refused: bool
) -> None:
    """Observed: `eval.py trainer.max_epochs=50` was accepted and measured what the default
    did; a test reads none of the fitting keys."""
    if refused:
        assert f"`{override.split('=')[0].lstrip('+')}` changes nothing" in refusal(
            tmp_path, protonet, override
        )
    else:
        assert evaluated(tmp_path, protonet, override, "data.test_episodes=4")["test/acc"] >= 0


@pytest.mark.parametrize(
    "override",
    ["data.samples_per_class=5", "data.train_episodes=7", "+data.targets.parity.missing=0.5"],
)
def test_data_keys_that_only_choose_training_images_are_refused(
    protonet: Path, tmp_path: Path, override: str
) -> None:
    """Observed: `eval.py data.samples_per_class=5` was accepted and gave the same numbers:
    the subset is drawn from the training pool, and the test split is the checkpoint's."""
    key = override.split("=")[0].lstrip("+")
    assert f"`{key}` changes nothing in eval.py" in refusal(tmp_path, protonet, override)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("supervised") / "run"
    return trained(folder, "model.width=4", "trainer.max_epochs=1", "trainer.limit_train_batches=2")


def test_data_keys_the_test_does_not_read_are_refused(
    protonet: Path, supervised: Path, tmp_path: Path
) -> None:
    """Observed: `eval.py data.batch_size=7 trainer.limit_test_batches=1` tested all 359
    images, one batch of `data.eval_batch_size` (512), and the refusal of other data keys
    named `data.batch_size` a test-time key; `data.val_episodes=7` changed nothing either
    (eval.py runs no validation but to calibrate, which episodic methods refuse)."""
    message = refusal(tmp_path / "b", supervised, "data.batch_size=7")
    assert "`data.batch_size` changes nothing in eval.py" in message
    assert "Test-time data keys: `data.eval_batch_size`" in message
    message = refusal(tmp_path / "v", protonet, "data.val_episodes=7")
    assert "`data.val_episodes` changes nothing in eval.py" in message
    limit = "trainer.limit_test_batches=1"
    tested = evaluated(tmp_path / "e", supervised, "data.eval_batch_size=7", limit)
    assert tested["test/images"] == 7
    # Without `data.eval_batch_size` the test's batches are `data.batch_size`'s: it applies.
    unset = "data.eval_batch_size=null"
    assert (
        evaluated(tmp_path / "n", supervised, "data.batch_size=7", unset, limit)["test/images"] == 7
    )


def test_a_data_key_the_data_does_not_take_is_one_paragraph(protonet: Path, tmp_path: Path) -> None:
    """Observed: eval.py adds the `+` to every `data.*` override, so the typo `data.shot=5`
    reached the DataModule as a keyword: Hydra's "Error executing job ... TypeError",
    exit status 1."""
    message = refusal(tmp_path, protonet, "data.shot=5")
    assert "Config key `data` has unknown option(s) shot; valid: " in message
    assert "shots" in message


def test_too_few_test_classes_advises_only_what_eval_may_change(
    protonet: Path, tmp_path: Path
) -> None:
    """Observed: the advice was `data.rotations=true` or other class fractions, which eval.py
    then refused: the test split is the checkpoint's own."""
    message = refusal(tmp_path, protonet, "data.ways=20")
    assert "The meta-test split has" in message
    assert "Lower `data.ways`, `data.shots` or `data.queries`" in message
    assert "rotations" not in message and "fractions" not in message


@pytest.mark.slow
def test_maml_test_time_steps_apply_and_ways_are_bounded(tmp_path: Path) -> None:
    maml = trained(tmp_path / "run", "experiment=digits_maml", "model.hidden=8", *EPISODES,
                   "data.queries=5", "trainer.max_epochs=1")  # fmt: skip
    episodes = "data.test_episodes=40"
    one = evaluated(tmp_path / "1", maml, episodes, "method.eval_inner_steps=1")
    five = evaluated(tmp_path / "5", maml, episodes, "method.eval_inner_steps=5")
    assert one["test/acc"] != five["test/acc"]
    slower = evaluated(tmp_path / "lr", maml, episodes, "method.eval_inner_steps=1",
                       "method.inner_lr=0.01")  # fmt: skip
    assert slower["test/acc"] != one["test/acc"]
    assert "at most 5 ways" in refusal(tmp_path / "w", maml, episodes, "data.ways=8")


@pytest.mark.slow
def test_finetuned_checkpoint_evaluates_without_its_source_weights(tmp_path: Path) -> None:
    """Observed: eval re-loaded `model.pretrained` although the checkpoint holds every weight."""
    source = trained(tmp_path / "source", "debug=limit", "model.width=8")
    run = tmp_path / "finetune"
    tuned = trained(run, "method=finetune", f"model.pretrained={source}", "debug=limit",
                    "model.width=8")  # fmt: skip
    source.unlink()
    again = evaluated(tmp_path / "eval", tuned)
    assert again["test/acc"] == json.loads((run / "metrics.json").read_text())["test/acc"]


@pytest.mark.slow
def test_max_steps_ending_mid_epoch_still_validates_and_checkpoints(tmp_path: Path) -> None:
    """Observed: no validation, no best.ckpt and no val/acc_best, only Lightning's warning."""
    run = tmp_path / "run"
    train(compose_config(run, [*CPU, "trainer.max_steps=5", "model.width=8"]))
    record = json.loads((run / "metrics.json").read_text())
    assert (run / "checkpoints" / "best.ckpt").is_file() and "val/acc_best" in record
    assert record["global_step"] == 5 and record["epoch"] == 0  # no epoch was completed


@pytest.mark.slow
def test_epoch_count_is_the_run_not_the_best_checkpoint(tmp_path: Path) -> None:
    """Observed: `epoch` came from best.ckpt (10) in a run that completed 23 epochs, because
    testing best.ckpt restored the epoch counter saved with it."""
    run = tmp_path / "run"
    overrides = [*CPU, "debug=limit", "trainer.max_epochs=4", "model.width=4", "optimizer.lr=1e-9"]
    train(compose_config(run, overrides))  # lr ~0: the best epoch is the first one
    record = json.loads((run / "metrics.json").read_text())
    assert torch.load(run / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == 0
    assert record["epoch"] == 4


def test_a_split_override_is_refused_and_other_data_is_not(tmp_path: Path) -> None:
    """Observed: `eval.py ... data.seed=1` re-drew the split and reported 0.9972 "test"
    accuracy on 359 digits of which 244 had trained the `data.seed=0` checkpoint."""
    from posttrain.evaluate import evaluation_config

    trained = compose_config(tmp_path / "trained", [])

    def asked(*overrides: str) -> object:
        arguments = open_overrides(["ckpt_path=x.ckpt", *overrides])
        return compose_config(tmp_path / "eval", arguments, "eval")

    for override in ("data.seed=1", "data.test_fraction=0.5", "data.val_fraction=0.3"):
        key = override.split("=")[0]
        with pytest.raises(PosttrainError, match=f"`{key}` cannot change at evaluation"):
            evaluation_config(trained, asked(override))
    evaluation_config(trained, asked("data.eval_batch_size=7"))  # the same test images
    evaluation_config(trained, asked("data.dataset=cifar10"))  # other data: no leak
    with pytest.raises(PosttrainError, match="does not take `model`"):  # not Hydra's struct
        evaluation_config(trained, asked("model.width=64"))


def test_an_episodic_class_split_override_is_refused(tmp_path: Path) -> None:
    """Observed: `eval.py ... data.split=lake` on a `data.split=vinyals` Omniglot checkpoint
    was accepted, though lake's meta-test characters are among vinyals' meta-training ones:
    `data.split` (the episodic protocol) was not among the keys that decide the split."""
    from posttrain.evaluate import evaluation_config

    def asked(*overrides: str) -> object:
        arguments = open_overrides(["ckpt_path=x.ckpt", *overrides])
        return compose_config(tmp_path / "eval", arguments, "eval")

    omniglot = compose_config(tmp_path / "omniglot", ["method=protonet", "data=omniglot"])
    with pytest.raises(PosttrainError, match=r"`data\.split` cannot change at evaluation"):
        evaluation_config(omniglot, asked("data.split=lake"))
    digits = compose_config(tmp_path / "digits", ["method=protonet", "data=episodes_digits"])
    for override in ("data.seed=1", "data.val_fraction=0.3", "data.test_fraction=0.4"):
        key = override.split("=")[0]
        with pytest.raises(PosttrainError, match=f"`{key}` cannot change at evaluation"):
            evaluation_config(digits, asked(override))
    # Rotations are applied after the classes are split: the same characters stay meta-test.
    evaluation_config(digits, asked("data.rotations=false", "data.shots=5"))


def test_a_home_relative_data_root_and_checkpoint_are_the_users_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Observed: `root: ~/images` in a config file (or quoted on the command line) looked for
    a folder named `~` in the working directory ("is not a folder"; CIFAR and Omniglot would
    download into one), and `ckpt_path='~/run/checkpoints/best.ckpt'` "does not exist" while
    Lightning, given the same string, expands it to the user's file."""
    from tests.fixtures import write_image_folder

    monkeypatch.setenv("HOME", str(tmp_path))
    write_image_folder(tmp_path / "images", classes=2, per_class=15, size=8)
    setup = ["data=imagefolder", "data.root='~/images'", "data.options.cache_dir=null",
             "model.width=4", "trainer.max_epochs=1"]  # fmt: skip
    trained(tmp_path / "run", *setup)
    checkpoint = "'~/run/checkpoints/best.ckpt'"
    assert evaluated(tmp_path / "eval", checkpoint)["test/images"] == 6  # type: ignore[arg-type]
    assert not (Path.cwd() / "~").exists()


def test_a_folder_whose_files_changed_since_training_is_refused(tmp_path: Path) -> None:
    """Observed: one image more per class, the same config, and `eval.py` re-drew the split:
    6 of the 12 test images were images the checkpoint had trained on. A resume re-drew it
    too (its validation and test moved mid-run); a moved but unchanged folder resumes."""
    import shutil

    from tests.fixtures import write_image_folder

    data = write_image_folder(tmp_path / "images", classes=2, per_class=15, size=8)
    run = tmp_path / "run"
    folder = [f"data.root={data}", "data.options.cache_dir=null"]
    setup = ["data=imagefolder", *folder, "model.width=4", "trainer.max_epochs=1"]
    best = trained(run, *setup)
    shutil.copy(data / "class_0" / "0.png", data / "class_0" / "added.png")
    message = refusal(tmp_path / "eval", best)
    assert "the data changed since the checkpoint was written" in message
    assert "31 images now, 30 then" in message and "\n" not in message
    record = (run / "metrics.json").read_text()
    resume = [*CPU, *setup, "trainer.max_epochs=2", "ckpt_path=last"]
    with pytest.raises(Exception) as refused:
        train(compose_config(run, resume))
    assert "31 images now, 30 then" in str(find_user_error(refused.value))
    assert (run / "metrics.json").read_text() == record  # the finished run's record stays
    (data / "class_0" / "added.png").unlink()
    (data / "class_1" / "3.png").rename(data / "class_0" / "3b.png")  # the same count, moved
    assert "under other names or labels" in refusal(tmp_path / "eval2", best)
    (data / "class_0" / "3b.png").rename(data / "class_1" / "3.png")
    assert evaluated(tmp_path / "eval3", best)["test/acc"] >= 0  # restored: evaluated
    moved = shutil.move(data, tmp_path / "moved")
    moved_root = [f"data.root={moved}", *setup[2:]]
    train(compose_config(run, [*CPU, "data=imagefolder", *moved_root, "trainer.max_epochs=2",
                               "data.options.cache_dir=null", "ckpt_path=last"]))  # fmt: skip
    assert json.loads((run / "metrics.json").read_text())["epoch"] == 2
