"""`method=distill`: the loss is Hinton et al.'s formula, the teacher stays frozen, in eval
mode, outside the student's checkpoint and optimizer, may differ in architecture and input
size, and every unusable teacher or setting is refused in one paragraph naming its key."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.nn import functional as F

from posttrain.checkpoints import CONFIG_KEY
from posttrain.errors import PosttrainError
from posttrain.evaluate import evaluate, open_overrides
from posttrain.methods.distill import Distillation, TransferSet, distillation_loss
from posttrain.models import build_classifier
from posttrain.models.teacher import InputAdapter, load_teacher
from posttrain.regularizers import RegularizerSet
from posttrain.regularizers.targets import LabelSmoothing
from posttrain.runs import find_user_error
from posttrain.train import train
from tests.conftest import add_callbacks, compose_config, run_cli
from tests.test_resume import whole_cut_and_resumed

CPU = ["logger=none", "trainer.accelerator=cpu", "trainer.devices=1", "debug=limit"]
# The teacher: another architecture (convnet4) and input size (16 px) than the student's.
TEACHER = ["model=convnet4", "model.hidden=8", "data.image_size=16", "trainer.max_epochs=1"]
STUDENT = ["method=distill", "model.width=8", "data.image_size=12"]
DIGITS = {"dataset": "digits"}  # the student's `data.*`: the DataModule's defaults
OPTIMIZER = {"name": "sgd", "lr": 0.1}
NO_SCHEDULE = {"name": "none"}


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run = tmp_path_factory.mktemp("teacher") / "run"
    train(compose_config(run, [*CPU, *TEACHER]))
    return run / "checkpoints" / "best.ckpt"


def user_error(action: Any) -> str:
    with pytest.raises(Exception) as raised:
        action()
    error = find_user_error(raised.value)
    assert isinstance(error, PosttrainError), raised.value
    return str(error)


def student(**settings: Any) -> Distillation:
    model = build_classifier("small_cnn", num_classes=3, in_channels=1, width=4)
    regularizers = settings.pop("regularizers", None)
    settings = {"teacher": "teacher.ckpt", **settings}
    return Distillation(model, OPTIMIZER, NO_SCHEDULE, regularizers, **settings)


class FixedTeacher:
    """Stands in for the teacher: the same logits for every batch."""

    def __init__(self, logits: Tensor) -> None:
        self.fixed = logits

    def logits(self, images: Tensor) -> Tensor:
        return self.fixed


# --- the loss -------------------------------------------------------------------------------


def test_training_loss_is_the_reference_formula_on_fixed_logits() -> None:
    """alpha T^2 KL(p_teacher || p_student) + (1 - alpha) CE, computed here by hand."""
    temperature, alpha = 2.0, 0.7
    method = student(temperature=temperature, alpha=alpha)
    student_logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0]])
    teacher_logits = torch.tensor([[1.0, 1.5, -0.5], [0.0, -2.0, 4.0]])
    labels = torch.tensor([0, 1])
    method.model.forward = lambda images: student_logits  # type: ignore[method-assign]
    method.teacher = FixedTeacher(teacher_logits)  # type: ignore[assignment]

    def softmax(row: list[float], t: float) -> list[float]:
        exps = [math.exp(v / t) for v in row]
        return [e / sum(exps) for e in exps]

    kl = ce = 0.0
    rows = zip(student_logits.tolist(), teacher_logits.tolist(), labels.tolist(), strict=True)
    for s, t, label in rows:
        p_teacher, p_student = softmax(t, temperature), softmax(s, temperature)
        kl += sum(pt * math.log(pt / ps) for pt, ps in zip(p_teacher, p_student, strict=True))
        ce -= math.log(softmax(s, 1.0)[label])
    soft, hard = temperature**2 * kl / 2, ce / 2

    output = method.step((torch.zeros(2, 1, 8, 8), labels), "train")
    assert output.parts["distill_loss"].item() == pytest.approx(soft, rel=1e-5)
    assert output.parts["label_loss"].item() == pytest.approx(hard, rel=1e-5)
    assert output.loss.item() == pytest.approx(alpha * soft + (1 - alpha) * hard, rel=1e-5)
    assert distillation_loss(teacher_logits, teacher_logits, 3.0).item() == pytest.approx(0)


def test_validation_is_the_students_own_cross_entropy() -> None:
    method = student()
    method.teacher = None  # evaluation never needs it
    labels = torch.tensor([0, 2])
    output = method.step((torch.randn(2, 1, 8, 8), labels), "val")
    assert output.parts == {} and output.loss.item() > 0


def test_teacher_input_is_the_batch_renormalized_with_the_teachers_statistics(
    teacher_file: Path,
) -> None:
    pixels = torch.rand(2, 1, 16, 16)
    student_stats = (torch.tensor([0.3]), torch.tensor([0.2]))
    teacher_stats = (torch.tensor([0.5]), torch.tensor([0.25]))
    adapter = InputAdapter(student_stats, teacher_stats, (16, 16))
    batch = (pixels - 0.3) / 0.2
    assert torch.allclose(adapter(batch), (pixels - 0.5) / 0.25, atol=1e-6)
    assert InputAdapter(student_stats, student_stats, (16, 16))(batch) is batch
    assert adapter(batch[..., :8, :8]).shape[-2:] == (16, 16)  # resized to the teacher's size
    torch.manual_seed(0)
    teacher = load_teacher(teacher_file, num_classes=10, in_channels=1, data=DIGITS)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # draws kept
    stored = torch.load(teacher_file, weights_only=True)["ImageClassificationDataModule"]
    assert teacher.stats is not None and teacher.stats[0].tolist() == stored["mean"]


# --- a real run: frozen teacher, other architecture and size, checkpoint without it ------------


class TeacherProbe(Callback):
    """Records the teacher during fitting: its mode, inputs, output dtype, and its tensors."""

    def __init__(self) -> None:
        self.modes: list[bool] = []
        self.input_sizes: set[tuple[int, ...]] = set()
        self.dtypes: set[torch.dtype] = set()

    def on_fit_start(self, trainer: Any, method: Any) -> None:
        network = method.teacher.network
        self.before = {k: v.clone() for k, v in network.state_dict().items()}
        self.teacher_ids = {id(p) for p in network.parameters()}

        def record(module: Any, inputs: tuple[Tensor], output: Tensor) -> None:
            self.modes.append(module.training)
            self.input_sizes.add(tuple(inputs[0].shape[1:]))
            self.dtypes.add(output.dtype)

        network.register_forward_hook(record)

    def on_train_end(self, trainer: Any, method: Any) -> None:
        network = method.teacher.network
        self.after = network.state_dict()
        self.grads = [p.grad for p in network.parameters()]
        self.in_optimizer = any(
            id(p) in self.teacher_ids
            for optimizer in trainer.optimizers
            for group in optimizer.param_groups
            for p in group["params"]
        )
        self.student_keys = list(method.state_dict())


def test_frozen_teacher_of_another_architecture_and_size_and_a_checkpoint_without_it(
    teacher_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_file, teacher)
    probe = TeacherProbe()
    add_callbacks(monkeypatch, probe)
    run = tmp_path / "student"
    overrides = [*CPU, *STUDENT, f"method.teacher={teacher}", "trainer.precision=bf16-mixed"]
    metrics = train(compose_config(run, overrides))

    assert probe.modes and not any(probe.modes)  # eval mode at every training step
    assert probe.input_sizes == {(1, 16, 16)}  # 12 px student batches resized to 16 px
    assert probe.dtypes == {torch.bfloat16}  # under the student's autocast
    assert all(grad is None for grad in probe.grads) and not probe.in_optimizer
    for name, value in probe.before.items():  # BatchNorm statistics included
        assert torch.equal(value, probe.after[name]), name
    assert metrics["train/distill_loss"] > 0 and metrics["train/label_loss"] > 0
    assert not any("teacher" in key for key in probe.student_keys)

    teacher.unlink()  # the student's checkpoint needs no teacher from here on
    best = run / "checkpoints" / "best.ckpt"
    arguments = open_overrides(["logger=none", "trainer.accelerator=cpu", f"ckpt_path={best}"])
    again = evaluate(compose_config(tmp_path / "eval", arguments, "eval"))
    assert again["test/acc"] == json.loads((run / "metrics.json").read_text())["test/acc"]
    reused = build_classifier("small_cnn", 10, 1, pretrained=str(best), width=8)
    stored = torch.load(best, weights_only=True)["state_dict"]
    assert torch.equal(reused.features[0][0].weight, stored["model.features.0.0.weight"])


def test_the_teacher_is_measured_through_the_students_inputs_and_its_own(
    teacher_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    """A teacher of another image size sees the student's batches resized (a native 8x8 teacher
    lost 11 points through 16x16 batches, silently): both accuracies reach metrics.json, and
    a gap beyond the tolerance is a warning."""
    import posttrain.models.teacher

    monkeypatch.setattr(posttrain.models.teacher, "ADAPTER_TOLERANCE", -1.0)  # always warn
    run = tmp_path / "student"
    train(compose_config(run, [*CPU, *STUDENT, f"method.teacher={teacher_file}"]))
    record = json.loads((run / "metrics.json").read_text())
    teacher_run = json.loads((teacher_file.parents[1] / "metrics.json").read_text())
    # its own preparation of the same validation split is what its own run measured
    assert record["teacher/val_acc_own_input"] == pytest.approx(teacher_run["val/acc_best"])
    assert 0 <= record["teacher/val_acc"] <= 1
    assert any("the teacher is" in r.message and "16x16" in r.message for r in caplog.records)


def test_the_adapter_warning_names_both_accuracies() -> None:
    from posttrain.models.teacher import Teacher, adapter_warning

    teacher = Teacher(torch.nn.Linear(2, 2), None, None, "test")
    lost = adapter_warning({"teacher/val_acc": 0.889, "teacher/val_acc_own_input": 1.0}, teacher)
    assert lost is not None and "88.9%" in lost and "100.0%" in lost and "native size" in lost
    close = {"teacher/val_acc": 0.99, "teacher/val_acc_own_input": 1.0}
    assert adapter_warning(close, teacher) is None


# --- method.unlabelled: a transfer set of the images samples_per_class leaves out ------------


class FixedTransferSet:
    """Stands in for the transfer set: the same images at every draw."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def draw(self, count: int, trainer: Any, device: torch.device) -> Tensor:
        return self.images[:count]


def test_the_soft_loss_averages_over_the_labelled_and_the_unlabelled_batch() -> None:
    torch.manual_seed(0)
    method = student(alpha=0.7, temperature=2.0, unlabelled=True)
    teacher_logits = torch.randn(4, 3)
    method.teacher = FixedTeacher(teacher_logits)
    labelled, unlabelled = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    method.transfer_set = FixedTransferSet(unlabelled)
    method._trainer = object()  # the stand-in transfer set never reads it
    labels = torch.tensor([0, 1, 2, 0])
    output = method.step((labelled, labels), "train")

    soft = [distillation_loss(method(x), teacher_logits, 2.0) for x in (labelled, unlabelled)]
    expected_soft = (soft[0] + soft[1]) / 2
    hard = F.cross_entropy(method(labelled), labels)
    assert output.parts["distill_loss"].item() == pytest.approx(expected_soft.item(), rel=1e-5)
    assert output.loss.item() == pytest.approx((0.7 * expected_soft + 0.3 * hard).item(), rel=1e-5)
    assert output.size == 4  # the unlabelled images are not counted as labelled examples


class StubData:
    """A DataModule's transfer-set side: 20 numbered 1-pixel images, identity preprocessing."""

    def unlabelled_images(self) -> Tensor:
        return torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1)

    def training_input(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return images.float(), labels


def test_each_process_draws_its_own_share_from_one_generator_state() -> None:
    """Under DDP every rank holds the same generator (one state in the checkpoint) and keeps
    its slice of a common draw, so ranks see different images."""

    def built_in_a_seeded_process() -> TransferSet:
        torch.manual_seed(0)  # every process seeds the run's global generator alike
        return TransferSet(StubData())

    ranks = [built_in_a_seeded_process() for _ in range(2)]
    single = built_in_a_seeded_process()
    drawn = [
        t.draw(3, SimpleNamespace(world_size=2, global_rank=rank), torch.device("cpu"))
        for rank, t in enumerate(ranks)
    ]
    alone = single.draw(6, SimpleNamespace(world_size=1, global_rank=0), torch.device("cpu"))
    assert torch.equal(torch.cat(drawn), alone)  # the two shares are one draw, split
    assert torch.equal(ranks[0].draws.get_state(), ranks[1].draws.get_state())


def test_the_transfer_set_leaves_the_global_generator_alone() -> None:
    """So the labelled batches are those of the same seed trained alone."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    TransferSet(StubData())
    assert torch.equal(torch.get_rng_state(), before)


def test_transfer_set_images_go_through_the_training_transforms() -> None:
    """`reg=augment`/`mixup` act on the transfer set too (their label output is dropped):
    drawn from a real DataModule whose one transform blanks the images, every input is the
    normalized blank."""
    data = digits_setup(3)

    def blank(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return torch.zeros_like(x), labels.float()

    one_process = SimpleNamespace(world_size=1, global_rank=0)
    plain = TransferSet(data).draw(4, one_process, torch.device("cpu"))
    data.train_transforms.append(blank)
    drawn = TransferSet(data).draw(4, one_process, torch.device("cpu"))
    assert plain.unique().numel() > 1
    assert torch.equal(drawn, data.normalize(torch.zeros_like(drawn)))


def digits_setup(samples_per_class: int | None) -> Any:
    from posttrain.data.datamodule import ImageClassificationDataModule

    data = ImageClassificationDataModule("digits", samples_per_class=samples_per_class)
    data.setup("fit")
    return data


def image_bytes(images: Tensor) -> list[bytes]:
    return sorted(image.numpy().tobytes() for image in images)


def test_unlabelled_images_are_exactly_the_training_rows_samples_per_class_left_out() -> None:
    full, few = digits_setup(None), digits_setup(3)
    unlabelled = few.unlabelled_images()
    assert len(few.splits["train"]) == 30
    assert len(unlabelled) == len(full.splits["train"]) - 30
    together = torch.cat([few.splits["train"].images, unlabelled])
    assert image_bytes(together) == image_bytes(full.splits["train"].images)
    assert few.left_out is None  # their labels are dropped once the images are taken
    assert len(full.unlabelled_images()) == 0


@pytest.mark.parametrize(
    ("override", "said"),
    [
        # the transfer set is the training images `data.samples_per_class` left out
        ("method.unlabelled=true", "data.samples_per_class"),
        # a teacher trained on the student's validation/test images
        ("data.seed=1", "`data.seed=0`, this run has `data.seed=1`"),
    ],
)
def test_what_distillation_cannot_do_stops_the_run_before_training(
    teacher_file: Path, tmp_path: Path, override: str, said: str
) -> None:
    run = tmp_path / "run"
    overrides = [*CPU, *STUDENT, f"method.teacher={teacher_file}", override]
    message = user_error(lambda: train(compose_config(run, overrides)))
    assert said in message
    assert "\n" not in message and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_distilling_on_unlabelled_images_resumes_exactly(
    teacher_file: Path, tmp_path: Path
) -> None:
    """The transfer set's draws are saved with checkpoints: a resumed run draws what the
    uninterrupted run drew (without it the metrics differ)."""
    overrides = [*CPU, *STUDENT, f"method.teacher={teacher_file}", "method.unlabelled=true",
                 "data.samples_per_class=5", "trainer.max_epochs=3"]  # fmt: skip
    uninterrupted, resumed, last = whole_cut_and_resumed(tmp_path, overrides)
    assert "posttrain_unlabelled_draws" in last
    assert resumed == uninterrupted


def test_a_resume_refuses_a_teacher_file_that_changed_since_the_start(
    teacher_file: Path, tmp_path: Path
) -> None:
    """The teacher is read again when a run resumes: a teacher run trained on in its folder
    rewrites `best.ckpt`, and the resumed student silently learned from that other teacher."""
    from posttrain.checkpoints import file_sha256

    teacher, run = tmp_path / "teacher.ckpt", tmp_path / "run"
    shutil.copy(teacher_file, teacher)
    overrides = [*CPU, *STUDENT, f"method.teacher={teacher}"]
    train(compose_config(run, [*overrides, "trainer.max_epochs=1"]))
    last = run / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)["posttrain_teacher"]
    assert saved == {"file": str(teacher), "sha256": file_sha256(teacher_file)}
    retrained = torch.load(teacher_file, weights_only=True)
    retrained["state_dict"] = {k: v * 0.5 for k, v in retrained["state_dict"].items()}
    torch.save(retrained, teacher)
    resume = [*overrides, "trainer.max_epochs=2", "ckpt_path=last"]
    message = user_error(lambda: train(compose_config(run, resume)))
    assert message.startswith("Config key `method.teacher`:") and "\n" not in message
    assert "is not the teacher this run started with" in message
    assert torch.load(last, weights_only=True)["global_step"] == 4  # not one step more
    teacher.unlink()  # gone: refused before any work too, not when fitting sets up
    message = user_error(lambda: train(compose_config(run, resume)))
    assert "does not exist (or is not a file), and this run started distilling" in message
    shutil.copy(teacher_file, teacher)  # the original back: the run resumes
    assert train(compose_config(run, resume))["epoch"] == 2


# --- refusals, each one paragraph naming its key -----------------------------------------------


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"teacher": None}, "method.teacher"),
        ({"temperature": 0}, "method.temperature"),
        ({"temperature": float("inf")}, "method.temperature"),
        ({"alpha": 0}, "method.alpha"),
        ({"alpha": 1.5}, "method.alpha"),
        ({"alpha": 1, "regularizers": RegularizerSet([LabelSmoothing(0.1)])}, "method.alpha=1"),
        ({"unlabelled": "yes"}, "method.unlabelled"),
    ],
)
def test_settings_out_of_range_are_refused(settings: dict[str, Any], key: str) -> None:
    message = user_error(lambda: student(**settings))
    assert key in message and "\n" not in message


def checkpoint_of(path: Path, method_target: str) -> Path:
    config = {"method": {"_target_": method_target}, "model": {}, "data": {}}
    torch.save({CONFIG_KEY: config, "state_dict": {}}, path)
    return path


def test_unusable_teacher_files_are_refused(teacher_file: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    state_dict = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, state_dict)
    episodic = checkpoint_of(tmp_path / "maml.ckpt", "posttrain.methods.meta.EpisodicLearner")
    multitask = checkpoint_of(
        tmp_path / "mt.ckpt", "posttrain.methods.multitask.MultiTaskClassifier"
    )
    cases = {
        tmp_path / "missing.ckpt": "does not exist",
        tmp_path: "is a folder, not a checkpoint file",  # observed: "does not exist"
        text: "not a PyTorch checkpoint",
        state_dict: "not written by a posttrain run",
        episodic: "EpisodicLearner",
        multitask: "MultiTaskClassifier",
    }
    for path, reason in cases.items():
        message = user_error(lambda p=path: load_teacher(p, 10, 1, DIGITS))
        assert "method.teacher" in message and reason in message, message
    classes = user_error(lambda: load_teacher(teacher_file, 5, 1, DIGITS))
    channels = user_error(lambda: load_teacher(teacher_file, 10, 3, DIGITS))
    assert "10 classes of 1-channel" in classes and "5 classes" in classes
    assert "3-channel" in channels and "method.teacher" in channels


def teacher_with_data(teacher_file: Path, folder: Path, **data: Any) -> Path:
    """The teacher's checkpoint, its stored config saying it was trained with `data`."""
    checkpoint = torch.load(teacher_file, weights_only=True)
    checkpoint[CONFIG_KEY]["data"].update(data)
    torch.save(checkpoint, folder / "teacher.ckpt")
    return folder / "teacher.ckpt"


@pytest.mark.parametrize(
    ("teacher_data", "student_data", "named"),
    [
        # only the class count used to be compared: five other digits passed silently
        (
            {"classes": [0, 1, 2, 3, 4]},
            {"classes": [5, 6, 7, 8, 9]},
            "`data.classes=[0,1,2,3,4]`, this run has `data.classes=[5,6,7,8,9]`",
        ),
        # another split: 244 of the student's 359 test images were in the teacher's training
        ({"seed": 1}, {"seed": 0}, "`data.seed=1`, this run has `data.seed=0`"),
        ({"val_fraction": 0.2}, {}, "`data.val_fraction=0.2`"),
        ({"dataset": "fake"}, {}, "`data.dataset=fake`"),
    ],
)
def test_a_teacher_of_other_classes_or_another_split_is_refused(
    teacher_file: Path, tmp_path: Path, teacher_data: dict, student_data: dict, named: str
) -> None:
    from posttrain.data import ImageClassificationDataModule

    teacher = teacher_with_data(teacher_file, tmp_path, **teacher_data)
    student_settings = ImageClassificationDataModule(**student_data).settings
    message = user_error(lambda: load_teacher(teacher, 5, 1, student_settings))
    assert "method.teacher" in message and named in message and "\n" not in message


def test_a_teacher_trained_before_the_images_changed_is_refused(
    teacher_file: Path, tmp_path: Path
) -> None:
    """The same `data.*` over an image folder whose files changed since draws another split:
    the teacher may have trained on the student's validation or test images."""
    from posttrain.data import ImageClassificationDataModule
    from posttrain.data.splits import LISTING_KEY

    data = ImageClassificationDataModule()
    data.setup("fit")
    assert load_teacher(teacher_file, 10, 1, data.settings, data.listing).size == 16
    checkpoint = torch.load(teacher_file, weights_only=True)
    stored = checkpoint[ImageClassificationDataModule.__qualname__][LISTING_KEY]
    assert stored == data.listing  # what the teacher's run recorded: the same digits
    stored.update(images=stored["images"] - 3, digest="another listing")
    torch.save(checkpoint, tmp_path / "teacher.ckpt")
    message = user_error(
        lambda: load_teacher(tmp_path / "teacher.ckpt", 10, 1, data.settings, data.listing)
    )
    assert "method.teacher" in message and "1797 images now, 1794 then" in message


def test_a_teacher_trained_on_more_of_the_same_split_is_allowed(teacher_file: Path) -> None:
    """The strong-teacher recipe: all training labels for the teacher, few for the student;
    a cache folder or another image size is no other data either."""
    from posttrain.data import ImageClassificationDataModule

    student = ImageClassificationDataModule(samples_per_class=10, image_size=12).settings
    assert load_teacher(teacher_file, 10, 1, student).size == 16


def test_the_teacher_is_checked_before_any_training(teacher_file: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = [*CPU, *STUDENT, f"method.teacher={teacher_file}", "data.classes=[0,1,2]"]
    message = user_error(lambda: train(compose_config(run, overrides)))
    assert "method.teacher" in message
    assert "`data.classes=null`, this run has `data.classes=[0,1,2]`" in message
    assert not (run / "checkpoints").exists()  # not one epoch ran


@pytest.mark.slow
def test_cli_refuses_a_missing_teacher_in_one_paragraph(tmp_path: Path) -> None:
    missing = tmp_path / "teacher.ckpt"
    result = run_cli("train.py", *CPU, *STUDENT, f"method.teacher={missing}",
                     f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert f"`method.teacher`: checkpoint file {missing} does not exist" in result.stderr


def test_distill_benchmark_chooses_settings_on_validation_only() -> None:
    """The benchmark's `--choose-on-val` grid is every combination in order, and the choice is
    the best mean `val/acc_best` (the first among equals): test accuracy cannot pick it."""
    from benchmarks.distill import best_on_validation, override_grid

    assert override_grid(["method.temperature=2,4", "method.alpha=0.5"]) == [
        ["method.temperature=2", "method.alpha=0.5"],
        ["method.temperature=4", "method.alpha=0.5"],
    ]
    candidates = [
        {"overrides": ["a=1"], "val_acc_best_mean": 0.9, "test_acc": 0.99},
        {"overrides": ["a=2"], "val_acc_best_mean": 0.95, "test_acc": 0.90},
        {"overrides": ["a=3"], "val_acc_best_mean": 0.95, "test_acc": 0.99},
    ]
    assert best_on_validation(candidates)["overrides"] == ["a=2"]
    with pytest.raises(SystemExit, match=r"method\.alpha"):
        override_grid(["method.alpha"])
