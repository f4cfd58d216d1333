"""Tests for lightning_kd.models: RepDistiller-compatible CIFAR zoo and torchvision fallback."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torchvision

from lightning_kd.models import ZOO, get_model, list_models, stage_names

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "repdistiller_state_dicts.json").read_text())["models"]
ZOO_NAMES = list(ZOO)


def _stage_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [outputs[n] for n in names]


def test_zoo_covers_reference():
    assert list_models() == ZOO_NAMES == list(REFERENCE)


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_state_dict_matches_repdistiller(name):
    with torch.device("meta"):  # names and shapes only: skip weight init
        model = get_model(name, num_classes=100)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == [[k, list(s)] for k, s in REFERENCE[name]]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_forward_shapes_and_stages(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = get_model(name, num_classes=100).eval()
    names = stage_names(model)
    assert names == list(type(model).stage_names) and len(names) >= 3
    modules = dict(model.named_modules())
    assert all(n in modules for n in names), names

    feats = _stage_outputs(model, names, x)
    assert all(f.dim() == 4 and f.shape[0] == 2 for f in feats)
    sizes = [f.shape[-1] for f in feats]
    assert sizes == sorted(sizes, reverse=True), sizes
    # The last stage is the map that gets pooled into the classifier.
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert feats[-1].shape[1] == classifier.in_features
    with torch.no_grad():
        assert model(x).shape == (2, 100)
        assert get_model(name, num_classes=10)(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_repdistiller_checkpoint_reproduces_logits(name):
    ckpt = torch.load(FIXTURES / f"repdistiller_{name}_c100.pth", map_location="cpu", weights_only=True)
    io = torch.load(FIXTURES / f"repdistiller_{name}_c100_io.pt", map_location="cpu", weights_only=True)
    model = get_model(name, num_classes=100)
    model.load_state_dict(ckpt["model"], strict=True)
    model.eval()
    with torch.no_grad():
        logits = model(io["input"])
    torch.testing.assert_close(logits, io["logits"], atol=1e-5, rtol=0)


def test_torchvision_fallback_num_classes():
    model = get_model("resnet18", num_classes=10)
    assert isinstance(model, torchvision.models.ResNet) and model.fc.out_features == 10


def test_torchvision_weights_use_their_own_class_count(monkeypatch):
    calls = []
    monkeypatch.setattr(torchvision.models, "get_model", lambda name, **kw: calls.append((name, kw)) or nn.Identity())
    get_model("resnet18", num_classes=10, weights="IMAGENET1K_V1")
    assert calls == [("resnet18", {"weights": "IMAGENET1K_V1"})]


@pytest.mark.parametrize("name, expected", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("mobilenet_v2", ["features.1", "features.3", "features.6", "features.13", "features.18"]),
])
def test_torchvision_default_stages(name, expected):
    model = get_model(name, num_classes=10).eval()
    names = stage_names(model)
    assert names == expected
    feats = _stage_outputs(model, names, torch.randn(1, 3, 64, 64))
    sizes = [f.shape[-1] for f in feats]
    assert all(f.dim() == 4 for f in feats)
    # Each stage end sits at a new, halved resolution (64x64 input: stride 4, 8, 16, 32).
    assert sizes == ([16, 8, 4, 2] if name == "resnet18" else [32, 16, 8, 4, 2])


def test_stage_names_without_defaults_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    with pytest.raises(ValueError, match="no default stages.*config"):
        stage_names(model)


@pytest.mark.parametrize("name, close", [("resnet_56", "resnet56"), ("wrn_16_3", "wrn_16_1"),
                                         ("mobilenetv2", "MobileNetV2"), ("resnet19", "resnet18")])
def test_unknown_model_suggests_close_match(name, close):
    with pytest.raises(ValueError, match=f"Unknown model.*'{close}'"):
        get_model(name)


def test_zoo_model_rejects_weights():
    with pytest.raises(ValueError, match="weights"):
        get_model("resnet8", weights="DEFAULT")
