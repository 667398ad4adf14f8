"""Opacus per-sample gradients for FedCT's own layers (imported by :mod:`client.training`).

Opacus picks a grad sampler by exact layer type; without this one, weight-standardized
convolutions would fall back to its slower functorch path. Written by hand because no library
ships one.
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler
from opacus.utils.tensor_utils import unfold2d

from common.models import WSConv2d


@register_grad_sampler(WSConv2d)
def weight_standardized_conv_grad_sample(
    layer: WSConv2d, activations: list[torch.Tensor], backprops: torch.Tensor
) -> dict[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of a weight-standardized convolution.

    First the gradient with respect to the standardized filter ``w_hat`` (as for any conv: the
    unfolded input times the output gradient), then the chain rule through the standardization
    of each filter (``K`` weights, ``s = sqrt(var + eps)``):
    ``dL/dw = (g - mean(g) - w_hat * mean(g * w_hat)) / s``.
    """
    if layer.groups != 1:
        raise NotImplementedError("grouped weight-standardized convolutions are not supported")
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out_channels = layer.out_channels
    columns = unfold2d(
        x,
        kernel_size=layer.kernel_size,
        padding=layer.padding,
        stride=layer.stride,
        dilation=layer.dilation,
    )  # (n, K, positions)
    grads_out = backprops.reshape(n, out_channels, -1)  # (n, O, positions)
    result: dict[torch.Tensor, torch.Tensor] = {}
    if layer.weight.requires_grad:
        g_hat = torch.einsum("nop,nkp->nok", grads_out, columns)  # d loss / d w_hat
        w = layer.weight.detach().reshape(out_channels, -1)
        centered = w - w.mean(dim=1, keepdim=True)
        scale = torch.sqrt(centered.pow(2).mean(dim=1, keepdim=True) + layer.eps)
        w_hat = centered / scale
        g = (
            g_hat
            - g_hat.mean(dim=2, keepdim=True)
            - w_hat * (g_hat * w_hat).mean(dim=2, keepdim=True)
        ) / scale
        result[layer.weight] = g.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        result[layer.bias] = grads_out.sum(dim=2)
    return result
