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


# --- pre-activation stage outputs (preact_names) ----------------------------------------------------------------
# Hand-written forwards of each zoo family, in the form of RepDistiller's ``forward(is_feat=True, preact=True)``:
# they return the pre-activation of every stage (RepDistiller's ``feat[1:-1]``, mdistiller's ``preact_feats[1:]``)
# and the logits, computed with the very operations of the zoo's forward before the ``preact`` modules existed.
import copy  # noqa: E402

import torch.nn.functional as F  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor  # noqa: E402

from lightning_kd.models import preact_names  # noqa: E402
from lightning_kd.models.cifar_resnet import CifarResNet  # noqa: E402
from lightning_kd.models.cifar_resnet_imagenet_style import ImageNetStyleResNet  # noqa: E402
from lightning_kd.models.mobilenetv2 import MobileNetV2  # noqa: E402
from lightning_kd.models.shufflenetv1 import ShuffleNetV1  # noqa: E402
from lightning_kd.models.shufflenetv2 import ShuffleNetV2  # noqa: E402
from lightning_kd.models.vgg import VGG  # noqa: E402
from lightning_kd.models.wrn import WideResNet  # noqa: E402


def _pool_fc(x, pool, fc):
    return fc(torch.flatten(pool(x), 1))


def _cifar_resnet(m, x):
    x = m.relu(m.bn1(m.conv1(x)))
    pre = []
    for layer in (m.layer1, m.layer2, m.layer3):
        for b in layer:
            shortcut = x if b.downsample is None else b.downsample(x)
            p = b.bn2(b.conv2(b.relu(b.bn1(b.conv1(x))))) + shortcut
            x = F.relu(p)
        pre.append(p)
    return pre, _pool_fc(x, m.avgpool, m.fc)


def _resnet50(m, x):
    x = F.relu(m.bn1(m.conv1(x)))
    pre = []
    for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
        for b in layer:
            out = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))))
            p = b.bn3(b.conv3(out)) + b.shortcut(x)
            x = F.relu(p)
        pre.append(p)
    return pre, _pool_fc(x, m.avgpool, m.linear)


def _wrn(m, x):
    # RepDistiller's preact is block2.layer[0].bn1(f1), block3.layer[0].bn1(f2), bn1(f3) for the stage outputs
    # f1..f3: the first BN of the next stage and the final BN, computed once here (each BN runs once).
    x = m.conv1(x)
    pre = []
    for k, stage in enumerate((m.block1, m.block2, m.block3)):
        for i, b in enumerate(stage.layer):
            p = b.bn1(x)
            if i == 0 and k > 0:
                pre.append(p)
            act = F.relu(p)
            out = b.conv2(F.relu(b.bn2(b.conv1(act))))
            x = (x if b.convShortcut is None else b.convShortcut(act)) + out
    pre.append(m.bn1(x))
    return pre, _pool_fc(F.relu(pre[2]), m.avgpool, m.fc)


def _vgg(m, x):
    x = m.pool0(m.block0(x))
    pre = []
    for k, block in enumerate((m.block1, m.block2, m.block3, m.block4), start=1):
        p = block[:-1](x)  # the block before its final ReLU
        pre.append(p)
        x = F.relu(p)
        if k < 3:
            x = (m.pool1, m.pool2)[k - 1](x)
    return pre, _pool_fc(x, m.pool4, m.classifier)


def _mobilenetv2(m, x):
    x = m.conv1(x)
    pre = []
    for k, block in enumerate(m.blocks):
        x = block(x)
        if k in (1, 2, 4, 6):
            pre.append(x)
    return pre, _pool_fc(m.conv2(x), m.avgpool, m.classifier)


def _shufflev1(m, x):
    x = F.relu(m.bn1(m.conv1(x)))
    pre = []
    for layer in (m.layer1, m.layer2, m.layer3):
        for b in layer:
            out = F.relu(b.bn2(b.conv2(b.shuffle1(F.relu(b.bn1(b.conv1(x)))))))
            out, res = b.bn3(b.conv3(out)), b.shortcut(x)
            p = torch.cat([out, res], 1) if b.stride == 2 else out + res
            x = F.relu(p)
        pre.append(p)
    return pre, _pool_fc(x, m.avgpool, m.linear)


def _shufflev2(m, x):
    x = F.relu(m.bn1(m.conv1(x)))
    pre = []
    for layer in (m.layer1, m.layer2, m.layer3):
        x = layer[0](x)  # the down-sampling unit
        for b in layer[1:]:
            c = x.shape[1] // 2
            x1, x2 = x[:, :c], x[:, c:]
            branch = b.bn3(b.conv3(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x2)))))))
            p = torch.cat([x1, branch], 1)  # RepDistiller's preact: before the ReLU, unshuffled
            x = b.shuffle(torch.cat([x1, F.relu(branch)], 1))
        pre.append(p)
    return pre, _pool_fc(m.relu2(m.bn2(m.conv2(x))), m.avgpool, m.linear)


# One or two of each family (both WRN block kinds, ResNets with and without a projection in layer1, VGG with one
# and two convs per block); the eval-mode comparison runs on the whole zoo.
REPRESENTATIVES = ["resnet8", "resnet8x4", "resnet20", "ResNet50", "wrn_16_1", "wrn_40_2", "vgg8", "vgg13",
                   "MobileNetV2", "ShuffleV1", "ShuffleV2"]


@pytest.fixture
def one_thread():
    """Tiny models run several times faster on one thread than on several competing for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


HAND_FORWARD = {CifarResNet: _cifar_resnet, ImageNetStyleResNet: _resnet50, WideResNet: _wrn, VGG: _vgg,
                MobileNetV2: _mobilenetv2, ShuffleNetV1: _shufflev1, ShuffleNetV2: _shufflev2}

# Module paths of RepDistiller's post-activation feat[1:-1] (``is_feat=True``): relu(preact), module by module.
POST_ACTIVATION = {CifarResNet: ["layer1", "layer2", "layer3"],
                   ImageNetStyleResNet: ["layer1", "layer2", "layer3", "layer4"],
                   ShuffleNetV1: ["layer1", "layer2", "layer3"], VGG: ["block1", "block2", "block3", "block4"],
                   # the ReLU that the next stage (or the head) applies to the pre-activation
                   WideResNet: ["block2.layer.0.relu1", "block3.layer.0.relu1", "relu"],
                   MobileNetV2: ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]}  # linear bottlenecks


def _randomized(name: str, seed: int = 0) -> nn.Module:
    """A zoo model with random BatchNorm affine parameters and statistics (the defaults make BNs near-identities)."""
    torch.manual_seed(seed)
    model = get_model(name, num_classes=100)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.3)
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _hooked(model: nn.Module, names: list[str], x: torch.Tensor):
    """(outputs of the named modules, logits), without torch.no_grad (so in-place ops would be caught)."""
    modules = dict(model.named_modules())
    outputs: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o)) for n in names]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return [outputs[n] for n in names], logits


@pytest.mark.parametrize("name, mode", [(n, "eval") for n in ZOO_NAMES] + [(n, "train") for n in REPRESENTATIVES])
def test_preact_hooks_equal_a_hand_written_forward_and_outputs_are_unchanged(name, mode, one_thread):
    model = _randomized(name).train(mode == "train")
    names = preact_names(model)
    assert names == list(model.preact_names) and len(names) >= 3
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    reference = copy.deepcopy(model)  # the hand-written forward moves its own copy's BatchNorm statistics
    with torch.no_grad():
        expected_pre, expected_logits = HAND_FORWARD[type(model)](reference, x)
    got_pre, logits = _hooked(model, names, x)
    assert len(got_pre) == len(expected_pre)
    for n, got, want in zip(names, got_pre, expected_pre):
        assert torch.equal(got, want), n  # bit for bit: the same operations
    assert torch.equal(logits, expected_logits)  # the output is the pre-`preact` forward's, bit for bit
    # The state moves alike too (BatchNorm statistics in training mode).
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    # Gradients flow through the hooked maps (nothing in place overwrote them after the hook).
    torch.stack([f.square().mean() for f in got_pre]).sum().backward()
    assert model.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_relu_of_each_preact_is_the_post_activation_stage_output(name, one_thread):
    model = _randomized(name, seed=2).eval()
    names = preact_names(model)
    x = torch.randn(2, 3, 32, 32)
    if isinstance(model, ShuffleNetV2):  # the ReLU'd concatenation, channel-shuffled, is the stage's output
        post_names = ["layer1", "layer2", "layer3"]
        with torch.no_grad():
            pre, _ = _hooked(model, names, x)
            post, _ = _hooked(model, post_names, x)
        shuffle = model.layer1[1].shuffle
        for p, q in zip(pre, post):
            assert torch.equal(shuffle(F.relu(p)), q)
        return
    post_names = POST_ACTIVATION[type(model)]
    with torch.no_grad():
        pre, _ = _hooked(model, names, x)
        post, _ = _hooked(model, post_names, x)
    for n, p, q in zip(names, pre, post):
        assert torch.equal(p if isinstance(model, MobileNetV2) else F.relu(p), q), n


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_preact_modules_hold_no_state(name):
    with torch.device("meta"):
        model = get_model(name, num_classes=100)
    modules = dict(model.named_modules())
    assert all(n in modules for n in preact_names(model))
    for n in preact_names(model):
        if n.endswith("preact"):
            assert isinstance(modules[n], nn.Identity), n
    identities = [n for n, m in model.named_modules() if n.endswith("preact")]
    assert all(isinstance(modules[n], nn.Identity) for n in identities)
    assert not any("preact" in key for key in model.state_dict())
    assert [k for k, _ in REFERENCE[name]] == list(model.state_dict())  # RepDistiller's layout, unchanged


# torch.fx (BYOT's early exits cut a network with create_feature_extractor): traceable as before the preact
# modules, and cutting at any stage or pre-activation name gives what the hooks give. The zoo VGGs (input-size
# branch in forward) and ShuffleV2 (SplitBlock's int() of a size) were not traceable before and still are not.
NOT_TRACEABLE = {"vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "ShuffleV2"}


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_fx_feature_extraction_matches_hooks(name, one_thread):
    model = get_model(name, num_classes=10).eval()
    names = list(dict.fromkeys(stage_names(model) + preact_names(model)))
    if name in NOT_TRACEABLE:
        with pytest.raises(Exception):
            create_feature_extractor(model, return_nodes=names)
        return
    extractor = create_feature_extractor(model, return_nodes=names)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got = extractor(x)
        want, _ = _hooked(model, names, x)
    for n, w in zip(names, want):
        assert torch.equal(got[n], w), n


def test_preact_names_without_defaults_errors():
    with pytest.raises(ValueError, match="no default pre-activation layers.*config"):
        preact_names(torchvision.models.resnet18(num_classes=10))
