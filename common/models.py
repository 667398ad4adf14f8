"""The one model factory for server and clients: torchvision ResNets made DP-compatible.

Opacus computes per-sample gradients with hooks on each layer, which rules out BatchNorm (it
mixes samples) and in-place operations on hooked activations (torchvision's ``out += identity``
and ``ReLU(inplace=True)``). :func:`build_model` swaps BatchNorm for GroupNorm and uses residual
blocks whose forward is out-of-place, so Opacus' fast ``hooks`` grad-sample mode works. The
result passes Opacus' ``ModuleValidator`` (checked in the tests).

Transfer learning follows the classic recipe: ImageNet (or public-CT) weights from a local
torchvision state dict, no network at run time. Two DP-compatible forms of a pretrained BatchNorm
ResNet (the ``norm`` setting):

- ``folded`` (the default with pretrained weights): each BatchNorm, with its running statistics,
  is folded into the convolution before it (a per-channel scale of the filters plus a bias), so
  the DP model computes *exactly* the pretrained function and has no normalisation layer left.
  Fine-tuning then starts from the features the weights were trained to produce.
- ``group``: BatchNorm's affine parameters become GroupNorm's and the convolutions are kept; the
  function changes (per-sample instead of dataset statistics), so the features must re-adapt.

A one-channel input sums the pretrained RGB filters.

It is this long because it is the one factory: blocks, normalisations, pretrained loading and
folding, freezing and stage lookup stay in one file, so server and sites build the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from fedct.common.errors import ConfigError

log = logging.getLogger(__name__)

ARCHITECTURES: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {}
FREEZE_POLICIES: tuple[str, ...] = ("none", "head", "bias", "film", "last1", "last2", "last3")
NORMS: tuple[str, ...] = ("group", "folded")
STEMS: tuple[str, ...] = ("imagenet", "compact")
POOLS: tuple[str, ...] = ("avg", "max")


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
        "resnet10": (DPBasicBlock, [1, 1, 1, 1]),
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


class ChannelAffine(nn.Module):
    """A per-channel scale and shift, ``y = weight * x + bias``, in the place of a folded
    BatchNorm; it starts as the identity (weight 1, bias 0), so the folded network computes
    exactly the pretrained function. Training only these (``freeze = film``, with the head) is
    FiLM fine-tuning (Perez et al., 2018; under DP, Tobaben et al., 2023): the sites re-scale
    and re-centre every channel of the pretrained filters - what a BatchNorm's affine
    parameters do - with 2 parameters a channel (9,600 for ResNet-18), so DP noise spreads over
    few coordinates. Per-sample gradients: :mod:`client.grad_samplers`, :mod:`client.bookkeeping`.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._checked: tuple[int, ...] = ()
        self._identity = False

    def forward(self, x: Tensor) -> Tensor:
        if self._frozen_identity():  # the usual case: 10-15% of a folded ResNet's forward
            return x
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x, self.weight.view(1, -1, 1, 1))

    def _frozen_identity(self) -> bool:
        """Whether this affine is frozen at the identity, checked again only after its values
        change: a tensor's version counter moves with every in-place write (a state-dict load,
        a write under ``no_grad``); writes through ``.data`` bypass it and are not seen."""
        if self.weight.requires_grad or self.bias.requires_grad:
            return False
        key = (
            id(self.weight),
            id(self.bias),
            self.weight._version,
            self.bias._version,
            self.weight.data_ptr(),
            self.bias.data_ptr(),
        )
        if key != self._checked:
            self._checked = key
            self._identity = bool((self.weight == 1).all() and (self.bias == 0).all())
        return self._identity


class WidthResNet(ResNet):
    """torchvision's ResNet with ``width`` channels in its stem and first stage (torchvision: 64),
    doubling per stage as usual. DP-SGD adds noise of the same size to every trained coordinate,
    so a network with fewer parameters gets a better signal-to-noise ratio per step; the layer
    names stay torchvision's, so Grad-CAM, freezing and model files work unchanged."""

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        *,
        width: int,
        num_classes: int,
        norm_layer: Callable[[int], nn.Module],
        zero_init_residual: bool = False,
    ) -> None:
        self._scale = width / 64
        super().__init__(block, layers, num_classes=num_classes, norm_layer=norm_layer)
        # torchvision builds the stem and head for 64 channels; rebuild them for `width`
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = norm_layer(width)
        self.fc = nn.Linear(int(512 * self._scale) * block.expansion, num_classes)
        if zero_init_residual:
            for m in self.modules():
                last = getattr(m, "bn3", None) or getattr(m, "bn2", None)
                if isinstance(m, BasicBlock | Bottleneck) and isinstance(last, nn.GroupNorm):
                    nn.init.zeros_(last.weight)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int = 1,
        dilate: bool = False,
    ) -> nn.Sequential:
        if planes == 64:  # the first stage follows the (rebuilt) stem
            self.inplanes = int(64 * self._scale)
        return super()._make_layer(block, int(planes * self._scale), blocks, stride, dilate)


def _replace_convolutions(
    module: nn.Module, kind: type[nn.Conv2d], *, bias: bool | None = None
) -> None:
    """Swap every plain ``nn.Conv2d`` under ``module`` for one of ``kind`` with the same geometry
    and weights; ``bias=True`` adds a zero bias where there was none."""
    for name, child in module.named_children():
        if type(child) is not nn.Conv2d:
            _replace_convolutions(child, kind, bias=bias)
            continue
        conv = kind(
            child.in_channels,
            child.out_channels,
            child.kernel_size,  # type: ignore[arg-type]
            child.stride,  # type: ignore[arg-type]
            child.padding,  # type: ignore[arg-type]
            child.dilation,  # type: ignore[arg-type]
            child.groups,
            child.bias is not None or bool(bias),
        )
        with torch.no_grad():
            conv.weight.copy_(child.weight)
            if conv.bias is not None and child.bias is not None:
                conv.bias.copy_(child.bias)
            elif conv.bias is not None:
                conv.bias.zero_()
        setattr(module, name, conv)


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
    norm: str = "group"  # group: GroupNorm (+ weight standardization); folded: BatchNorm folded
    weight_standardization: bool = True  # group norm only
    width: int = 64  # channels of the stem and first stage (torchvision's ResNets: 64)
    # Start every residual block as the identity (Goyal et al.): it steadies long BatchNorm
    # trainings, but costs a short DP training from scratch its early progress (docs/recipe.md).
    zero_init_residual: bool = False
    # imagenet: torchvision's stem (7x7 convolution of stride 2, then a 3x3 max-pool of stride 2);
    # compact: the same convolution without the max-pool, so stage 1 sees a twice finer grid
    # and a 2-3 px lesion still covers a feature-map cell there.
    stem: str = "imagenet"
    # avg: torchvision's global average pool; max: global max pool - a slice is positive when
    # any one place holds a lesion, so a small lesion's evidence is not averaged away.
    pool: str = "avg"

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(
                f"unknown model {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}"
            )
        if self.num_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {self.num_classes}")
        if self.width not in (16, 32, 48, 64):
            raise ConfigError(f"model width must be one of 16, 32, 48, 64; got {self.width}")
        if self.width != 64 and self.pretrained is not None:
            raise ConfigError(
                f"pretrained torchvision weights have width 64; width {self.width} trains from "
                "scratch (omit pretrained, or set width = 64)"
            )
        if self.stem not in STEMS:
            raise ConfigError(f"model stem must be one of {', '.join(STEMS)}; got {self.stem!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"model pool must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if self.in_channels not in (1, 3):
            raise ConfigError(f"input channels must be 1 or 3, got {self.in_channels}")
        if self.norm not in NORMS:
            raise ConfigError(
                f"unknown norm {self.norm!r}; choose group (GroupNorm, trains from scratch) or "
                "folded (pretrained BatchNorm folded into the convolutions)"
            )
        if self.freeze not in FREEZE_POLICIES:
            raise ConfigError(
                f"unknown freeze policy {self.freeze!r}; choose one of {', '.join(FREEZE_POLICIES)}"
                " (none: train all; head: only the classifier; bias: the head and every bias;"
                " lastN: head + last N stages)"
            )


def build_model(cfg: ModelConfig) -> ResNet:
    """A DP-compatible ResNet per ``cfg``, initialised from ``cfg.pretrained`` if given."""
    block, layers = ARCHITECTURES[cfg.architecture]
    if cfg.norm == "folded":
        # No normalisation: every convolution gets the bias a folded BatchNorm leaves, and an
        # identity ChannelAffine stands where the BatchNorm was (trained by freeze = film).
        model = ResNet(block, layers, num_classes=cfg.num_classes, norm_layer=ChannelAffine)
        _replace_convolutions(model, nn.Conv2d, bias=True)
    elif cfg.width != 64:
        model = WidthResNet(
            block,
            layers,
            width=cfg.width,
            num_classes=cfg.num_classes,
            norm_layer=group_norm,
            zero_init_residual=cfg.zero_init_residual,
        )
    else:
        model = ResNet(
            block,
            layers,
            num_classes=cfg.num_classes,
            norm_layer=group_norm,
            zero_init_residual=cfg.zero_init_residual,
        )
    if cfg.stem == "compact":
        model.maxpool = nn.Identity()
    if cfg.pool == "max":
        model.avgpool = nn.AdaptiveMaxPool2d(1)
    for module in model.modules():  # ReLU(inplace=True) would overwrite hooked activations
        if isinstance(module, nn.ReLU):
            module.inplace = False
    if cfg.pretrained is not None:
        if cfg.norm == "folded":
            load_folded(model, cfg.pretrained)
        else:
            load_pretrained(model, cfg.pretrained)
    if cfg.in_channels == 1:
        _to_one_channel(model)
    if cfg.weight_standardization and cfg.norm == "group":
        _replace_convolutions(model, WSConv2d)
    apply_freeze(model, cfg.freeze)
    return model


def load_pretrained(model: ResNet, path: Path) -> None:
    """Load ImageNet weights from a torchvision ResNet state dict file (BatchNorm or GroupNorm).

    The classifier head is kept only where it has this model's shape (a head trained on the
    same classes); ImageNet's 1000-class head is left as initialised.
    """
    state = _as_rgb_input(read_state_dict(path))
    own = model.state_dict()
    converted: dict[str, Tensor] = _matching_head(state, own, path)
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


def load_folded(model: ResNet, path: Path) -> None:
    """Load a BatchNorm ResNet state dict into the norm-free model, folding each BatchNorm into
    the convolution before it: for ``y = gamma * (conv(x) - mean) / sqrt(var + eps) + beta``
    the convolution's filters are scaled by ``s = gamma / sqrt(var + eps)`` per output channel
    and its bias becomes ``beta - s * mean``. A state dict of this folded form (e.g. a FedCT
    global model) loads as it is.

    There is no library function for this on state dicts: ``torch.nn.utils.fuse_conv_bn_weights``
    fuses one pair of tensors, and is what each fold below uses.
    """
    state = _as_rgb_input(read_state_dict(path))
    own = model.state_dict()
    loaded: dict[str, Tensor] = _matching_head(state, own, path)
    convs = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        weight, bias = f"{conv}.weight", f"{conv}.bias"
        bn = _norm_after(conv)
        if weight not in state:
            raise ConfigError(
                f"{path} has no {weight!r}; is it a torchvision {type(model).__name__} state "
                "dict of the same depth?"
            )
        if state[weight].shape != own[weight].shape:
            raise ConfigError(
                f"{path}: weight {weight!r} has shape {tuple(state[weight].shape)}, the model "
                f"expects {tuple(own[weight].shape)}; wrong architecture?"
            )
        if bias in state:
            loaded[weight], loaded[bias] = state[weight], state[bias]
            continue
        stats = [f"{bn}.{k}" for k in ("running_mean", "running_var", "weight", "bias")]
        if not all(k in state for k in stats):
            raise ConfigError(
                f"{path} has no BatchNorm statistics for {conv!r} ({bn}.running_mean/var), so "
                'they cannot be folded (GroupNorm weights?); set norm = "group" for this file'
            )
        mean, var, gamma, beta = (state[k].float() for k in stats)
        fused_w, fused_b = torch.nn.utils.fuse_conv_bn_weights(
            state[weight].float(), None, mean, var, 1e-5, gamma, beta
        )
        loaded[weight], loaded[bias] = fused_w.detach(), fused_b.detach()
    for name, module in model.named_modules():
        if not isinstance(module, ChannelAffine):
            continue
        # a folded file's trained affine (FedCT's own global models); identity where the file's
        # BatchNorm was just folded into the convolution, or where an older file has none
        keys = (f"{name}.weight", f"{name}.bias")
        folded_here = f"{name}.running_mean" in state
        for key, param in zip(keys, (module.weight, module.bias), strict=True):
            value = None if folded_here else state.get(key)
            if value is not None and value.shape != param.shape:
                raise ConfigError(
                    f"{path}: weight {key!r} has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(param.shape)}; wrong architecture?"
                )
            loaded[key] = param.detach() if value is None else value
    missing = [k for k in own if not k.startswith("fc.") and k not in loaded]
    if missing:
        raise ConfigError(f"{path} lacks {len(missing)} weights of this model, e.g. {missing[0]!r}")
    model.load_state_dict(loaded, strict=False)
    log.info("initialised %d tensors from %s (BatchNorm folded)", len(loaded), path.name)


def _norm_after(conv: str) -> str:
    """torchvision ResNet's name for the BatchNorm that follows convolution ``conv``."""
    head, _, last = conv.rpartition(".")
    prefix = f"{head}." if head else ""
    if last.startswith("conv"):
        return f"{prefix}bn{last.removeprefix('conv')}"
    if last == "0" and head.endswith("downsample"):
        return f"{head}.1"
    raise ConfigError(f"no BatchNorm is known to follow convolution {conv!r}")


def _matching_head(
    state: Mapping[str, Tensor], own: Mapping[str, Tensor], path: Path
) -> dict[str, Tensor]:
    head = {k: state[k] for k in ("fc.weight", "fc.bias") if k in state}
    if len(head) == 2 and all(head[k].shape == own[k].shape for k in head):
        log.info("%s: keeping its classifier head (same number of classes)", path.name)
        return head
    return {}


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


def _as_rgb_input(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A one-channel first convolution (e.g. pretrained on a single CT window) spread evenly over
    three input channels: the factory builds RGB first, and summing back to one channel (as
    :func:`_to_one_channel` does) then restores the file's filters exactly."""
    out = dict(state)
    first = out.get("conv1.weight")
    if first is not None and first.shape[1] == 1:
        out["conv1.weight"] = first.expand(-1, 3, -1, -1) / 3
    return out


def _to_one_channel(model: ResNet) -> None:
    """Collapse the first convolution to one input channel by summing its RGB filters: a gray
    image replicated on three channels then gives exactly the pretrained response."""
    old = model.conv1
    new = nn.Conv2d(
        1, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None
    )
    with torch.no_grad():
        new.weight.copy_(old.weight.sum(dim=1, keepdim=True))
        if old.bias is not None:
            new.bias.copy_(old.bias)  # type: ignore[union-attr]
    model.conv1 = new


def apply_freeze(model: ResNet, policy: str) -> None:
    """Freeze all but the head (``head``), the head and every bias (``bias``), or the head and
    the last N stages (``lastN``).

    Frozen parameters get no gradient, so Opacus computes no per-sample gradient and adds no
    noise for them: DP fine-tuning gets faster and more accurate. ``bias`` is BitFit (Ben Zaken
    et al., 2022; under DP, Bu et al., 2024): in a folded network each convolution's bias is
    its folded BatchNorm's shift, so the sites re-centre every channel (a scanner's contrast
    and noise level) while the pretrained filters stay as they are: 5,826 of ResNet-18's 11.2M
    parameters (2 classes), so DP noise is spread over few coordinates.
    """
    affine = [m for m in model.modules() if isinstance(m, ChannelAffine)]
    if policy == "film":
        if not affine:
            raise ConfigError(
                'freeze = "film" trains the per-channel affine of a folded network; it needs '
                'pretrained BatchNorm weights (norm = "folded")'
            )
        trainable: list[nn.Module] = [model.fc, *affine]
    elif policy == "none":
        trainable = [model]
    elif policy == "bias":
        trainable = []
    else:
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        n = 0 if policy == "head" else int(policy.removeprefix("last"))
        trainable = [model.fc, *stages[len(stages) - n :]]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in trainable:
        for p in module.parameters():
            p.requires_grad_(True)
    if policy == "bias":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc.") or name.endswith(".bias"))
    if policy != "film":
        # only FiLM trains the affine: elsewhere it would duplicate the convolutions' own
        # scale and bias (the same gradient counted twice under DP) and cost its skip
        for module in affine:
            module.requires_grad_(False)


def channel_affine_keys(model: nn.Module) -> set[str]:
    """The state-dict names of every :class:`ChannelAffine` parameter of ``model``."""
    return {
        f"{name}.{param}"
        for name, module in model.named_modules()
        if isinstance(module, ChannelAffine)
        for param in ("weight", "bias")
    }


RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
CAM_LAYERS = ("auto", *RESNET_STAGES)  # auto: common/gradcam.py picks by image size


def resnet_stage(model: nn.Module, name: str) -> nn.Module:
    """A residual stage of a ResNet by name (Grad-CAM's target; ``layer4`` is the last)."""
    if name not in RESNET_STAGES:
        raise ConfigError(f"unknown ResNet stage {name!r}; choose one of {RESNET_STAGES}")
    layer = getattr(model, name, None)
    if not isinstance(layer, nn.Module):
        raise ConfigError(f"{type(model).__name__} has no {name}; Grad-CAM needs a ResNet")
    return layer


def stage_shapes(model: nn.Module, image_size: int) -> dict[str, tuple[int, int, int]]:
    """Each residual stage's output ``(channels, height, width)`` for one ``image_size`` slice,
    from a forward pass of zeros (the model's mode is restored)."""
    shapes: dict[str, tuple[int, int, int]] = {}
    hooks = [
        resnet_stage(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:]))
        )
        for name in RESNET_STAGES
    ]
    was_training = model.training
    try:
        channels = next(p.shape[1] for p in model.parameters() if p.dim() == 4)
        with torch.no_grad():
            model.eval()(torch.zeros(1, channels, image_size, image_size))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return shapes
