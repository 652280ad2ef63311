"""Real torchvision models: which boundaries fold, which are refused (and why), and fold exactness."""

from __future__ import annotations

import pytest
import torch
import torchvision
from conftest import max_rel_error, randomise_batchnorm

import surgery


def _blocks(factory, size=64):
    model = factory(num_classes=10).eval()
    return model, surgery.find_blocks(model, (torch.randn(2, 3, size, size),))


def _fold_error(model, x, **kwargs) -> tuple[float, torch.nn.Module]:
    randomise_batchnorm(model).eval()
    paired = surgery.insert_pairs(model, (x,), init="random", **kwargs).eval()
    thin = surgery.fold(paired)
    with torch.no_grad():
        return max_rel_error(paired(x), thin(x)), thin


def test_resnet18_sites_and_reasons():
    _, table = _blocks(torchvision.models.resnet18)
    folding = {b.name for b in table.foldable}
    assert folding == {
        "conv1",
        "bn1",
        "maxpool",
        "layer1.0",
        "layer1",
        "layer2.0",
        "layer2",
        "layer3.0",
        "layer3",
        "layer4.0",
        "layer4",
    }
    relu = table.get("relu")
    assert not relu.foldable and "max-pool" in relu.reason and "not linear" in relu.reason
    # inside a stage the residual add keeps h; across stages the downsample conv absorbs W too
    assert table.get("layer1.0").route.kept and table.get("layer1.0").route.absorbed_by == [
        "layer1.1.conv1.weight"
    ]
    assert table.get("layer1").route.absorbed_by == [
        "layer2.0.conv1.weight",
        "layer2.0.downsample.0.weight",
    ]
    assert table.get("layer4").route.absorbed_by == ["fc.weight"]  # through avgpool and flatten
    assert table.get("bn1").route.kind == "producer through BatchNorm"
    assert table.get("layer1.1") is table.get("layer1")  # aliases
    assert "layer4" in str(table) and "max-pool" in str(table)


def test_resnet50_paper_split_folds_exactly():
    model, table = _blocks(torchvision.models.resnet50)
    for name in (
        "maxpool",
        "layer1",
        "layer2",
        "layer3",
        "layer4",
    ):  # stem -> layer1 ... layer4 -> fc
        assert table.get(name).route.kind == "consumer", name
    x = torch.randn(2, 3, 64, 64)
    randomise_batchnorm(model).eval()
    paired = surgery.insert_pairs(model, (x,), init="random", wide=2).eval()
    thin = surgery.fold(paired)
    with torch.no_grad():
        assert max_rel_error(paired(x), thin(x)) <= 1e-5
    assert type(thin) is torchvision.models.ResNet
    torchvision.models.resnet50(num_classes=10).load_state_dict(thin.state_dict(), strict=True)
    report = surgery.verify(paired, thin, (x[:1],))  # ONNX Runtime, and the original's op histogram
    assert report.ok and report.same_ops and report.max_rel <= 1e-5


def test_vgg11_bn_maxpool_refused_rest_folds():
    model, table = _blocks(torchvision.models.vgg11_bn)
    refused = {b.name for b in table if not b.foldable}
    assert refused == {
        "features.2",
        "features.6",
        "features.13",
        "features.20",
        "features.27",
    }  # ReLU -> MaxPool
    assert all("max-pool" in table.get(n).reason for n in refused)
    assert table.get("features").route.absorbed_by == [
        "classifier.0.weight"
    ]  # through avgpool + flatten (inner 49)
    assert table.get("features").route.targets[-1].inner == 49
    # the classifier's 4096-wide sites cost ~10^11 flops to fold; the feature sites cover every route
    features = [b.name for b in table.foldable if b.name.startswith("features.")]
    error, thin = _fold_error(model, torch.randn(2, 3, 64, 64), wide=1.5, sites=features)
    assert error <= 1e-5
    torchvision.models.vgg11_bn(num_classes=10).load_state_dict(thin.state_dict(), strict=True)


def test_mobilenet_v2_depthwise_refused_blocks_fold():
    model, table = _blocks(torchvision.models.mobilenet_v2)
    stem = table.get("features.0")
    assert not stem.foldable and "groups=32" in stem.reason
    for i in range(1, 18):
        assert table.get(f"features.{i}").route.kind == "consumer"
    error, thin = _fold_error(model, torch.randn(2, 3, 64, 64), wide=2)
    assert error <= 1e-5
    torchvision.models.mobilenet_v2(num_classes=10).load_state_dict(thin.state_dict(), strict=True)


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.mobilenet_v2])
def test_identity_init_equals_original(factory):
    model = randomise_batchnorm(factory(num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    paired = surgery.insert_pairs(model, (x,), wide=2.0).eval()
    with torch.no_grad():
        assert max_rel_error(model(x), paired(x)) <= 1e-5


def test_mnasnet_version_check_survives_fold_and_checkpoints(tmp_path):
    """MNASNet's _load_from_state_dict refuses a state without module versions: the fold and a
    checkpoint load must carry them."""
    model = torchvision.models.mnasnet0_5(num_classes=10)
    x = torch.randn(1, 3, 64, 64)
    error, thin = _fold_error(model, x)
    assert error <= 1e-5 and type(thin) is type(model)
    paired = surgery.insert_pairs(model.eval(), (x,), init="random").eval()
    path = surgery.save(paired, tmp_path / "paired.safetensors", source="torchvision.models:mnasnet0_5",
                        kwargs={"num_classes": 10})  # fmt: skip
    surgery.fold_checkpoint(path, tmp_path / "thin.safetensors")
    loaded = surgery.load(
        tmp_path / "thin.safetensors", into=torchvision.models.mnasnet0_5(num_classes=10)
    )
    with torch.no_grad():
        assert max_rel_error(paired(x), loaded(x)) <= 1e-5
