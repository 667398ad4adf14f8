"""Model weights as they cross the network: named NumPy arrays, checked on arrival.

Both sides check what they receive against the model they build from the same factory: the
client checks the global model before using it, the server checks every update before
aggregating it. A problem is reported as a one-line reason, never by crashing the round.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

Weights = dict[str, np.ndarray]


def model_weights(model: nn.Module, dtype: str = "float32") -> Weights:
    """The model's floating-point state as named arrays in ``dtype`` (float32 or float16)."""
    return {
        k: v.detach().cpu().numpy().astype(dtype, copy=True) for k, v in model.state_dict().items()
    }


def load_weights(model: nn.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Load ``weights`` (any float dtype) into ``model`` as float32."""
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
    model.load_state_dict(state, strict=True)


def weight_problem(
    weights: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    *,
    max_distance: float | None = None,
) -> str | None:
    """Why ``weights`` cannot be used in place of ``reference`` (keys, shapes, dtypes,
    non-finite values, L2 distance above ``max_distance``), or ``None`` if they can."""
    missing = sorted(set(reference) - set(weights))
    extra = sorted(set(weights) - set(reference))
    if missing or extra:
        return f"wrong keys (missing {missing[:3]}, unexpected {extra[:3]})"
    squared = 0.0
    scratch = np.empty(_BLOCK, dtype=np.float32)
    for key, ref in reference.items():
        value = np.asarray(weights[key])
        if value.shape != ref.shape:
            return f"{key} has shape {value.shape}, expected {ref.shape}"
        if value.dtype.kind != "f":
            return f"{key} has dtype {value.dtype}, expected floating point"
        # One pass for both checks: a NaN or infinity anywhere makes the squared distance
        # non-finite (the reference is finite); only then is the exact reason looked for.
        key_squared = _squared_distance(value, ref, scratch)
        if not np.isfinite(key_squared):
            if not np.isfinite(value).all():
                return f"{key} has non-finite values"
            diff = value.astype(np.float64) - ref  # finite but overflowing float32
            key_squared = float(np.dot(diff.ravel(), diff.ravel()))
        squared += key_squared
    if max_distance is not None and squared > max_distance**2:
        return f"update norm {np.sqrt(squared):.3g} exceeds the limit {max_distance:g}"
    return None


# Differences are taken a block at a time into one cache-sized scratch buffer: no model-sized
# temporary per update, and the dot product reads the block while it is still in cache.
_BLOCK = 1 << 18  # float32 values (1 MiB)


def _squared_distance(value: np.ndarray, ref: np.ndarray, scratch: np.ndarray) -> float:
    flat_value, flat_ref = value.reshape(-1), ref.reshape(-1)
    total = 0.0
    for start in range(0, flat_ref.size, _BLOCK):
        stop = min(start + _BLOCK, flat_ref.size)
        diff = scratch[: stop - start]
        np.subtract(flat_value[start:stop], flat_ref[start:stop], out=diff)
        total += float(np.dot(diff, diff))
    return total
