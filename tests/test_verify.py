"""verify: a folded model must match its paired model in ONNX Runtime and keep the original graph."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import surgery
from surgery.errors import SurgeryError


def _randomise_batchnorm(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics and affine terms (defaults make BN nearly the identity)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0.0, 0.2)


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """(paired resnet18 with random pairs, its fold, an input)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_batchnorm(model)
    x = torch.randn(1, 3, 32, 32)
    paired = surgery.insert_pairs(model.eval(), (x,), wide=2, init="random")
    return paired, surgery.fold(paired), x


def _mlp(*widths: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(widths, widths[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_fold_matches_paired_in_onnxruntime(resnet_pair):
    paired, thin, x = resnet_pair
    report = surgery.verify(paired, thin, (x,))
    expected = "CUDAExecutionProvider" if torch.cuda.is_available() else "CPUExecutionProvider"
    assert report.ok, str(report)
    assert report.runtime == "onnxruntime" and report.provider == expected
    assert report.outputs == 1 and report.max_rel <= 1e-5
    assert report.structure_checked and report.same_ops and report.op_difference == {}
    assert report.candidate_params == report.original_params > 0
    assert expected in str(report) and "OK" in str(report)


def test_perturbed_weight_fails(resnet_pair):
    paired, thin, x = resnet_pair
    broken = surgery.fold(paired)
    with torch.no_grad():
        broken.fc.weight.add_(0.1)
    report = surgery.verify(paired, broken, x)
    assert not report.ok and report.max_abs > 1e-3
    assert report.same_ops  # same architecture: only the numbers are wrong
    assert "max abs error" in report.reason and "FAILED" in str(report)


def test_torch_runtime(resnet_pair):
    paired, thin, x = resnet_pair
    report = surgery.verify(paired, thin, (x,), runtime="torch")
    assert report.ok and report.provider == "torch" and report.max_rel <= 1e-5
    assert not report.structure_checked and report.same_ops is None


def test_unknown_runtime_is_refused(resnet_pair):
    paired, thin, x = resnet_pair
    with pytest.raises(ValueError, match="onnxruntime"):
        surgery.verify(paired, thin, (x,), runtime="tensorrt")


class _ConvNet(nn.Module):
    """Small conv/BN net (not nn.Sequential, whose forward would also call the paired `pairs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_training_flags_and_statistics_are_left_alone():
    torch.manual_seed(0)
    model = _ConvNet()
    _randomise_batchnorm(model)
    x = torch.randn(2, 3, 16, 16)
    paired = surgery.insert_pairs(model.eval(), (x,), wide=2, init="random")
    thin = surgery.fold(paired)
    paired.train(), thin.train()
    thin.bn1.eval()  # a mixed state must come back exactly as it was
    flags = [[m.training for m in net.modules()] for net in (paired, thin)]
    stats = [net.bn1.running_mean.clone() for net in (paired, thin)]
    report = surgery.verify(paired, thin, (x,))
    assert report.ok, str(report)
    assert [[m.training for m in net.modules()] for net in (paired, thin)] == flags
    for net, before in zip((paired, thin), stats, strict=True):
        assert torch.equal(net.bn1.running_mean, before)


def test_different_architecture_fails_the_structural_check():
    torch.manual_seed(0)
    candidate = _mlp(8, 16, 4)
    report = surgery.verify(candidate, candidate, torch.randn(2, 8), original=_mlp(8, 16, 16, 4))
    assert report.max_abs == 0.0  # numerically identical, structurally not the original
    assert report.structure_checked and report.same_ops is False
    assert report.op_difference  # e.g. {"Gemm": (2, 3), "Relu": (1, 2)}
    assert all(c < o for c, o in report.op_difference.values())
    assert report.candidate_params < report.original_params
    assert not report.ok and "parameters" in report.reason


def test_structure_does_not_depend_on_weight_values():
    """The exporter's optimizer would drop zero biases and merge equal tensors; verify must not."""
    torch.manual_seed(0)
    candidate, original = _mlp(8, 8, 8), _mlp(8, 8, 8)
    with torch.no_grad():
        original[2].weight.copy_(original[0].weight)
        original[2].bias.zero_()
    report = surgery.verify(candidate, candidate, torch.randn(2, 8), original=original)
    assert report.ok, str(report)
    assert report.candidate_params == report.original_params == 144


def test_structure_is_not_applicable_without_an_original():
    model = _mlp(8, 4)
    report = surgery.verify(model, model, torch.randn(2, 8))
    assert report.ok and not report.structure_checked and report.same_ops is None
    assert "n/a" in str(report)


class _DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.nonzero().float() if x.sum() > 0 else x


def test_export_failure_names_the_model():
    with pytest.raises(
        SurgeryError, match=r"^could not export the candidate model \(_DataDependent\)"
    ):
        surgery.verify(_mlp(3, 3), _DataDependent(), torch.randn(2, 3), runtime="onnxruntime")
