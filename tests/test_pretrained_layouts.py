"""`model.pretrained` accepts weight files as people have them (issue 13, item 1).

Each layout is written with `torch.save` the way DDP, Lightning, training scripts and
torchvision write it; the backbone must load exactly, and the log must say what matched.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from posttrain.errors import PosttrainError
from posttrain.models import build_classifier


def resnet18_state() -> dict[str, torch.Tensor]:
    from torchvision import models

    torch.manual_seed(7)
    return models.resnet18().state_dict()


def prefixed(state: dict, prefix: str) -> dict:
    return {prefix + key: value for key, value in state.items()}


LAYOUTS = {
    "torchvision": lambda s: s,
    "ddp module.": lambda s: prefixed(s, "module."),
    "model.": lambda s: prefixed(s, "model."),
    "state_dict container": lambda s: {"state_dict": s, "epoch": 3},
    "state_dict + module.": lambda s: {"state_dict": prefixed(s, "module."), "epoch": 3},
    "model container": lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    "net container": lambda s: {"net": prefixed(s, "module."), "acc": 0.7},
    # plain data beside the weights: a numpy metric, an array, the script's arguments
    "numpy and argparse beside": lambda s: {
        "state_dict": s,
        "best_acc": np.float64(0.93),
        "history": np.zeros(3, dtype=np.float32),
        "args": argparse.Namespace(arch="resnet18", lr=0.1),
    },
    # loose tensors beside the weights outnumber the other entries: not the state dict
    "model container + metric tensors": lambda s: {
        "model": s,
        "acc": torch.tensor(0.91),
        "loss": torch.tensor(0.32),
    },
    "lightning": lambda s: {
        "state_dict": prefixed(s, "net.backbone."),
        "pytorch-lightning_version": "2.4.0",
        "epoch": 1,
        "global_step": 10,
    },
    "posttrain layout": lambda s: {
        **{"features." + k: v for k, v in s.items() if not k.startswith("fc.")},
        **{"head." + k.removeprefix("fc."): v for k, v in s.items() if k.startswith("fc.")},
    },
    "posttrain layout + module.model.": lambda s: prefixed(
        {"features." + k: v for k, v in s.items() if not k.startswith("fc.")}, "module.model."
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_usual_layout_loads_the_backbone(tmp_path: Path, caplog, layout: str) -> None:
    state = resnet18_state()
    torch.save(LAYOUTS[layout](state), tmp_path / "weights.pt")
    with caplog.at_level(logging.INFO, logger="posttrain"):
        model = build_classifier("resnet18", 4, 3, pretrained=str(tmp_path / "weights.pt"))
    for name, value in model.features.state_dict().items():
        assert torch.equal(value, state[name]), name
    assert model.head.out_features == 4
    backbone = sum(1 for k in state if not k.startswith("fc."))
    assert f"matched {backbone} of " in caplog.text
    assert "another architecture" not in caplog.text


def test_the_file_kind_is_named_correctly(tmp_path: Path, caplog) -> None:
    state = resnet18_state()
    kinds = {
        "plain.pt": (state, "state dict"),
        "wrapped.pt": ({"state_dict": state}, "checkpoint dict (weights under `state_dict`)"),
        "lightning.ckpt": (
            {"state_dict": prefixed(state, "model."), "pytorch-lightning_version": "2.4.0"},
            "Lightning checkpoint",
        ),
    }
    for name, (payload, kind) in kinds.items():
        torch.save(payload, tmp_path / name)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="posttrain"):
            build_classifier("resnet18", 4, 3, pretrained=str(tmp_path / name))
        assert f"{kind} {tmp_path / name}" in caplog.text, name
    assert "Lightning" not in kinds["plain.pt"][1]


def test_partial_match_reports_what_was_dropped(tmp_path: Path, caplog) -> None:
    state = prefixed(resnet18_state(), "module.")
    state["module.projector.weight"] = torch.zeros(128, 512)
    state["module.layer4.1.conv2.weight"] = torch.zeros(3, 3, 3, 3)  # wrong shape
    torch.save({"state_dict": state}, tmp_path / "partial.pt")
    with caplog.at_level(logging.INFO, logger="posttrain"):
        build_classifier("resnet18", 4, 3, pretrained=str(tmp_path / "partial.pt"))
    total = len(state)
    assert f"of {total} tensors" in caplog.text
    assert "projector.weight" in caplog.text and "layer4.1.conv2.weight" in caplog.text
    assert "fc.weight" in caplog.text  # the source's own head, not used


def test_another_architecture_only_when_nothing_matches(tmp_path: Path) -> None:
    torch.save({"state_dict": prefixed(resnet18_state(), "module.")}, tmp_path / "r.pt")
    with pytest.raises(PosttrainError, match="another architecture") as raised:
        build_classifier("small_cnn", 10, 3, pretrained=str(tmp_path / "r.pt"))
    message = str(raised.value)
    assert "checkpoint dict" in message and "Lightning" not in message
    assert "conv1.weight" in message  # shows what the file holds


def test_a_dict_without_tensors_is_one_paragraph(tmp_path: Path) -> None:
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, tmp_path / "empty.pt")
    with pytest.raises(PosttrainError, match="holds no tensors"):
        build_classifier("small_cnn", 10, 3, pretrained=str(tmp_path / "empty.pt"))


@pytest.mark.parametrize(
    ("arch", "source_size", "model_size"),
    [("small_cnn", {"width": 32}, {"width": 64}), ("convnet4", {"hidden": 64}, {"hidden": 32})],
)
def test_another_size_is_refused_not_matched_by_its_counters(
    tmp_path: Path, arch: str, source_size: dict, model_size: dict
) -> None:
    """Only `num_batches_tracked` (0-dim, the same in every net) matched: no evidence."""
    torch.save(build_classifier(arch, 10, 1, **source_size).state_dict(), tmp_path / "w.pt")
    with pytest.raises(PosttrainError, match="none of its") as raised:
        build_classifier(arch, 10, 1, pretrained=str(tmp_path / "w.pt"), **model_size)
    assert str(tmp_path / "w.pt") in str(raised.value) and "model.width" in str(raised.value)


def test_a_small_share_of_matching_kernels_is_refused(tmp_path: Path) -> None:
    """ResNet-50 into ResNet-18: BatchNorm vectors match by width, 9 of 20 kernels by chance."""
    from torchvision import models

    torch.save(models.resnet50().state_dict(), tmp_path / "r50.pt")
    with pytest.raises(PosttrainError, match="only 9 of the 20 weight kernels") as raised:
        build_classifier("resnet18", 10, 3, pretrained=str(tmp_path / "r50.pt"))
    assert str(tmp_path / "r50.pt") in str(raised.value) and "At least 50%" in str(raised.value)


def lightning_with_head_beside(state: dict, classes: int) -> dict:
    """A LightningModule holding `self.net = Wrapper(backbone=resnet, fc=Linear)`."""
    backbone = {k: v for k, v in state.items() if not k.startswith("fc.")}
    head = {"net.fc.weight": torch.randn(classes, 512), "net.fc.bias": torch.randn(classes)}
    return {
        "state_dict": {**prefixed(backbone, "net.backbone."), **head},
        "pytorch-lightning_version": "2.4.0",
    }


def test_pretrained_head_is_found_one_prefix_above_the_backbone(tmp_path: Path, caplog) -> None:
    payload = lightning_with_head_beside(resnet18_state(), classes=4)
    torch.save(payload, tmp_path / "lightning.ckpt")
    path = str(tmp_path / "lightning.ckpt")
    with caplog.at_level(logging.INFO, logger="posttrain"):
        model = build_classifier("resnet18", 4, 3, pretrained=path, pretrained_head=True)
    assert torch.equal(model.head.weight, payload["state_dict"]["net.fc.weight"])
    assert torch.equal(model.head.bias, payload["state_dict"]["net.fc.bias"])
    assert "head kept" in caplog.text and "not in the model" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="posttrain"):  # not asked: a new head, said so
        build_classifier("resnet18", 4, 3, pretrained=path)
    assert "head replaced" in caplog.text and "net.fc.weight (4, 512) not used" in caplog.text


def test_pretrained_head_that_cannot_be_kept_is_refused(tmp_path: Path) -> None:
    torch.save(lightning_with_head_beside(resnet18_state(), classes=10), tmp_path / "ten.ckpt")
    with pytest.raises(PosttrainError, match=r"pretrained_head=true.*\(10, 512\).*\(4, 512\)"):
        build_classifier(
            "resnet18", 4, 3, pretrained=str(tmp_path / "ten.ckpt"), pretrained_head=True
        )
    headless = {k: v for k, v in resnet18_state().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "headless.pt")
    with pytest.raises(PosttrainError, match="holds no classifier head"):
        build_classifier(
            "resnet18", 4, 3, pretrained=str(tmp_path / "headless.pt"), pretrained_head=True
        )


def test_a_deeper_network_of_the_same_family_is_refused(tmp_path: Path) -> None:
    """ResNet-34 into ResNet-18: every ResNet-18 kernel matches by name and shape, and the
    file's blocks layer1.2, layer2.2, ... were dropped while the log read as a clean load."""
    from torchvision import models

    torch.save(
        {"state_dict": prefixed(models.resnet34().state_dict(), "module.")}, tmp_path / "r34.pt"
    )
    with pytest.raises(PosttrainError, match="deeper network of the same family") as raised:
        build_classifier("resnet18", 10, 3, pretrained=str(tmp_path / "r34.pt"))
    message = str(raised.value)
    assert "layer1.2.conv1.weight" in message and "model.arch=resnet18" in message
