"""Episodes, MAML (loop vs vmap, first- vs second-order), ProtoNet, and the meta CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.func import functional_call
from torch.nn import functional as F

from posttrain.data.episodes import EpisodicDataModule
from posttrain.data.sources import LabelledImages
from posttrain.data.transforms import channel_stats
from posttrain.errors import PosttrainError
from posttrain.methods.meta import MAML, FewShotTasks, ProtoNet
from posttrain.models import build_classifier
from tests.conftest import PROBE, read_probes, run_cli


def episodes(**kwargs) -> EpisodicDataModule:
    datamodule = EpisodicDataModule(**{"rotations": True, "image_size": 16, **kwargs})
    datamodule.setup()
    return datamodule


def test_episode_shapes_and_labels() -> None:
    datamodule = episodes(ways=5, shots=2, queries=3, meta_batch_size=4)
    support, support_labels, query, query_labels = datamodule.on_after_batch_transfer(
        next(iter(datamodule.train_dataloader())), 0
    )
    assert support.shape == (4, 10, 1, 16, 16) and query.shape == (4, 15, 1, 16, 16)
    assert support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert query_labels.shape == (4, 15) and int(query_labels.max()) == 4


def test_class_splits_are_disjoint() -> None:
    pools = episodes().pools
    ids = {split: set(pool.classes.tolist()) for split, pool in pools.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"]
    assert not ids["val"] & ids["test"]
    assert sum(map(len, ids.values())) == 40  # 10 digits x 4 rotations


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_rotations_of_a_digit_are_in_one_split(seed: int) -> None:
    """A digit's rotations are 4 classes but one shape: with a 90-degree "3" in meta-train and
    a 0-degree "3" in meta-test, the test would score shapes the model trained on (observed
    before this check: rotations of one digit in two splits, as Omniglot's protocols never
    allow for a character)."""
    pools = episodes(seed=seed).pools
    digits = {split: {c // 4 for c in pool.classes.tolist()} for split, pool in pools.items()}
    assert not digits["train"] & digits["val"] and not digits["train"] & digits["test"]
    assert not digits["val"] & digits["test"]
    for split, pool in pools.items():  # every digit comes with its four rotations
        assert len(pool) == 4 * len(digits[split]), split


def with_unseen_classes_whitened(datamodule: EpisodicDataModule, digits: set[int]) -> None:
    """Make `datamodule.source.load` return the digits with `digits`' images all white."""
    loaded = datamodule.source.load()
    images = loaded.train.images.clone()
    images[torch.isin(loaded.train.labels, torch.tensor(sorted(digits)))] = 255
    changed = replace(loaded, train=LabelledImages(images, loaded.train.labels))
    datamodule.source.load = lambda: changed  # type: ignore[method-assign]


def test_normalization_statistics_come_from_meta_training_classes_only() -> None:
    """Observed: the mean/std came from the whole pool, meta-validation and meta-test classes
    included, so the unseen tasks' pixels shaped the training inputs."""
    reference = episodes()
    unseen = {c // 4 for split in ("val", "test") for c in reference.pools[split].classes.tolist()}
    changed = EpisodicDataModule(rotations=True, image_size=16)
    with_unseen_classes_whitened(changed, unseen)
    changed.setup()
    assert {c // 4 for c in changed.pools["test"].classes.tolist()} <= unseen  # same split
    for ours, theirs in zip(changed._stats, reference._stats, strict=True):
        assert torch.equal(ours, theirs)


def test_checkpoints_carry_the_statistics_they_trained_with() -> None:
    """Evaluation and resume use the checkpoint's statistics; one written before they were
    stored gets the whole-pool statistics it trained with, computed as they were then."""
    trained = episodes()
    state = trained.state_dict()
    assert torch.equal(torch.tensor(state["mean"]), trained._stats[0])
    restored = episodes()  # Lightning restores a DataModule's state after its setup()
    restored._stats = (torch.zeros(1), torch.ones(1))
    restored.load_state_dict(state)
    assert all(map(torch.equal, restored._stats, trained._stats))
    before_setup = EpisodicDataModule(rotations=True, image_size=16)
    before_setup.load_state_dict(state)
    before_setup.setup()
    assert all(map(torch.equal, before_setup._stats, trained._stats))
    old = episodes()
    old.load_state_dict({"random_state": state["random_state"]})  # no mean/std stored
    generator = torch.Generator().manual_seed(0)
    pool = EpisodicDataModule(rotations=True, image_size=16).build_pools(
        old.source.load(), generator
    )
    assert all(map(torch.equal, old._stats, channel_stats(pool.images, 16, generator)))
    assert not torch.equal(old._stats[0], trained._stats[0])


def test_same_seed_same_episodes_and_fixed_evaluation() -> None:
    first, second = episodes(seed=3), episodes(seed=3)
    for loader in ("train_dataloader", "test_dataloader"):
        a = next(iter(getattr(first, loader)()))
        b = next(iter(getattr(second, loader)()))
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    again = next(iter(first.test_dataloader()))
    assert torch.equal(again[0], next(iter(first.test_dataloader()))[0])
    train_stream = iter(first.train_dataloader())
    assert not torch.equal(next(train_stream)[0], next(train_stream)[0])


def test_too_few_classes_is_a_clear_error() -> None:
    with pytest.raises(PosttrainError, match="meta-val split has"):
        episodes(rotations=False, ways=5)


def test_omniglot_folder_format(omniglot_all_characters: Path) -> None:
    datamodule = EpisodicDataModule(
        dataset="omniglot",
        root=str(omniglot_all_characters),
        split="lake",
        ways=3,
        shots=1,
        queries=1,
        rotations=True,
        val_fraction=0.25,
        test_fraction=0.0,
        options={"size": 28},
    )
    datamodule.setup()
    assert len(datamodule.pools["test"]) == 659 * 4  # evaluation alphabets, rotated
    assert len(datamodule.pools["train"]) + len(datamodule.pools["val"]) == 964 * 4
    support = next(iter(datamodule.test_dataloader()))[0]
    assert support.shape[-3:] == (1, 28, 28)


def tiny_meta_batch(
    tasks: int = 3, ways: int = 3, shots: int = 2, queries: int = 4, batch_norm: bool = True
):
    torch.manual_seed(0)
    if batch_norm:
        model = build_classifier("convnet4", num_classes=ways, in_channels=1, hidden=8)
    else:  # the same shape of network without BatchNorm
        from torch import nn

        from posttrain.models.backbones import ImageClassifier

        features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        model = ImageClassifier(features, 8, ways)
    support = torch.randn(tasks, ways * shots, 1, 16, 16)
    query = torch.randn(tasks, ways * queries, 1, 16, 16)
    support_labels = torch.arange(ways).repeat_interleave(shots).expand(tasks, -1)
    query_labels = torch.arange(ways).repeat_interleave(queries).expand(tasks, -1)
    return model, support, support_labels, query, query_labels


def outer_gradients(form: str, first_order: bool, batch_norm: bool = True) -> list[torch.Tensor]:
    model, support, support_labels, query, query_labels = tiny_meta_batch(batch_norm=batch_norm)
    maml = MAML(inner_steps=2, inner_lr=0.1, first_order=first_order, inner_loop=form)
    maml.prepare(model)
    logits = maml(model, FewShotTasks(support, support_labels, query, 3), training=True)
    F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    ("first_order", "batch_norm"), [(True, True), (True, False), (False, False)]
)
def test_vmap_and_loop_give_the_same_gradients(first_order: bool, batch_norm: bool) -> None:
    loop = outer_gradients("loop", first_order, batch_norm)
    vmapped = outer_gradients("vmap", first_order, batch_norm)
    for a, b in zip(loop, vmapped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_second_order_loop_matches_finite_differences() -> None:
    model, support, support_labels, query, query_labels = tiny_meta_batch(tasks=2)
    maml = MAML(inner_steps=1, inner_lr=0.5, inner_loop="loop")
    maml.prepare(model)
    model.double()

    def meta_loss() -> torch.Tensor:
        tasks = FewShotTasks(support.double(), support_labels, query.double(), 3)
        logits = maml(model, tasks, training=True)
        return F.cross_entropy(logits.flatten(0, 1), query_labels.flatten())

    weight = model.features[0][0][0].weight
    (analytic,) = torch.autograd.grad(meta_loss(), weight)
    index, eps = (1, 0, 1, 1), 1e-6
    with torch.no_grad():
        weight[index] += eps
    upper = float(meta_loss())
    with torch.no_grad():
        weight[index] -= 2 * eps
    lower = float(meta_loss())
    assert analytic[index].item() == pytest.approx((upper - lower) / (2 * eps), rel=1e-5)


def test_vmap_second_order_with_batch_norm_is_refused() -> None:
    model = tiny_meta_batch()[0]
    with pytest.raises(PosttrainError, match="inner_loop=vmap"):
        MAML(first_order=False, inner_loop="vmap").prepare(model)
    for first_order in (True, False):  # auto: the checked form, on every device
        assert MAML(first_order=first_order).form(torch.device("cuda")) == "loop"


def test_first_order_vmap_equals_the_loop_in_float64_at_benchmark_size() -> None:
    """Observed: `gradients match loop: False` for FOMAML in benchmarks.maml_speed. In float64
    the two forms agree to rounding: the float32 gap (~1e-3 relative, first conv) is rounding
    in the batched convolution, not a different gradient."""
    from benchmarks.maml_speed import meta_batch

    def gradients(form: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = build_classifier("convnet4", num_classes=5, in_channels=1)
        maml = MAML(inner_steps=1, inner_lr=0.4, first_order=True, inner_loop=form)
        maml.prepare(model)
        model.double()
        support, support_labels, query, query_labels = meta_batch(torch.device("cpu"), tasks=2)
        tasks = FewShotTasks(support.double(), support_labels, query.double(), 5)
        logits = maml(model, tasks, training=True)
        F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
        return [p.grad for p in model.parameters()]

    for loop, vmapped in zip(gradients("loop"), gradients("vmap"), strict=True):
        torch.testing.assert_close(loop, vmapped, rtol=1e-10, atol=1e-12)


def test_first_order_drops_only_the_second_order_term() -> None:
    model, support, support_labels, query, query_labels = tiny_meta_batch(tasks=1)
    maml = MAML(inner_steps=1, inner_lr=0.1, first_order=True, inner_loop="loop")
    maml.prepare(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    adapted = maml.adapt_loop(model, params, buffers, support[0], support_labels[0], 1, False)
    adapted = {n: p.detach().requires_grad_() for n, p in adapted.items()}
    query_loss = F.cross_entropy(
        functional_call(model, (adapted, buffers), (query[0],)), query_labels[0]
    )
    expected = torch.autograd.grad(query_loss, list(adapted.values()))
    fomaml = outer_gradients("loop", first_order=True)
    second = outer_gradients("loop", first_order=False)
    one_task = MAML(inner_steps=1, inner_lr=0.1, first_order=True, inner_loop="loop")
    model.zero_grad()
    logits = one_task(model, FewShotTasks(support, support_labels, query, 3), training=True)
    F.cross_entropy(logits.flatten(0, 1), query_labels.flatten()).backward()
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want)  # FOMAML = query gradient at the adapted point
    assert any(not torch.allclose(a, b) for a, b in zip(fomaml, second, strict=True))


def test_one_inner_step_reduces_the_support_loss() -> None:
    model, support, support_labels, _, _ = tiny_meta_batch(tasks=1)
    maml = MAML(inner_steps=1, inner_lr=0.1, inner_loop="loop")
    maml.prepare(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())

    def support_loss(weights):
        logits = functional_call(model, (weights, buffers), (support[0],))
        return float(F.cross_entropy(logits, support_labels[0]))

    adapted = maml.adapt_loop(model, params, buffers, support[0], support_labels[0], 1, False)
    assert support_loss(adapted) < support_loss(params)


def test_episodes_with_fewer_ways_than_the_head_predict_only_their_classes() -> None:
    """Observed: a 3-way episode scored by a 5-way MAML model took the arg-max over all five
    outputs, so 11% of its predictions named classes the episode does not have."""
    torch.manual_seed(0)
    model = build_classifier("convnet4", num_classes=5, in_channels=1, hidden=8).eval()
    maml = MAML(eval_inner_steps=1, inner_lr=0.01)
    maml.prepare(model)
    support, query = torch.randn(4, 3, 1, 16, 16), torch.randn(4, 30, 1, 16, 16)
    tasks = FewShotTasks(support, torch.arange(3).expand(4, -1), query, ways=3)
    logits = maml(model, tasks, training=False)
    assert logits.shape == (4, 30, 3)
    # The same as a 3-output head made of the first three rows, adapted to the task.
    small = build_classifier("convnet4", num_classes=3, in_channels=1, hidden=8).eval()
    maml.prepare(small)
    with torch.no_grad():
        for (name, mine), theirs in zip(small.named_parameters(), model.parameters(), strict=True):
            mine.copy_(theirs[:3] if name.startswith("head.") else theirs)
    torch.testing.assert_close(logits, maml(small, tasks, training=False))


def test_more_ways_than_the_maml_head_has_are_refused_before_validation(make_config) -> None:
    """Observed: `data.ways=5 data.train_ways=3` ended in torch's 'Target 3 is out of
    bounds' traceback at the first validation step."""
    from posttrain.train import train

    cfg = make_config(
        "experiment=digits_maml", "data.train_ways=3", "data.ways=5", "model.hidden=8",
        "trainer.fast_dev_run=true", "data.queries=2",
    )  # fmt: skip
    with pytest.raises(PosttrainError, match="at most 3 ways"):
        train(cfg)


def test_protonet_separates_a_trivial_task() -> None:
    torch.manual_seed(0)
    model = build_classifier("convnet4", num_classes=3, in_channels=1, hidden=8).eval()
    centers = torch.tensor([-3.0, 0.0, 3.0]).view(3, 1, 1, 1)
    support = (centers.repeat_interleave(2, 0) + 0.01 * torch.randn(6, 1, 16, 16)).unsqueeze(0)
    query = (centers.repeat_interleave(5, 0) + 0.01 * torch.randn(15, 1, 16, 16)).unsqueeze(0)
    labels = torch.arange(3).repeat_interleave(2).unsqueeze(0)
    with torch.no_grad():
        logits = ProtoNet()(model, FewShotTasks(support, labels, query, 3), training=False)
    accuracy = (logits.argmax(-1) == torch.arange(3).repeat_interleave(5)).float().mean()
    assert accuracy == 1.0


def test_one_evaluation_episode_has_no_interval() -> None:
    """Observed: `data.val_episodes=1 data.test_episodes=1` wrote `"test/acc_ci95": NaN`
    into metrics.json, which strict JSON readers (jq, JSON.parse) refuse to read."""
    from posttrain.methods.meta import EpisodeMetrics

    metrics = EpisodeMetrics()
    metrics.update("test", torch.tensor([0.6]))
    values = metrics.compute_and_reset("test")
    assert set(values) == {"test/acc", "test/episodes"}
    metrics.update("val", torch.tensor([0.6, 0.8]))
    interval = metrics.compute_and_reset("val")["val/acc_ci95"]
    assert float(interval) == pytest.approx(1.96 * torch.tensor([0.6, 0.8]).std() / 2**0.5)


def test_meta_method_with_plain_data_is_a_clear_error(make_config) -> None:
    from posttrain.train import train

    cfg = make_config("method=protonet", "model=convnet4", "trainer.fast_dev_run=true")
    with pytest.raises(PosttrainError, match="data=episodes_digits"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["digits_protonet", "digits_maml"])
def test_cli_meta_trains_a_few_steps(tmp_path: Path, experiment: str) -> None:
    import json

    result = run_cli(
        "train.py",
        f"experiment={experiment}",
        "trainer.max_epochs=1",
        "data.train_episodes=16",
        "data.val_episodes=8",
        "data.test_episodes=20",
        "logger=csv",
        PROBE,
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # A few steps: 16 training episodes in meta-batches of 4, each moving the backbone.
    (probe,) = read_probes(tmp_path)
    assert probe["global_step"] == 16 // 4
    backbone = {n: v for n, v in probe["changed"].items() if n.startswith("model.features.")}
    assert backbone and all(backbone.values()), [n for n, v in backbone.items() if not v]
    # Tested on exactly the 20 requested episodes, with their confidence interval.
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["global_step"] == 4
    assert metrics["test/episodes"] == 20 and 0 < metrics["test/acc_ci95"] < 0.5


def test_episodes_of_a_folder_whose_files_changed_are_refused(tmp_path: Path) -> None:
    """Episodes split classes by fraction: a class folder added since the checkpoint re-draws
    which classes are meta-test, so some would be classes it meta-trained on."""
    import numpy as np
    from PIL import Image

    def write_class(name: str) -> None:
        (tmp_path / name).mkdir()
        for index in range(2):
            pixels = np.random.default_rng(index).integers(0, 256, (8, 8), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / name / f"{index}.png")

    def episodes_of_folder() -> EpisodicDataModule:
        return EpisodicDataModule(
            dataset="imagefolder", root=str(tmp_path), ways=2, shots=1, queries=1,
            val_fraction=0.25, test_fraction=0.25, options={"size": 8, "cache_dir": None},
        )  # fmt: skip

    for label in range(8):
        write_class(f"class_{label}")
    trained = episodes_of_folder()
    trained.setup("fit")
    checkpoint = {EpisodicDataModule.__qualname__: trained.state_dict()}
    episodes_of_folder().check_checkpoint_data(checkpoint, resuming=False)  # the same files
    write_class("class_8")
    with pytest.raises(PosttrainError, match="18 images now, 16 then"):
        episodes_of_folder().check_checkpoint_data(checkpoint, resuming=False)
