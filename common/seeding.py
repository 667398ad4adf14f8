"""The one seeding helper: every random draw in FedCT derives from the run seed and named parts
(site, epoch, sample...), never from the clock."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that depends on every part (stable across processes and machines)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def seed_everything(*parts: object) -> int:
    """Seed Python, NumPy and torch from ``parts``; returns the seed used."""
    seed = derive_seed(*parts)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed
