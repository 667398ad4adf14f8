"""Where FedCT computes: the ``device`` setting (``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).

``auto`` takes the first CUDA GPU when PyTorch sees one, else the CPU; asking for CUDA where
there is none is an error rather than a silent fall-back, so a site that expects its GPU learns
that it is not used. Training (DP book-keeping included), evaluation, pretraining, Grad-CAM,
``explain`` and ``--compare`` all run on the resolved device; weights cross the network as CPU
arrays either way.
"""

from __future__ import annotations

import re

import torch

from fedct.common.errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(spec: str) -> None:
    if not _PATTERN.fullmatch(spec):
        raise ConfigError(f"device must be {DEVICE_CHOICES}; got {spec!r}")


def resolve_device(spec: str = "auto") -> torch.device:
    """The torch device for ``spec``; raises when CUDA is asked for and absent."""
    check_device(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device = {spec!r}, but PyTorch sees no CUDA GPU here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}): install a "
                "CUDA build of torch and its driver, or set device = auto (or cpu)"
            )
        index = int(spec.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device = {spec!r}, but only {torch.cuda.device_count()} CUDA GPU(s) are "
                "visible (cuda:0 is the first)"
            )
    return torch.device(spec)
