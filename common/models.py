"""The one model factory for server and clients: torchvision ResNets made DP-compatible.

Opacus computes per-sample gradients with hooks on each layer, which rules out BatchNorm (it
mixes samples) and in-place operations on hooked activations (torchvision's ``out += identity``
and ``ReLU(inplace=True)``). :func:`build_model` swaps BatchNorm for GroupNorm and uses residual
blocks whose forward is out-of-place, so Opacus' fast ``hooks`` grad-sample mode works. The
result passes Opacus' ``ModuleValidator`` (checked in the tests).

Transfer learning follows the classic recipe: ImageNet weights from a local torchvision state
dict (no network at run time); BatchNorm's affine parameters become GroupNorm's, convolutions are
kept as they are, and a one-channel input sums the pretrained RGB filters.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from common.errors import ConfigError

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {}
FREEZE_POLICIES: tuple[str, ...] = ("none", "head", "last1", "last2", "last3")


class DPBasicBlock(BasicBlock):
    """torchvision's BasicBlock with an out-of-place residual sum (for Opacus' hooks)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class DPBottleneck(Bottleneck):
    """torchvision's Bottleneck with an out-of-place residual sum (for Opacus' hooks)."""

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x) if self.downsample is not None else x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


ARCHITECTURES.update(
    {
        "resnet18": (DPBasicBlock, [2, 2, 2, 2]),
        "resnet34": (DPBasicBlock, [3, 4, 6, 3]),
        "resnet50": (DPBottleneck, [3, 4, 6, 3]),
    }
)


class WSConv2d(nn.Conv2d):
    """A convolution with Weight Standardization (Qiao et al., 2019): each output filter is
    standardized to zero mean and unit variance before use. GroupNorm alone trains ResNets much
    slower than BatchNorm; GroupNorm plus weight standardization closes most of that gap, and
    both are per-sample operations, as DP-SGD requires. Opacus gets a closed-form per-sample
    gradient for it in :mod:`client.grad_samplers`."""

    eps = 1e-5

    def standardized_weight(self) -> Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.eps)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


def _standardize_convolutions(module: nn.Module) -> None:
    for name, child in module.named_children():
        if type(child) is nn.Conv2d:
            ws = WSConv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,  # type: ignore[arg-type]
                child.stride,  # type: ignore[arg-type]
                child.padding,  # type: ignore[arg-type]
                child.dilation,  # type: ignore[arg-type]
                child.groups,
                child.bias is not None,
            )
            ws.load_state_dict(child.state_dict())
            setattr(module, name, ws)
        else:
            _standardize_convolutions(child)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where possible (Wu & He's default), fewer for thin layers."""
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str = "resnet18"
    num_classes: int = 2
    in_channels: int = 3
    pretrained: Path | None = None  # a torchvision ImageNet state dict (.pth or .safetensors)
    freeze: str = "none"
    weight_standardization: bool = True

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown model {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"input channels must be 1 or 3, got {self.in_channels}")
        if self.freeze not in FREEZE_POLICIES:
            raise ConfigError(
                f"unknown freeze policy {self.freeze!r}; choose one of {', '.join(FREEZE_POLICIES)}"
                " (none: train all; head: only the classifier; lastN: head + last N stages)"
            )


def build_model(cfg: ModelConfig) -> ResNet:
    """A DP-compatible ResNet per ``cfg``, initialised from ``cfg.pretrained`` if given."""
    block, layers = ARCHITECTURES[cfg.architecture]
    # zero_init_residual: each block starts as the identity, which GroupNorm ResNets need to
    # train stably from scratch (there are no batch statistics to tame the residual sums).
    model = ResNet(
        block, layers, num_classes=cfg.num_classes, norm_layer=group_norm, zero_init_residual=True
    )
    for module in model.modules():  # ReLU(inplace=True) would overwrite hooked activations
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if cfg.pretrained is not None:
        load_pretrained(model, cfg.pretrained)
    if cfg.in_channels == 1:
        _to_one_channel(model)
    if cfg.weight_standardization:
        _standardize_convolutions(model)
    apply_freeze(model, cfg.freeze)
    return model


def load_pretrained(model: ResNet, path: Path) -> None:
    """Load ImageNet weights from a torchvision ResNet state dict file (BatchNorm or GroupNorm).

    The classifier head is left as initialised (ImageNet's 1000 classes are not ours).
    """
    state = read_state_dict(path)
    own = model.state_dict()
    converted: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # BatchNorm statistics have no GroupNorm counterpart
        if key.startswith("fc."):
            continue
        if key not in own:
            raise ConfigError(
                f"{path}: weight {key!r} does not belong to this model; is it a "
                f"torchvision {type(model).__name__} state dict of the same depth?"
            )
        if own[key].shape != value.shape:
            raise ConfigError(
                f"{path}: weight {key!r} has shape {tuple(value.shape)}, the model "
                f"expects {tuple(own[key].shape)}; wrong architecture?"
            )
        converted[key] = value
    missing = [k for k in own if not k.startswith("fc.") and k not in converted]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} weights of this model, e.g. {missing[0]!r}")
    model.load_state_dict(converted, strict=False)
    log.info("initialised %d tensors from %s", len(converted), path.name)


def read_state_dict(path: Path) -> Mapping[str, Tensor]:
    """Read a state dict safely: safetensors, or a torch file with ``weights_only=True`` (which
    refuses arbitrary pickled objects)."""
    if not path.is_file():
        raise ConfigError(
            f"pretrained weights {path} not found. FedCT downloads nothing at run time: copy "
            "torchvision's ImageNet file (e.g. resnet18-f37072fd.pth from the torchvision "
            f"model zoo) to {path}, or omit the pretrained setting to start from scratch."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for bad files
        raise ConfigError(f"cannot read weights from {path}: {err}") from err
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{path} is not a state dict of tensors")
    return state


def _to_one_channel(model: ResNet) -> None:
    """Collapse the first convolution to one input channel by summing its RGB filters: a gray
    image replicated on three channels then gives exactly the pretrained response."""
    old = model.conv1
    new = nn.Conv2d(1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False)
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    model.conv1 = new


def apply_freeze(model: ResNet, policy: str) -> None:
    """Freeze all but the head (``head``) or the head and the last N stages (``lastN``).

    Frozen parameters get no gradient, so Opacus computes no per-sample gradient and adds no
    noise for them: DP fine-tuning gets faster and more accurate.
    """
    if policy == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return
    trainable_stages = 0 if policy == "head" else int(policy.removeprefix("last"))
    stages = [model.layer1, model.layer2, model.layer3, model.layer4]
    trainable: list[nn.Module] = [model.fc, *stages[len(stages) - trainable_stages :]]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)


def last_conv_stage(model: nn.Module) -> nn.Module:
    """The module whose activations Grad-CAM uses (the last residual stage)."""
    layer = getattr(model, "layer4", None)
    if not isinstance(layer, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no layer4; Grad-CAM needs a ResNet")
    return layer
