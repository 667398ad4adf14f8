"""Opacus per-sample gradients for FedCT's own layers, and the convolution algebra they share
with :mod:`client.bookkeeping` (imported by :mod:`client.training`).

Opacus picks a grad sampler by exact layer type; without this one, weight-standardized
convolutions would fall back to its slower functorch path. Written by hand because no library
ships one.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d
from torch import nn

from fedct.common.models import ChannelAffine, WSConv2d


def unfolded(layer: nn.Conv2d, x: torch.Tensor, backprops: torch.Tensor):
    """``(A, G)``: the unfolded input (n, K, T) and the output gradient (n, O, T) of a conv
    (K = in-channels x kernel positions, T = output positions)."""
    columns = unfold2d(
        x,
        kernel_size=layer.kernel_size,
        padding=layer.padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )
    return columns, backprops.reshape(x.shape[0], layer.out_channels, -1)


def standardization(layer: WSConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ŵ, s)``: the standardized filters (O, K) and each filter's standard deviation (O, 1)."""
    w = layer.weight.detach().reshape(layer.out_channels, -1)
    centered = w - w.mean(dim=1, keepdim=True)
    scale = torch.sqrt(centered.pow(2).mean(dim=1, keepdim=True) + layer.eps)
    return centered / scale, scale


def through_standardization(layer: WSConv2d, g_hat: torch.Tensor) -> torch.Tensor:
    """Gradients ``g_hat`` (..., O, K) with respect to the standardized filters ``ŵ`` turned
    into gradients with respect to the weights: the chain rule through each filter's
    standardization (``K`` weights, ``s = sqrt(var + eps)``):
    ``dL/dw = (ĝ - mean(ĝ) - ŵ mean(ĝ ŵ)) / s``. Linear in ``g_hat``."""
    w_hat, scale = standardization(layer)
    return (
        g_hat
        - g_hat.mean(dim=-1, keepdim=True)
        - w_hat * (g_hat * w_hat).mean(dim=-1, keepdim=True)
    ) / scale


@register_grad_sampler(WSConv2d)
def weight_standardized_conv_grad_sample(
    layer: WSConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a weight-standardized convolution: the gradient with respect to
    the standardized filters (as for any conv: the output gradient times the unfolded input),
    then :func:`through_standardization`."""
    if layer.groups != 1:
        raise NotImplementedError("grouped weight-standardized convolutions are not supported")
    columns, grads_out = unfolded(layer, activations[0].to(backprops.dtype), backprops)
    n = columns.shape[0]
    result: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        g_hat = torch.bmm(grads_out, columns.transpose(1, 2))  # (n, O, K)
        result[layer.weight] = through_standardization(layer, g_hat).reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = grads_out.sum(dim=2)
    return result


def channel_affine_per_sample(
    layer: ChannelAffine, x: torch.Tensor, backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of ``y = weight * x + bias`` per channel: ``Σ_positions g x`` and
    ``Σ_positions g``, (n, C) each - small, so both clipping modes use them as they are."""
    result: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        result[layer.weight] = (backprops * x).flatten(2).sum(dim=2)
    if layer.bias.requires_grad:
        result[layer.bias] = backprops.flatten(2).sum(dim=2)
    return result


@register_grad_sampler(ChannelAffine)
def channel_affine_grad_sample(
    layer: ChannelAffine, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    return channel_affine_per_sample(layer, activations[0].to(backprops.dtype), backprops)
