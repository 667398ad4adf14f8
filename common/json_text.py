"""Strict JSON for the files FedCT writes for people and their tools.

Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which strict parsers (JavaScript's
``JSON.parse``, ``jq``, most other languages) reject. FedCT's numbers are NaN where there is no
value (an AUROC with one class present, ε without differential privacy), so every such file is
written through :func:`dumps`: non-finite floats become ``null``, and numpy scalars and arrays
become plain numbers and lists.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float, at any depth, replaced by ``None``."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def dumps(value: Any, *, indent: int | None = None) -> str:
    """Strict JSON text of ``value`` (``null`` for NaN and infinities)."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False)
