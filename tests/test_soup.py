"""Model soups from a sweep (`python -m posttrain.soup`): the average, the greedy choice, the
refusals, the checkpoint that eval.py and `model.pretrained` load, the report row."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from posttrain.checkpoints import CONFIG_KEY
from posttrain.report import write_report
from posttrain.soup import average_state_dicts, main, make_soup, select
from tests.conftest import compose_config, run_cli
from tests.test_sweeps import fake_job

SUPERVISED = "posttrain.methods.supervised.SupervisedClassifier"
EPISODIC = "posttrain.methods.meta.EpisodicLearner"


def test_uniform_soup_is_the_mean_of_two_state_dicts() -> None:
    first = {"w": torch.tensor([1.0, 2.0]), "bn.num_batches_tracked": torch.tensor(7)}
    second = {"w": torch.tensor([3.0, 6.0]), "bn.num_batches_tracked": torch.tensor(9)}
    soup = average_state_dicts([first, second])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and soup["w"].dtype == torch.float32
    # A count, not a weight: taken from the first ingredient, still an integer.
    assert soup["bn.num_batches_tracked"].item() == 7
    assert soup["bn.num_batches_tracked"].dtype == torch.int64


def job_config(
    width: int = 8, pretrained: str = "a.ckpt", method: str = SUPERVISED, **data: object
) -> dict:
    return {
        "seed": 0,
        "model": {"arch": "small_cnn", "width": width, "pretrained": pretrained},
        "method": {"_target_": method, "finetune": {"weights": pretrained}},
        "data": {"dataset": "digits", "image_size": 16, "seed": 0, **data},
    }


def checkpointed_job(
    sweep: Path, name: str, metrics: dict, config: dict | None, state: dict | None = None
) -> Path:
    """A sweep job folder; with `config`, its best.ckpt holds `state` and that config."""
    fake_job(sweep, name, [f"job={name}"], metrics)
    if config is not None:
        (sweep / name / "checkpoints").mkdir()
        state = state if state is not None else {"model.w": torch.zeros(2, 2)}
        torch.save(
            {"state_dict": state, CONFIG_KEY: config}, sweep / name / "checkpoints/best.ckpt"
        )
    return sweep / name


def completed(val: float) -> dict:
    return {"status": "completed", "val/acc_best": val, "test/acc": val}


def test_incompatible_jobs_are_refused_with_the_reason(tmp_path: Path) -> None:
    checkpointed_job(tmp_path, "0_a", completed(0.5), job_config())
    checkpointed_job(tmp_path, "1_b", completed(0.9), job_config())
    checkpointed_job(tmp_path, "2_wide", completed(0.95), job_config(width=16))
    checkpointed_job(tmp_path, "3_other", completed(0.8), job_config(pretrained="b.ckpt"))
    checkpointed_job(tmp_path, "4_failed", {"status": "failed", "error": "boom"}, None)
    checkpointed_job(tmp_path, "5_nockpt", completed(0.8), None)
    checkpointed_job(
        tmp_path, "6_shape", completed(0.7), job_config(), {"model.w": torch.zeros(3, 2)}
    )
    selection = select(tmp_path)
    assert [c.folder for c in selection.candidates] == ["1_b", "0_a"]  # best val first
    refused = dict(line.split(": ", 1) for line in selection.refused)
    assert refused["2_wide"].startswith("another architecture (model.width=16, not 8")
    assert refused["3_other"].startswith("another starting point (model.pretrained=b.ckpt")
    assert refused["4_failed"] == "not completed (status failed: boom)"
    assert refused["5_nockpt"].startswith("no checkpoints/best.ckpt")
    assert "weights differ in names or shapes, e.g. model.w: (3, 2)" in refused["6_shape"]
    assert len(refused) == 5


def test_jobs_on_another_split_classes_or_input_size_are_refused(tmp_path: Path) -> None:
    """Averaging used to ignore `data.*`: a `data.seed=1` job has trained on the images the
    soup is validated (greedy's choice) and tested on."""
    checkpointed_job(tmp_path, "0_a", completed(0.5), job_config())
    checkpointed_job(tmp_path, "1_b", completed(0.9), job_config(samples_per_class=10))
    checkpointed_job(tmp_path, "2_seed", completed(0.95), job_config(seed=1))
    checkpointed_job(tmp_path, "3_classes", completed(0.8), job_config(classes=[5, 6, 7, 8, 9]))
    checkpointed_job(tmp_path, "4_size", completed(0.8), job_config(image_size=32))
    cache = job_config(options={"cache_dir": "/elsewhere"})  # where decodes are cached: same data
    checkpointed_job(tmp_path, "5_cache", completed(0.7), cache)
    selection = select(tmp_path)
    # more (or fewer) training labels on the same split: still one soup
    assert [c.folder for c in selection.candidates] == ["1_b", "5_cache", "0_a"]
    refused = dict(line.split(": ", 1) for line in selection.refused)
    assert refused["2_seed"].startswith("another data split or classes (data.seed=1, not 0 as")
    assert refused["3_classes"].startswith("another data split or classes (data.classes=[5,6,7")
    assert refused["4_size"].startswith("another input size (data.image_size=32, not 16 as in")


def run_main(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """`python -m posttrain.soup <args>` in process; its exit status must be 2, stderr one
    paragraph (no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    return error


def test_unusable_folders_are_one_paragraph(tmp_path: Path, capsys) -> None:
    assert "does not exist" in run_main([str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    assert "is not a multirun folder" in run_main([str(tmp_path / "empty")], capsys)
    checkpointed_job(tmp_path / "failed", "0_x", {"status": "diverged", "error": "nan"}, None)
    assert "none of the 1 jobs" in run_main([str(tmp_path / "failed")], capsys)


def test_fewer_than_two_soupable_jobs_or_episodic_jobs_are_refused(tmp_path: Path, capsys) -> None:
    one = tmp_path / "one"
    checkpointed_job(one, "0_a", completed(0.9), job_config())
    checkpointed_job(one, "1_b", completed(0.8), job_config(width=16))
    error = run_main([str(one)], capsys)
    assert "needs at least 2 compatible completed jobs" in error
    assert "1_b: another architecture (model.width=16" in error
    episodic = tmp_path / "episodic"
    for name in ("0_a", "1_b"):
        checkpointed_job(episodic, name, completed(0.9), job_config(method=EPISODIC))
    assert "episodic method" in run_main([str(episodic)], capsys)


def test_the_report_lists_a_soup_beside_the_jobs(tmp_path: Path) -> None:
    fake_job(tmp_path, "0_lr=0.1", ["optimizer.lr=0.1"], completed(0.8))
    fake_job(tmp_path, "1_lr=0.2", ["optimizer.lr=0.2"], completed(0.9))
    soup = {"status": "completed", "val/acc": 0.95, "test/acc": 0.93, "bn_reestimated": True}
    (tmp_path / "soup_greedy").mkdir()
    (tmp_path / "soup_greedy" / "metrics.json").write_text(
        json.dumps({**soup, "ingredients": ["1_lr=0.2", "0_lr=0.1"]})
    )
    for _ in range(2):  # writing the report again keeps the soup
        rows = write_report(tmp_path)
        assert [row.folder for row in rows] == ["0_lr=0.1", "1_lr=0.2"]  # a soup is no job
        with (tmp_path / "report.csv").open() as handle:
            table = list(csv.DictReader(handle))
        assert table[-1]["job"] == "soup_greedy" and table[-1]["test/acc"] == "0.9300"
        assert table[-1]["val/acc_best"] == "0.9500"
        assert table[-1]["ingredients"] == "1_lr=0.2 0_lr=0.1"
        report = (tmp_path / "report.md").read_text()
        assert "2 jobs: 2 completed. 1 soup(s) of their weights." in report
        assert "| soup_greedy |  | completed | 0.9500 | 0.9300 |" in report
        assert "- soup_greedy: 2 jobs: 1_lr=0.2, 0_lr=0.1" in report
        assert "not completed" not in report


@pytest.fixture(scope="module")
def trained_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real training run (small CNN, a few batches of digits): best.ckpt and metrics."""
    from posttrain.train import train

    folder = tmp_path_factory.mktemp("trained") / "run"
    overrides = ["trainer=cpu", "logger=none", "callbacks.progress_bar=null", "model.width=8",
                 "debug=limit"]  # fmt: skip
    train(compose_config(folder, overrides))
    return folder


def copy_job(
    trained: Path, sweep: Path, name: str, val: float, scale: float = 1.0, **extra: object
) -> None:
    """The trained job under another name, its float weights multiplied by `scale`, with
    `extra` checkpoint entries."""
    checkpointed_job(sweep, name, completed(val), None)
    shutil.copytree(trained / "checkpoints", sweep / name / "checkpoints")
    file = sweep / name / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(file, weights_only=True)
    state = checkpoint["state_dict"]
    checkpoint["state_dict"] = {
        k: v * scale if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        for k, v in state.items()
    }
    torch.save({**checkpoint, **extra}, file)


# What a `reg=ema` job's checkpoint carries beside its averaged `state_dict`.
AVERAGING_ENTRIES = {
    "current_model_state": {"model.head.bias": torch.zeros(10)},
    "averaging_state": {"n_averaged": torch.tensor(8)},
    "posttrain_weights": "the reg=ema average of the weights, over 8 optimizer steps",
}


@pytest.fixture(scope="module")
def soups(trained_job: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """A sweep of three copies of the trained job, ranked by val/acc_best: the best (as a
    `reg=ema` job's checkpoint); one whose weights cancel the best job's (any soup with it is
    all zeros and predicts one class); the best job again. Its greedy and uniform soups."""
    sweep = tmp_path_factory.mktemp("sweep")
    copy_job(trained_job, sweep, "0_best", val=0.9, **AVERAGING_ENTRIES)
    copy_job(trained_job, sweep, "1_garbage", val=0.8, scale=-1.0)
    copy_job(trained_job, sweep, "2_same", val=0.7)
    return sweep, make_soup(sweep, "greedy"), make_soup(sweep, "uniform")


def test_the_soup_is_scored_with_the_jobs_batch_limits_and_precision(
    trained_job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Jobs that validated and tested on one batch of 32 images at bf16: the soup's numbers
    count the same images (a bare Trainer scored all 359 test images), at the same precision."""
    from posttrain.soup import SoupJudge

    for name, val in (("0_best", 0.9), ("1_same", 0.8)):
        copy_job(trained_job, tmp_path, name, val=val)
        file = tmp_path / name / "checkpoints" / "best.ckpt"
        checkpoint = torch.load(file, weights_only=True)
        config = checkpoint[CONFIG_KEY]
        config["data"]["eval_batch_size"] = 32
        config["trainer"].update(limit_val_batches=1, limit_test_batches=1, precision="bf16-mixed")
        torch.save(checkpoint, file)
    scored: list[tuple[str, list[int], str]] = []
    score = SoupJudge.score

    def spy(judge: SoupJudge, split: str) -> dict[str, float]:
        metrics = score(judge, split)
        batches = (
            judge.trainer.num_val_batches if split == "val" else judge.trainer.num_test_batches
        )
        scored.append((split, list(batches), str(judge.trainer.precision)))
        return metrics

    monkeypatch.setattr(SoupJudge, "score", spy)
    record = make_soup(tmp_path, "greedy")
    assert scored and all(b == [1] and p == "bf16-mixed" for _, b, p in scored), scored
    assert {split for split, _, _ in scored} == {"val", "test"}
    assert record["scored_with_trainer"] == {
        "limit_val_batches": 1, "limit_test_batches": 1, "precision": "bf16-mixed"
    }  # fmt: skip


def test_jobs_without_a_test_give_a_soup_without_one(
    trained_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`trainer.limit_test_batches=0` jobs report no test/*: the soup, scored as they were,
    used to end in an IndexError after all its work, writing nothing."""
    for name, val in (("0_best", 0.9), ("1_same", 0.8)):
        copy_job(trained_job, tmp_path, name, val=val)
        file = tmp_path / name / "checkpoints" / "best.ckpt"
        checkpoint = torch.load(file, weights_only=True)
        checkpoint[CONFIG_KEY]["trainer"]["limit_test_batches"] = 0
        torch.save(checkpoint, file)
    record = make_soup(tmp_path, "uniform")
    assert "val/acc" in record and not any(key.startswith("test/") for key in record)
    assert "limit_test_batches=0" in record["tested"]
    assert "no test (its jobs ran with trainer.limit_test_batches=0)" in capsys.readouterr().out
    written = json.loads((tmp_path / "soup_uniform" / "metrics.json").read_text())
    assert written["status"] == "completed" and "test/acc" not in written
    with (tmp_path / "report.csv").open() as handle:
        header, *rows = list(csv.reader(handle))
    soup_row = dict(zip(header[1:], rows[-1][1:], strict=True))  # fake jobs sweep a `job` key
    assert rows[-1][0] == "soup_uniform" and soup_row["test/acc"] == ""
    assert soup_row["val/acc_best"] == f"{record['val/acc']:.4f}"


def test_greedy_skips_a_job_that_lowers_validation_accuracy(
    soups: tuple[Path, dict, dict],
) -> None:
    sweep, greedy, uniform = soups
    assert [(s["job"], s["kept"]) for s in greedy["steps"]] == [
        ("0_best", True),
        ("1_garbage", False),
        ("2_same", True),  # no drop: kept
    ]
    assert greedy["ingredients"] == ["0_best", "2_same"]
    best_alone, with_garbage = greedy["steps"][0]["val_acc"], greedy["steps"][1]["val_acc"]
    assert with_garbage < best_alone - 0.2 and greedy["val/acc"] == best_alone
    assert uniform["ingredients"] == ["0_best", "1_garbage", "2_same"]
    assert uniform["val/acc"] < greedy["val/acc"]
    record = json.loads((sweep / "soup_greedy" / "metrics.json").read_text())
    assert record["status"] == "completed" and record["test/acc"] == greedy["test/acc"]
    report = (sweep / "report.md").read_text()
    assert "3 jobs: 3 completed. 2 soup(s)" in report and "| soup_uniform |" in report


def test_the_soup_checkpoint_has_reestimated_batchnorm_statistics(
    trained_job: Path, soups: tuple[Path, dict, dict]
) -> None:
    soup = torch.load(soups[0] / "soup_greedy/checkpoints/soup.ckpt", weights_only=True)
    original = torch.load(trained_job / "checkpoints" / "best.ckpt", weights_only=True)
    weights, trained = soup["state_dict"], original["state_dict"]
    # The soup of the best job with itself: its weights, but statistics from one pass over
    # the training images (not the running averages of training).
    assert torch.equal(weights["model.head.weight"], trained["model.head.weight"])
    name = "model.features.0.1.running_var"
    assert not torch.allclose(weights[name], trained[name])
    assert "optimizer_states" not in soup and soup["posttrain_soup"]["recipe"] == "greedy"
    # the best job's raw EMA-run weights and the words for its own weights are not the soup's
    assert not set(AVERAGING_ENTRIES) & set(soup)


def with_frozen_statistics(job: Path) -> None:
    """The job's stored config as a `method=finetune` run with `freeze_bn_stats=true` (from
    the same random start: `weights` null, as the judge loads the job's own checkpoint)."""
    file = job / "checkpoints" / "best.ckpt"
    checkpoint = torch.load(file, weights_only=True)
    checkpoint[CONFIG_KEY]["method"]["finetune"] = {
        "policy": "full", "unfreeze_at_epoch": 2, "unfreeze_groups": 1, "backbone_lr_factor": 0.1,
        "freeze_bn_stats": True, "reinit_top_layers": 0, "weights": None,
    }  # fmt: skip
    torch.save(checkpoint, file)


def test_batchnorm_is_reestimated_unless_every_ingredient_froze_it(
    trained_job: Path, tmp_path: Path
) -> None:
    """The choice followed the best job alone: a `freeze_bn_stats` job beside one that trained
    its statistics kept their average ("the recipe froze them"), which describes no model."""
    name = "model.features.0.1.running_var"
    trained = torch.load(trained_job / "checkpoints" / "best.ckpt", weights_only=True)
    cases = {"mixed": ("0_frozen",), "frozen": ("0_frozen", "1_other")}
    for sweep, frozen in ((tmp_path / case, jobs) for case, jobs in cases.items()):
        for job, val in (("0_frozen", 0.9), ("1_other", 0.8)):
            copy_job(trained_job, sweep, job, val=val)
            if job in frozen:
                with_frozen_statistics(sweep / job)
        record = make_soup(sweep, "uniform")
        soup = torch.load(sweep / "soup_uniform/checkpoints/soup.ckpt", weights_only=True)
        statistics = soup["state_dict"][name]
        if len(frozen) == 2:  # every ingredient kept them: their average is the model's own
            assert record["bn_reestimated"] is False
            assert torch.equal(statistics, trained["state_dict"][name])
        else:  # from the training images, on every BatchNorm (none left at its reset value)
            assert record["bn_reestimated"] is True
            assert not torch.allclose(statistics, trained["state_dict"][name])
            assert not torch.allclose(statistics, torch.ones_like(statistics))


def test_a_soup_made_before_is_replaced_only_when_asked(
    trained_job: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Running the soup again replaced soup.ckpt and metrics.json without a word, under
    evaluations that named that file."""
    for job, val in (("0_a", 0.9), ("1_b", 0.8)):
        copy_job(trained_job, tmp_path, job, val=val)
    first = make_soup(tmp_path, "uniform")
    soup_file = tmp_path / "soup_uniform" / "checkpoints" / "soup.ckpt"
    made = soup_file.read_bytes()
    with pytest.raises(SystemExit) as refused:
        main([str(tmp_path), "--recipe", "uniform"])
    assert refused.value.code == 2
    message = capsys.readouterr().err
    assert "already holds a soup of 2 job(s)" in message and "--replace" in message
    assert soup_file.read_bytes() == made
    again = make_soup(tmp_path, "uniform", replace=True)
    assert again["ingredients"] == first["ingredients"]
    (tmp_path / "soup_uniform" / "metrics.json").unlink()  # a soup stopped before its record
    assert make_soup(tmp_path, "uniform")["ingredients"] == first["ingredients"]


def test_jobs_trained_before_the_images_changed_are_refused(tmp_path: Path) -> None:
    """Observed: with one image more per class in the sweep's image folder, the soup re-drew
    the validation and test splits from the same config and chose and scored the soup on
    images its jobs had trained on, without a word (eval.py and a resume refused the same
    checkpoints). Restored files make the soup again."""
    from posttrain.errors import PosttrainError
    from posttrain.train import train
    from tests.fixtures import write_image_folder

    data = write_image_folder(tmp_path / "images", classes=2, per_class=15, size=8)
    overrides = ["trainer=cpu", "logger=none", "callbacks.progress_bar=null", "data=imagefolder",
                 f"data.root={data}", "data.options.cache_dir=null", "model.width=4",
                 "trainer.max_epochs=1"]  # fmt: skip
    train(compose_config(tmp_path / "run", overrides))
    sweep = tmp_path / "sweep"
    for job, val in (("0_a", 0.9), ("1_b", 0.8)):
        copy_job(tmp_path / "run", sweep, job, val=val)
    shutil.copy(data / "class_0" / "0.png", data / "class_0" / "added.png")
    with pytest.raises(PosttrainError) as refused:
        make_soup(sweep, "uniform")
    message = str(refused.value)
    assert "the data changed since 2 of the 2 compatible jobs" in message
    assert "0_a: `data.dataset=imagefolder`" in message and "31 images now, 30 then" in message
    assert "\n" not in message and not (sweep / "soup_uniform" / "metrics.json").exists()
    (data / "class_0" / "added.png").unlink()
    assert make_soup(sweep, "uniform")["ingredients"] == ["0_a", "1_b"]


def test_resuming_from_a_soup_is_refused_in_one_paragraph(
    soups: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    """`train.py ckpt_path=<soup.ckpt>` matched the soup's config, started the run and ended
    in Lightning's `KeyError: 'Trying to restore optimizer state ...'` traceback."""
    from posttrain.errors import PosttrainError
    from posttrain.train import train

    soup_file = soups[0] / "soup_greedy" / "checkpoints" / "soup.ckpt"
    weights_only = tmp_path / "weights.ckpt"
    soup = torch.load(soup_file, weights_only=True)
    torch.save({k: v for k, v in soup.items() if k != "posttrain_soup"}, weights_only)
    cases = ((soup_file, "is a model soup"), (weights_only, "is no training run's checkpoint"))
    for file, what in cases:
        overrides = ["trainer=cpu", "logger=none", "callbacks.progress_bar=null", "model.width=8",
                     "debug=limit", f"ckpt_path={file}"]  # fmt: skip
        with pytest.raises(PosttrainError, match=f"`ckpt_path`: .* {what}") as refused:
            train(compose_config(tmp_path / file.stem, overrides))
        assert "no training to resume" in str(refused.value)
        assert "model.pretrained=<file>" in str(refused.value)


def test_a_soup_of_multitask_jobs_keeps_their_extra_state_and_evaluates(tmp_path: Path) -> None:
    """Multi-task checkpoints hold an extra state (DWA's loss history, a dict): averaging
    stopped at it with `AttributeError: 'dict' object has no attribute 'is_floating_point'`."""
    from posttrain.train import train
    from tests.test_eval import evaluated

    job = tmp_path / "job"
    overrides = ["trainer=cpu", "logger=none", "callbacks.progress_bar=null", "model.width=8",
                 "debug=limit", "experiment=digits_multitask", "method.weighting=dwa"]  # fmt: skip
    train(compose_config(job, overrides))
    for name, val in (("0_a", 0.9), ("1_b", 0.8)):
        copy_job(job, tmp_path / "sweep", name, val=val)
    record = make_soup(tmp_path / "sweep", "uniform")
    soup_file = tmp_path / "sweep" / "soup_uniform" / "checkpoints" / "soup.ckpt"
    extra = "weighting._extra_state"
    trained = torch.load(job / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    assert torch.load(soup_file, weights_only=True)["state_dict"][extra] == trained[extra]
    assert "test/digit/acc" in record  # every task scored
    again = evaluated(tmp_path / "eval", soup_file, "trainer.limit_test_batches=2")
    assert again["test/acc"] == record["test/acc"]  # the jobs' limit: the same images


@pytest.mark.slow
def test_the_soup_checkpoint_loads_in_eval_and_as_pretrained_weights(
    soups: tuple[Path, dict, dict], tmp_path: Path
) -> None:
    from posttrain.runs import build_components

    sweep, _, uniform = soups
    soup_file = sweep / "soup_uniform" / "checkpoints" / "soup.ckpt"
    result = run_cli(
        "eval.py", f"ckpt_path={soup_file}", "logger=none", f"hydra.run.dir={tmp_path / 'eval'}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["test/acc"] == pytest.approx(uniform["test/acc"])

    overrides = ["model.width=8", f"model.pretrained={soup_file}", "model.pretrained_head=true"]
    _, method = build_components(compose_config(tmp_path / "finetune", overrides))
    soup = torch.load(soup_file, weights_only=True)["state_dict"]
    loaded = method.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in soup.items() if k.startswith("model."))
