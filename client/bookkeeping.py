"""Per-sample clipping for DP-SGD in one backward pass ("book-keeping", Bu et al., ICML 2023).

DP-SGD clips every sample's gradient before summing. Opacus' default (hooks mode) materialises
every per-sample gradient - batch x 11M floats for a ResNet-18, several times a plain step's
cost (measured in docs/benchmarks.md, DP-SGD cost). Its ghost mode avoids that for Linear
layers only and pays a second backward pass. Book-keeping needs neither:

1. one backward pass computes only the *activation* gradients (no weight gradients); Opacus'
   hooks (``GradSampleModuleFastGradientClipping``) hand each layer its input and output
   gradient, from which the norm samplers below take each sample's gradient **norm** - by the
   ghost identity ``||G Aᵀ||² = Σ (AᵀA) ⊙ (GᵀG)`` where that is cheaper (late stages: few
   positions, millions of weights), else from the small per-sample gradient (early stages);
2. the clipping factors ``c_i = min(1, C / ||g_i||)`` follow (Opacus' ``get_clipping_coef``);
3. each layer's clipped sum ``Σ c_i g_i`` is computed directly: one weight-gradient
   convolution on the output gradients reweighted by ``c`` (or ``c``-weighted per-sample
   gradients where the norm step already had them).

Noise, accounting, Poisson sampling and virtual batches stay Opacus'
(``DPOptimizerFastGradientClipping``, ``DPDataLoader``, ``BatchMemoryManager``). The update is
exactly Opacus' clipped update (tests/test_bookkeeping.py). Written by hand because no
maintained library does it for Opacus 1.6 (the paper's fastDP is not on PyPI), and it is what
brings a DP step of a ResNet trained from scratch near a plain one (docs/benchmarks.md).
Supports the layers of FedCT's models: Conv2d (ungrouped), weight-standardized Conv2d,
GroupNorm, FedCT's per-channel affine (``freeze = film``) and Linear; anything else is
refused up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.grad_sample.group_norm import compute_group_norm_grad_sample
from opacus.utils.module_utils import trainable_modules
from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from fedct.client.grad_samplers import (
    channel_affine_per_sample,
    standardization,
    through_standardization,
    unfolded,
)
from fedct.common.errors import ConfigError
from fedct.common.models import ChannelAffine, WSConv2d

ClippedSum = Callable[[Tensor], dict[Tensor, Tensor]]  # clipping factors -> Σ c_i g_i
Sampler = TypeVar("Sampler", bound=Callable[..., tuple[dict[Tensor, Tensor], ClippedSum]])


class BookkeepingModule(GradSampleModuleFastGradientClipping):
    """``model`` wrapped for book-keeping clipping; train with :meth:`backward`, then the
    ``DPOptimizerFastGradientClipping``'s ``step`` (which adds the noise)."""

    # FedCT's own registry (not Opacus' global one): its norm samplers also keep the clipped sums
    NORM_SAMPLERS: ClassVar[dict[type[nn.Module], Callable[..., dict[Tensor, Tensor]]]] = {}

    def __init__(self, model: nn.Module, *, max_grad_norm: float) -> None:
        unsupported = sorted(
            {
                type(m).__name__
                for _, m in trainable_modules(model)
                if type(m) not in self.NORM_SAMPLERS or getattr(m, "groups", 1) != 1
            }
        )
        if unsupported:
            raise ConfigError(
                f'dp-clipping = "bookkeeping" does not support trainable {", ".join(unsupported)}'
                ' layers; set dp-clipping = "hooks" (Opacus\' per-sample gradients) instead'
            )
        super().__init__(
            model,
            batch_first=True,
            loss_reduction="mean",
            strict=True,
            max_grad_norm=max_grad_norm,
            use_ghost_clipping=True,
        )
        self._leaves: list[Tensor] = []
        self._own_hooks = [
            m.register_forward_pre_hook(self._track_inputs) for _, m in trainable_modules(model)
        ] + [
            m.register_forward_hook(self._keep_response)
            for _, m in trainable_modules(model)
            if isinstance(m, WSConv2d)
        ]

    def _recording(self, module: nn.Module) -> bool:
        return module.training and torch.is_grad_enabled() and self.hooks_enabled

    def _track_inputs(self, module: nn.Module, args: tuple[object, ...]) -> tuple | None:
        """Make inputs that need no gradient (images, frozen layers' outputs) differentiable
        leaves, so the backward pass can ask for activation gradients only."""
        if not self._recording(module):
            return None
        replaced = [
            a.detach().requires_grad_()
            if isinstance(a, Tensor) and a.is_floating_point() and not a.requires_grad
            else a
            for a in args
        ]
        new = [b for a, b in zip(args, replaced, strict=True) if b is not a]
        if not new:
            return None
        self._leaves.extend(new)  # type: ignore[arg-type]
        return tuple(replaced)

    def _keep_response(self, module: nn.Module, args: tuple[object, ...], out: Tensor) -> None:
        """A weight-standardized conv's output ``ŵ·a_t`` (less its bias), which its ghost norm
        needs: kept instead of computed again (the graph holds it anyway)."""
        if self._recording(module):
            bias = getattr(module, "bias", None)
            response = out.detach() if bias is None else out.detach() - bias.detach().view(-1, 1, 1)
            _kept(module, "_responses").append(response)

    def backward(self, loss_per_sample: Tensor) -> None:
        """Set every trainable parameter's ``.grad`` to ``Σ_i c_i ∇loss_i``: the sum of the
        per-sample gradients of the batch, each clipped to ``max_grad_norm``."""
        leaves, self._leaves = self._leaves, []
        mean = loss_per_sample.mean()
        if leaves:  # activation gradients only: the hooks take norms and keep what step 3 needs
            torch.autograd.grad(mean, leaves, allow_unused=True)
        else:  # inputs that already required grad: weight gradients are computed and replaced
            mean.backward()
        coef = self.get_clipping_coef()
        for _, module in trainable_modules(self._module):
            for param, grad in _kept(module, "_clipped_sums").pop()(coef).items():
                param.grad = grad

    def remove_hooks(self) -> None:
        for handle in self._own_hooks:
            handle.remove()
        self._own_hooks = []
        for _, module in trainable_modules(self._module):
            for kept in ("_clipped_sums", "_responses"):
                module.__dict__.pop(kept, None)
        super().remove_hooks()


def _norm_sampler(layer_type: type[nn.Module]) -> Callable[[Sampler], Sampler]:
    """Register ``f(layer, input, output_grad) -> (norms, clipped_sum)`` for ``layer_type``:
    Opacus gets the norms; the layer keeps ``clipped_sum`` for ``BookkeepingModule.backward``."""

    def register(f: Sampler) -> Sampler:
        def norm_sampler(
            layer: nn.Module, activations: list[Tensor], backprops: Tensor
        ) -> dict[Tensor, Tensor]:
            norms, clipped_sum = f(layer, activations[0].to(backprops.dtype), backprops)
            _kept(layer, "_clipped_sums").append(clipped_sum)
            return norms

        BookkeepingModule.NORM_SAMPLERS[layer_type] = norm_sampler
        return f

    return register


def _kept(layer: nn.Module, name: str) -> list[Any]:
    """What the layer keeps per forward pass until its backward (taken last-in, first-out, as
    Opacus takes activations): ``_clipped_sums``, ``_responses``."""
    kept: list[Any] = layer.__dict__.setdefault(name, [])
    return kept


def _ghost_is_cheaper(columns: Tensor, grads: Tensor) -> bool:
    """Ghost norm ``T²(d + p)`` against the per-sample gradient ``T d p`` (per sample)."""
    d, positions = columns.shape[1], columns.shape[2]
    return positions * (d + grads.shape[1]) < d * grads.shape[1]


@_norm_sampler(nn.Conv2d)
@_norm_sampler(WSConv2d)
def _convolution(
    layer: nn.Conv2d, x: Tensor, backprops: Tensor
) -> tuple[dict[Tensor, Tensor], ClippedSum]:
    if not layer.weight.requires_grad:  # bias only (freeze = bias): no need to unfold the input
        columns, grads = x.new_empty(0), backprops.flatten(2)
    else:
        columns, grads = unfolded(layer, x, backprops)  # (n, K, T), (n, O, T)
    # weight-standardized: the output kept at its forward pass (None exactly for plain convs)
    responses = _kept(layer, "_responses").pop() if isinstance(layer, WSConv2d) else None
    norms: dict[Tensor, Tensor] = {}
    per_sample: Tensor | None = None
    if layer.weight.requires_grad:
        if _ghost_is_cheaper(columns, grads):
            squared = (
                _ws_ghost_squared_norms(layer, responses, columns, grads)
                if isinstance(layer, WSConv2d) and responses is not None
                else (_position_gram(columns) * _position_gram(grads)).sum(dim=(1, 2))
            )
            norms[layer.weight] = squared.clamp_min(0).sqrt()
        else:
            per_sample = torch.bmm(grads, columns.transpose(1, 2))  # (n, O, K), w.r.t. ŵ if WS
            if isinstance(layer, WSConv2d):
                per_sample = through_standardization(layer, per_sample)
            norms[layer.weight] = per_sample.flatten(1).norm(2, dim=1)
    if layer.bias is not None and layer.bias.requires_grad:
        bias_per_sample = grads.sum(dim=2)
        norms[layer.bias] = bias_per_sample.norm(2, dim=1)

    def clipped_sum(coef: Tensor) -> dict[Tensor, Tensor]:
        sums: dict[Tensor, Tensor] = {}
        if layer.weight.requires_grad:
            if per_sample is not None:
                total = torch.einsum("n,nok->ok", coef, per_sample)
            else:  # one weight-gradient convolution on the reweighted output gradients
                total = conv2d_weight(
                    x,
                    layer.weight.shape,
                    backprops * coef.view(-1, 1, 1, 1),
                    stride=layer.stride,
                    padding=layer.padding,
                    dilation=layer.dilation,
                ).flatten(1)
                if isinstance(layer, WSConv2d):
                    total = through_standardization(layer, total)
            sums[layer.weight] = total.reshape(layer.weight.shape)
        if layer.bias is not None and layer.bias.requires_grad:
            sums[layer.bias] = coef @ bias_per_sample
        return sums

    return norms, clipped_sum


def _position_gram(t: Tensor) -> Tensor:
    """``tᵀt`` per sample: (n, T, T) inner products between every pair of positions."""
    return torch.bmm(t.transpose(1, 2), t)


def _ws_ghost_squared_norms(
    layer: WSConv2d, responses: Tensor, columns: Tensor, grads: Tensor
) -> Tensor:
    """Squared per-sample gradient norms of a weight-standardized convolution, without ``ĝ``.

    One filter's gradient is ``u = (ĝ - S1/K - ŵ W/K) / s`` (:func:`through_standardization`;
    ``ŵ·ŵ = rK``, ``Σŵ = 0``), so ``||u||² = (S2 - S1²/K - (2 - r) W²/K) / s²`` with the
    per-filter sums ``S2 = ĝ·ĝ = Σ_t,t' g_t g_t' (a_t·a_t')``, ``S1 = Σĝ = Σ_t g_t Σa_t`` and
    ``W = ŵ·ĝ = Σ_t g_t (ŵ·a_t)``, where ``ŵ·a_t`` is the layer's bias-free output.
    """
    w_hat, scale = standardization(layer)  # (O, K), (O, 1)
    k = columns.shape[1]
    s2 = (torch.bmm(_position_gram(columns), grads.transpose(1, 2)) * grads.mT).sum(dim=1)
    s1 = (grads * columns.sum(dim=1, keepdim=True)).sum(dim=2)
    w = (grads * responses.flatten(2)).sum(dim=2)
    r = w_hat.pow(2).sum(dim=1) / k  # 1 - eps / (var + eps), per filter
    squared = (s2 - s1.pow(2) / k - (2 - r) * w.pow(2) / k) / scale.view(1, -1).pow(2)
    return squared.clamp_min(0).sum(dim=1)


@_norm_sampler(nn.GroupNorm)
def _group_norm(
    layer: nn.GroupNorm, x: Tensor, backprops: Tensor
) -> tuple[dict[Tensor, Tensor], ClippedSum]:
    per_sample = compute_group_norm_grad_sample(layer, [x], backprops)  # (n, C) each: small
    norms = {p: g.norm(2, dim=1) for p, g in per_sample.items()}
    return norms, lambda coef: {p: coef @ g for p, g in per_sample.items()}


@_norm_sampler(ChannelAffine)
def _channel_affine(
    layer: ChannelAffine, x: Tensor, backprops: Tensor
) -> tuple[dict[Tensor, Tensor], ClippedSum]:
    per_sample = channel_affine_per_sample(layer, x, backprops)  # (n, C) each: small
    norms = {p: g.norm(2, dim=1) for p, g in per_sample.items()}
    return norms, lambda coef: {p: coef @ g for p, g in per_sample.items()}


@_norm_sampler(nn.Linear)
def _linear(
    layer: nn.Linear, x: Tensor, backprops: Tensor
) -> tuple[dict[Tensor, Tensor], ClippedSum]:
    if backprops.dim() != 2:
        raise NotImplementedError("book-keeping clipping supports (batch, features) Linear inputs")
    norms: dict[Tensor, Tensor] = {}
    if layer.weight.requires_grad:
        norms[layer.weight] = backprops.norm(2, dim=1) * x.norm(2, dim=1)  # ||g aᵀ|| = ||g|| ||a||
    if layer.bias is not None and layer.bias.requires_grad:
        norms[layer.bias] = backprops.norm(2, dim=1)

    def clipped_sum(coef: Tensor) -> dict[Tensor, Tensor]:
        weighted = backprops * coef[:, None]
        sums: dict[Tensor, Tensor] = {}
        if layer.weight.requires_grad:
            sums[layer.weight] = weighted.T @ x
        if layer.bias is not None and layer.bias.requires_grad:
            sums[layer.bias] = weighted.sum(dim=0)
        return sums

    return norms, clipped_sum
