from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn

import client.grad_samplers  # noqa: F401  (registers the WSConv2d grad sampler)
from common.errors import ConfigError
from common.models import ModelConfig, WSConv2d, build_model


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_models_are_dp_compatible(arch: str) -> None:
    model = build_model(ModelConfig(architecture=arch, num_classes=3))
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_opacus_hooks_mode_gives_true_per_sample_gradients() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(architecture="resnet18", in_channels=1))
    model.train()  # Opacus captures activations in train mode (GroupNorm: no batch statistics)
    x, y = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 1])
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in model.named_parameters()}
    gsm.remove_hooks()
    gsm.cleanup()
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(
                per_sample[name][i],
                p.grad,
                atol=1e-4,
                rtol=1e-3,
                msg=lambda m, name=name: f"{name}: {m}",
            )


def test_pretrained_round_trip_from_a_torchvision_state_dict(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18()  # BatchNorm, as ImageNet weights are
    for p in reference.parameters():
        nn.init.normal_(p)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model(ModelConfig(pretrained=path, weight_standardization=False))
    torch.testing.assert_close(model.conv1.weight, reference.conv1.weight)
    torch.testing.assert_close(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    torch.testing.assert_close(model.layer2[0].bn1.weight, reference.layer2[0].bn1.weight)
    assert model.fc.weight.shape == (2, 512)  # a new head for our classes

    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(tmp_path / "w.safetensors"),
    )
    one = build_model(ModelConfig(pretrained=tmp_path / "w.safetensors", in_channels=1))
    assert isinstance(one.conv1, WSConv2d)
    torch.testing.assert_close(one.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))


def test_missing_or_wrong_weights_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="downloads nothing"):
        build_model(ModelConfig(pretrained=tmp_path / "absent.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(ConfigError, match=r"does not belong|shape"):
        build_model(ModelConfig(pretrained=tmp_path / "r34.pth"))
    torch.save({"not": "tensors"}, tmp_path / "junk.pth")
    with pytest.raises(ConfigError):
        build_model(ModelConfig(pretrained=tmp_path / "junk.pth"))


@pytest.mark.parametrize(("policy", "stages"), [("head", 0), ("last1", 1), ("last2", 2)])
def test_freeze_policy(policy: str, stages: int) -> None:
    model = build_model(ModelConfig(freeze=policy))
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc", *[f"layer{5 - k}" for k in range(1, stages + 1)]}


def test_config_errors_list_allowed_values() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        ModelConfig(architecture="vgg16")
    with pytest.raises(ConfigError, match="head"):
        ModelConfig(freeze="most")
