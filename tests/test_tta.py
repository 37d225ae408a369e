"""Test-time augmentation (`eval.py tta=`): the test logits are exactly the mean of the
views' logits, for every head; episodic methods and unknown options are refused in one
paragraph; eval.py still refuses keys it does not know, and calibration runs on the same
augmented logits as the test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from posttrain.errors import PosttrainError
from posttrain.evaluate import evaluate, evaluation_config
from posttrain.methods.meta import EpisodicLearner
from posttrain.methods.multitask import MultiTaskClassifier
from posttrain.methods.supervised import SupervisedClassifier
from posttrain.models.backbones import ImageClassifier
from posttrain.train import train
from posttrain.tta import VIEWS, augmented_predictions, translation
from tests.conftest import compose_config, run_cli

SIDE = 4


def linear_model(classes: int = 3) -> ImageClassifier:
    """Logits = W · flatten(image) + b: a prediction computed by hand, and not flip-invariant."""
    torch.manual_seed(0)
    return ImageClassifier(nn.Flatten(), SIDE * SIDE, classes).eval()


def images() -> torch.Tensor:
    return torch.randn(5, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(1))


def test_flip_averages_the_logits_of_the_image_and_its_mirror() -> None:
    model = linear_model()
    method = SupervisedClassifier(model, optimizer={}, scheduler={}).eval()
    x = images()
    expected = (model(x) + model(x.flip(-1))) / 2
    assert not torch.allclose(expected, model(x))  # the flip changes this model's answer
    with augmented_predictions("flip", method):
        assert torch.allclose(method(x), expected, atol=1e-6)
    assert torch.equal(method(x), model(x))  # the block ends, so does the augmentation


def test_shift_averages_the_image_and_its_four_one_pixel_translations() -> None:
    ramp = torch.arange(16.0).view(1, 1, SIDE, SIDE)
    right = translation(0, 1)(ramp)[0, 0]
    assert torch.equal(right[:, 1:], ramp[0, 0, :, :-1])  # moved one pixel right
    assert torch.equal(right[:, 0], ramp[0, 0, :, 0])  # the uncovered edge replicated
    model = linear_model()
    method = SupervisedClassifier(model, optimizer={}, scheduler={}).eval()
    x = images()
    expected = torch.stack([model(view(x)) for view in VIEWS["shift"]]).mean(0)
    assert len(VIEWS["shift"]) == 5
    with augmented_predictions("shift", method):
        assert torch.allclose(method(x), expected, atol=1e-6)


def test_every_multitask_head_averages_its_views() -> None:
    tasks = {"digit": {"target": "label"}, "parity": {"target": "parity"}}
    method = MultiTaskClassifier(linear_model(10), {}, {}, tasks=tasks).eval()
    x = images()
    expected = {
        name: (head(method.model.embed(x)) + head(method.model.embed(x.flip(-1)))) / 2
        for name, head in method.heads.items()
    }
    with augmented_predictions("flip", method):
        outputs = method(x)
    for name, logits in expected.items():
        assert torch.allclose(outputs[name], logits, atol=1e-6)


def test_episodic_methods_and_unknown_views_are_refused_in_one_paragraph() -> None:
    protonet = EpisodicLearner(linear_model(), {}, {}, algorithm="protonet")
    with pytest.raises(PosttrainError) as refused, augmented_predictions("flip", protonet):
        pass
    assert "`tta=flip`" in str(refused.value) and "`method=protonet`" in str(refused.value)
    assert "\n" not in str(refused.value)
    with augmented_predictions("none", protonet):  # the default serves every method
        pass
    method = SupervisedClassifier(linear_model(), {}, {})
    with (
        pytest.raises(PosttrainError, match="none, flip, shift"),
        augmented_predictions("mirror", method),
    ):
        pass


def test_eval_takes_tta_and_calibration_and_still_refuses_unknown_keys(tmp_path: Path) -> None:
    trained = OmegaConf.create({"data": {}, "method": {}, "model": {"pretrained": None}})
    asked = compose_config(
        tmp_path, ["ckpt_path=x.ckpt", "tta=shift", "calibration=temperature"], "eval"
    )
    evaluation_config(trained, asked)  # accepted
    OmegaConf.set_struct(asked, False)
    asked.model = {"width": 64}
    with pytest.raises(PosttrainError, match="does not take `model`"):
        evaluation_config(trained, asked)


@pytest.mark.slow
def test_eval_cli_calibrates_the_augmented_logits(tmp_path: Path) -> None:
    """`python eval.py ckpt_path=... tta=flip calibration=temperature`: the test and the
    calibration both see the flipped views (calibration's NLL is the test's loss), and the
    run records which augmentation it used."""
    torch.set_num_threads(1)
    cpu = ["logger=none", "trainer.accelerator=cpu", "callbacks.progress_bar=null"]
    train(compose_config(tmp_path / "run", [*cpu, "debug=limit", "model.width=8"]))
    asked = [f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'best.ckpt'}", *cpu,
             "calibration=temperature"]  # fmt: skip
    plain = evaluate(compose_config(tmp_path / "none", asked, "eval"))
    result = run_cli("eval.py", *asked, "tta=flip", f"hydra.run.dir={tmp_path / 'flip'}")
    assert result.returncode == 0, result.stderr
    flip = json.loads((tmp_path / "flip" / "metrics.json").read_text())
    assert "tta=flip" in result.stdout + result.stderr
    assert flip["test/tta_views"] == 2 and plain["test/tta_views"] == 1
    assert flip["test/loss"] != pytest.approx(plain["test/loss"], abs=1e-6)
    assert flip["test/nll"] == pytest.approx(flip["test/loss"], abs=1e-5)
    assert flip["test/temperature"] != pytest.approx(plain["test/temperature"])
