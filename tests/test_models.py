from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from safetensors.torch import save_file
from torch import nn

import fedct.client.grad_samplers  # noqa: F401  (registers the WSConv2d grad sampler)
from fedct.common.errors import ConfigError
from fedct.common.models import (
    ChannelAffine,
    ModelConfig,
    WSConv2d,
    build_model,
    channel_affine_keys,
)


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


@pytest.mark.parametrize("norm", ["folded", "group"])
def test_bias_freeze_policy_trains_the_head_and_every_bias(norm: str) -> None:
    model = build_model(ModelConfig(norm=norm, freeze="bias"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"fc.weight", "fc.bias", "conv1.bias" if norm == "folded" else "bn1.bias"} <= trainable
    assert all(n.startswith("fc.") or n.endswith(".bias") for n in trainable)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "layer4.1.conv2.weight" in frozen
    assert "conv1.weight" in frozen
    affine = channel_affine_keys(model)  # folded: FiLM's own, frozen unless freeze = film
    biases = [n for n, _ in model.named_parameters() if n.endswith(".bias") and n not in affine]
    assert set(biases) <= trainable
    assert not affine & trainable
    assert len(biases) > 10
    if norm == "folded":  # BitFit's size in the docs: every convolution's bias and the head
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5826


def test_film_freeze_policy_trains_the_head_and_every_channel_affine() -> None:
    model = build_model(ModelConfig(norm="folded", freeze="film"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    affine = {
        f"{name}.{p}"
        for name, m in model.named_modules()
        if isinstance(m, ChannelAffine)
        for p in ("weight", "bias")
    }
    assert trainable == {"fc.weight", "fc.bias", *affine}
    assert {"bn1.weight", "layer4.1.bn2.bias", "layer2.0.downsample.1.weight"} <= affine
    assert sum(p.numel() for n, p in model.named_parameters() if n in affine) == 9600
    with pytest.raises(ConfigError, match="folded"):
        build_model(ModelConfig(norm="group", freeze="film"))
    for policy in ("none", "last2", "head"):  # only FiLM trains the affine
        other = build_model(ModelConfig(norm="folded", freeze=policy))
        assert not any(p.requires_grad for n, p in other.named_parameters() if n in affine)


def test_config_errors_list_allowed_values() -> None:
    with pytest.raises(ConfigError, match="resnet18"):
        ModelConfig(architecture="vgg16")
    with pytest.raises(ConfigError, match="head"):
        ModelConfig(freeze="most")


def _trained_like_batchnorm_resnet() -> nn.Module:
    """A stock BatchNorm ResNet-18 with non-trivial running statistics, in eval mode."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet18(num_classes=2)
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.normal_(m.bias, 0, 0.1)
            m.running_mean.normal_(0, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return reference.eval()


def test_folded_model_computes_exactly_the_pretrained_batchnorm_network(tmp_path: Path) -> None:
    reference = _trained_like_batchnorm_resnet()
    path = tmp_path / "public.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    model = build_model(ModelConfig(pretrained=path, norm="folded"))
    assert not any(isinstance(m, nn.BatchNorm2d | nn.GroupNorm) for m in model.modules())
    model.train()  # no normalisation left: train and eval mode compute the same function
    assert ModuleValidator.validate(model, strict=False) == []
    x = torch.randn(4, 3, 64, 64)
    torch.testing.assert_close(model(x), reference(x), atol=1e-4, rtol=1e-4)  # head kept too

    # The folded form (a FedCT global model's weights) loads as it is.
    folded = tmp_path / "folded.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folded))
    again = build_model(ModelConfig(pretrained=folded, norm="folded", in_channels=1))
    assert again.conv1.bias is not None
    gray = torch.randn(2, 1, 64, 64)
    torch.testing.assert_close(
        again(gray), reference(gray.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4
    )

    # A global model whose per-channel affine was fine-tuned (freeze = film) keeps it.
    with torch.no_grad():
        model.layer3[1].bn2.weight.mul_(1.5)
        model.bn1.bias.add_(0.2)
    tuned = tmp_path / "tuned.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tuned))
    reloaded = build_model(ModelConfig(pretrained=tuned, norm="folded"))
    torch.testing.assert_close(reloaded(x), model(x))
    assert not torch.allclose(reloaded(x), reference(x), atol=1e-3)


@pytest.mark.parametrize("freeze", ["head", "film"])
def test_folded_model_gets_true_per_sample_gradients(freeze: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(norm="folded", freeze=freeze)).double().train()
    x, y = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 1])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    per_sample = {n: p.grad_sample.clone() for n, p in trainable.items()}
    gsm.remove_hooks()
    gsm.cleanup()
    for i in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        for name, p in trainable.items():
            torch.testing.assert_close(per_sample[name][i], p.grad, msg=name)


def test_groupnorm_weights_cannot_be_folded(tmp_path: Path) -> None:
    gn = build_model(ModelConfig(weight_standardization=False))
    path = tmp_path / "gn.safetensors"
    save_file({k: v.contiguous() for k, v in gn.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match='norm = "group"'):
        build_model(ModelConfig(pretrained=path, norm="folded"))
    with pytest.raises(ConfigError, match="folded"):
        ModelConfig(norm="layer")


def test_narrow_and_shallow_resnets_keep_torchvision_names() -> None:
    wide = build_model(ModelConfig())
    narrow = build_model(ModelConfig(architecture="resnet10", width=32))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) < count(wide) / 8
    assert {n.split(".")[0] for n, _ in narrow.named_parameters()} == {
        n.split(".")[0] for n, _ in wide.named_parameters()
    }
    assert narrow.conv1.out_channels == 32
    assert narrow.fc.in_features == 256
    assert narrow(torch.zeros(2, 3, 48, 48)).shape == (2, 2)
    assert ModuleValidator.validate(narrow, strict=False) == []
    with pytest.raises(ConfigError, match="width"):
        ModelConfig(width=24)
    with pytest.raises(ConfigError, match="from scratch"):
        ModelConfig(width=32, pretrained=Path("x.pth"))


@pytest.mark.parametrize("width", [64, 32])
def test_residual_blocks_start_as_the_identity_only_when_asked(width: int) -> None:
    for zero, value in ((False, 1.0), (True, 0.0)):
        model = build_model(ModelConfig(width=width, zero_init_residual=zero))
        last = [block.bn2.weight for block in model.layer1]
        assert all(torch.all(w == value) for w in last)


def test_compact_stem_and_max_pool_change_the_network_not_its_weights():
    base = build_model(ModelConfig())
    small = build_model(ModelConfig(stem="compact", pool="max"))
    assert base.state_dict().keys() == small.state_dict().keys()
    x = torch.randn(1, 3, 64, 64)
    # without the stem's max-pool, stage 1 sees a twice finer grid
    assert small.layer1(small.relu(small.bn1(small.conv1(x)))).shape[-1] == 32
    assert base.layer1(base.maxpool(base.relu(base.bn1(base.conv1(x))))).shape[-1] == 16
    features = torch.zeros(1, 512, 2, 2)
    features[0, :, 0, 0] = 4.0  # one place holds the evidence
    assert torch.allclose(small.avgpool(features).flatten(), torch.full((512,), 4.0))
    assert torch.allclose(base.avgpool(features).flatten(), torch.full((512,), 1.0))
    with pytest.raises(ConfigError, match="stem"):
        ModelConfig(stem="cifar")


def test_a_frozen_identity_affine_is_skipped_until_its_values_change() -> None:
    layer = ChannelAffine(4).requires_grad_(False)
    x = torch.randn(2, 4, 3, 3)
    assert layer(x) is x  # frozen at the identity: no work at all
    with torch.no_grad():
        layer.weight[1] = 2.0  # an in-place write, as load_state_dict makes
    out = layer(x)
    torch.testing.assert_close(out[:, 1], 2 * x[:, 1])
    torch.testing.assert_close(out[:, 0], x[:, 0])
    layer.load_state_dict({"weight": torch.ones(4), "bias": torch.zeros(4)})
    assert layer(x) is x
    trainable = ChannelAffine(4)  # at the identity but trained: gradients must flow
    trainable(x).sum().backward()
    assert trainable.weight.grad is not None
    torch.testing.assert_close(trainable.weight.grad, x.sum(dim=(0, 2, 3)))
